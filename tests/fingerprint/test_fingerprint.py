"""builder/instance/fingerprint.py: secrets never enter, installed files are checked against RECORD, JSON is
deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from builder.instance import fingerprint
from tests.fingerprint.fakesite import add_dist


def test_redact_strips_credentials_from_urls() -> None:
    assert fingerprint.redact("https://user:s3cret@mirror.example/simple") == "https://mirror.example/simple"
    assert fingerprint.redact("http://tok@a/x http://b/y") == "http://a/x http://b/y"
    assert fingerprint.redact("/opt/wheels") == "/opt/wheels"


def test_selected_env_keeps_the_allowlist_and_drops_secrets() -> None:
    env = {
        "PIP_INDEX_URL": "https://u:p@mirror/simple", "HF_TOKEN": "hf_x", "HF_HOME": "/data/hf",
        "SAMEBOX_API_KEY": "k", "SAMEBOX_IMAGE": "img", "AWS_SECRET_ACCESS_KEY": "a", "HOME": "/root",
        "SAMEBOX_PASSWORD": "p", "AutoDLRegion": "west-b",
    }
    got = fingerprint.selected_env(env)
    assert got == {"PIP_INDEX_URL": "https://mirror/simple", "HF_HOME": "/data/hf", "SAMEBOX_IMAGE": "img",
                   "AutoDLRegion": "west-b"}
    assert list(got) == sorted(got)


def test_pip_config_sources_redacts_and_drops_secret_keys(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://me:pw@mirror.example/simple\nclient-cert-key = /k.pem\n")
    sources = fingerprint.pip_config_sources({"HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": str(conf)})
    mine = [s for s in sources if s["path"] == str(conf)]
    assert mine == [{"path": str(conf), "settings": {"index-url": "https://mirror.example/simple"}}]


def test_check_files_finds_a_modified_file_and_a_missing_record(tmp_path: Path) -> None:
    add_dist(tmp_path, "alpha", "1.0")
    add_dist(tmp_path, "beta", "2.0", record=False)
    dists = fingerprint.installed_distributions([str(tmp_path)])
    assert fingerprint.check_files(dists) == {"alpha": [], "beta": ["RECORD"]}
    (tmp_path / "alpha" / "__init__.py").write_text("VERSION = 'patched'\n")
    assert fingerprint.check_files(dists)["alpha"] == ["alpha/__init__.py"]
    (tmp_path / "alpha" / "__init__.py").unlink()
    assert fingerprint.check_files(dists)["alpha"] == ["alpha/__init__.py"]


def _age(site: Path, seconds: int = 60) -> None:
    """Files as an install long ago left them (a finding is not kept for files modified seconds before a check)."""
    for f in site.rglob("*"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 1_000_000_000))


def test_check_files_cache_reads_nothing_for_unchanged_files_and_catches_any_change(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    site, cache = tmp_path / "site", tmp_path / "state" / "file-checks.json"
    cache.parent.mkdir()
    add_dist(site, "alpha", "1.0", {"alpha/__init__.py": "A = 1\n", "alpha/big.py": "B = 2\n"})
    add_dist(site, "beta", "2.0")
    _age(site)
    dists = fingerprint.installed_distributions([str(site)])
    reads: list[str] = []
    real = fingerprint._file_matches
    monkeypatch.setattr(fingerprint, "_file_matches", lambda d, p, h: reads.append(p) or real(d, p, h))

    assert fingerprint.check_files(dists, cache=cache) == {"alpha": [], "beta": []}
    first = len(reads)
    assert first >= 4 and cache.is_file()
    reads.clear()
    assert fingerprint.check_files(dists, cache=cache) == {"alpha": [], "beta": []}
    assert reads == []  # every file has the stat it was hashed at: nothing is read

    # A changed file (same size, new mtime) makes its distribution hashed again, and only that one.
    target = site / "alpha" / "big.py"
    before = target.stat().st_mtime_ns
    target.write_text("B = 3\n")
    os.utime(target, ns=(target.stat().st_atime_ns, before + 1_000_000))
    assert fingerprint.check_files(dists, cache=cache) == {"alpha": ["alpha/big.py"], "beta": []}
    assert reads and all(p.startswith("alpha") for p in reads)
    reads.clear()
    assert fingerprint.check_files(dists, cache=cache)["alpha"] == ["alpha/big.py"]  # the finding is kept
    assert reads == []

    # Put back with the stat it had: the cache cannot see it, a rehash (no cache) can.
    stat = target.stat()
    target.write_text("B = 9\n")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint.check_files(dists)["alpha"] == ["alpha/big.py"]

    # A damaged cache file is no finding: everything is hashed again.
    cache.write_text("{not json")
    reads.clear()
    assert fingerprint.check_files(dists, cache=cache)["beta"] == []
    assert len(reads) >= 4


def test_check_files_cache_that_cannot_be_written_costs_only_time(tmp_path: Path) -> None:
    add_dist(tmp_path / "site", "alpha", "1.0")
    dists = fingerprint.installed_distributions([str(tmp_path / "site")])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert fingerprint.check_files(dists, cache=blocker / "file-checks.json") == {"alpha": []}


def test_record_digest_ignores_installer_rows_and_bytecode(tmp_path: Path) -> None:
    a = add_dist(tmp_path / "a", "alpha", "1.0")
    b = add_dist(tmp_path / "b", "alpha", "1.0")
    with open(b / "RECORD", "a") as fh:  # what pip adds and uv does not
        fh.write("alpha/__pycache__/__init__.cpython-311.pyc,sha256=abc,10\nalpha-1.0.dist-info/REQUESTED,,\n")
    text = (b / "RECORD").read_text().replace("../../../bin/alpha,sha256=", "../../../bin/alpha,sha256=X")
    (b / "RECORD").write_text(text)
    da = fingerprint.installed_distributions([str(a.parent)])["alpha"]
    db = fingerprint.installed_distributions([str(b.parent)])["alpha"]
    assert fingerprint.record_digest(da) == fingerprint.record_digest(db) != ""
    with open(b / "RECORD", "a") as fh:
        fh.write("alpha/extra.py,sha256=def,3\n")
    assert fingerprint.record_digest(da) != fingerprint.record_digest(db)


def test_pip_leftovers_are_not_distributions(tmp_path: Path) -> None:
    add_dist(tmp_path, "alpha", "1.0")
    (tmp_path / "~lpha-0.9.dist-info").mkdir()
    (tmp_path / "~lpha-0.9.dist-info" / "METADATA").write_text("Name: ~lpha\nVersion: 0.9\n")
    assert list(fingerprint.installed_distributions([str(tmp_path)])) == ["alpha"]


def test_collect_is_deterministic_and_complete() -> None:
    first = fingerprint.dumps(fingerprint.collect(with_files=False))
    second = fingerprint.dumps(fingerprint.collect(with_files=False))
    assert first == second
    fp = json.loads(first)
    assert set(fp) == {"env", "machine", "nvcc", "os", "packages", "pip_config", "python", "schema", "torch"}
    assert fp["python"]["implementation"] == "CPython" and fp["os"]["glibc"].startswith("glibc")
    assert fp["packages"]["samebox"]["version"]
    assert fp["torch"] is None or "version" in fp["torch"]


def test_load_refuses_what_is_not_a_fingerprint(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(SameboxError, match="not a samebox fingerprint"):
        fingerprint.load(bad)
    with pytest.raises(SameboxError, match="cannot read"):
        fingerprint.load(tmp_path / "missing.json")


def test_a_deleted_file_counts_even_where_importlib_leaves_missing_files_out(tmp_path: Path, monkeypatch) -> None:
    """From Python 3.12 importlib's Distribution.files drops RECORD rows whose file is gone; the check reads the
    RECORD itself, so a deleted file is still reported (the catalog's images run 3.12)."""
    import importlib.metadata as md

    add_dist(tmp_path, "alpha", "1.0", {"alpha/__init__.py": "A = 1\n", "alpha/gone.py": "G = 1\n"})
    real = md.PathDistribution.files

    def files_as_in_312(self):
        found = real.fget(self)
        return None if found is None else [f for f in found if f.locate().exists()]

    monkeypatch.setattr(md.PathDistribution, "files", property(files_as_in_312))
    dists = fingerprint.installed_distributions([str(tmp_path)])
    before = fingerprint.record_digest(dists["alpha"])
    (tmp_path / "alpha" / "gone.py").unlink()
    assert fingerprint.check_files(dists) == {"alpha": ["alpha/gone.py"]}
    assert fingerprint.record_digest(dists["alpha"]) == before  # the RECORD, not what is on disk


def test_record_rows_are_spelled_as_importlib_spells_them(tmp_path: Path) -> None:
    """The record digest a fingerprint holds stays what earlier fingerprints hold (they read importlib's files)."""
    info = add_dist(tmp_path, "odd", "1.0", {"odd/a.py": "a\n", "odd/b.py": "b\n"})
    record = info / "RECORD"
    record.write_text(record.read_text().replace("odd/a.py", "./odd//a.py").replace("odd/b.py,sha256=", "odd/b.py,"))
    dist = fingerprint.installed_distributions([str(tmp_path)])["odd"]
    by_importlib = sorted((str(f), f"{f.hash.mode}={f.hash.value}" if f.hash else "") for f in dist.files
                          if not str(f).startswith("..") and not str(f).endswith(("RECORD", "INSTALLER")))
    ours = [(p, d) for p, d in fingerprint._wheel_rows(dist) if not p.startswith("..")]
    assert ours == by_importlib


def test_a_clone_of_the_same_files_reuses_the_findings(tmp_path: Path, monkeypatch) -> None:
    """A clone of an image has the same files at the same paths with the same sizes and mtimes, on other inodes:
    with the findings file shared in the region, its check reads none of them again."""
    import shutil

    site, cache = tmp_path / "site", tmp_path / "region" / "file-checks.json"
    cache.parent.mkdir()
    add_dist(site, "alpha", "1.0", {"alpha/__init__.py": "A = 1\n", "alpha/x.py": "X = 2\n"})
    _age(site)
    assert fingerprint.check_files(fingerprint.installed_distributions([str(site)]), cache=cache) == {"alpha": []}
    site.rename(tmp_path / "original")
    shutil.copytree(tmp_path / "original", site)  # copy2: same sizes and mtimes, new inodes
    reads: list[str] = []
    real = fingerprint._file_matches
    monkeypatch.setattr(fingerprint, "_file_matches", lambda d, p, h: reads.append(p) or real(d, p, h))
    assert fingerprint.check_files(fingerprint.installed_distributions([str(site)]), cache=cache) == {"alpha": []}
    assert reads == []


def test_a_finding_is_not_kept_for_files_modified_just_before_the_check(tmp_path: Path, monkeypatch) -> None:
    site, cache = tmp_path / "site", tmp_path / "file-checks.json"
    add_dist(site, "fresh", "1.0")  # written this second: it may change again within the same mtime
    dists = fingerprint.installed_distributions([str(site)])
    reads: list[str] = []
    real = fingerprint._file_matches
    monkeypatch.setattr(fingerprint, "_file_matches", lambda d, p, h: reads.append(p) or real(d, p, h))
    fingerprint.check_files(dists, cache=cache)
    first = len(reads)
    fingerprint.check_files(dists, cache=cache)
    assert first and len(reads) == 2 * first  # read again: nothing was kept
    _age(site)
    fingerprint.check_files(dists, cache=cache)
    reads.clear()
    fingerprint.check_files(dists, cache=cache)
    assert reads == []


def test_rehash_reads_everything_and_refreshes_the_findings(tmp_path: Path, monkeypatch) -> None:
    site, cache = tmp_path / "site", tmp_path / "file-checks.json"
    add_dist(site, "alpha", "1.0", {"alpha/__init__.py": "A = 1\n"})
    _age(site)
    dists = fingerprint.installed_distributions([str(site)])
    assert fingerprint.check_files(dists, cache=cache) == {"alpha": []}
    target = site / "alpha" / "__init__.py"
    st = target.stat()
    target.write_text("A = 9\n")  # same size, the old mtime put back: invisible to the quick check
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint.check_files(dists, cache=cache) == {"alpha": []}
    assert fingerprint.check_files(dists, cache=cache, refresh=True) == {"alpha": ["alpha/__init__.py"]}
    assert fingerprint.check_files(dists, cache=cache) == {"alpha": ["alpha/__init__.py"]}  # remembered now


@pytest.mark.parametrize("cached", [True, False])
def test_the_largest_files_are_hashed_first_from_one_stat_each(tmp_path: Path, monkeypatch, cached: bool) -> None:
    """A 1 GB library started last would hash alone while the other threads idle: the largest first. With the
    findings cache the sizes come from the stats the findings took (a file is not stat'ed twice)."""
    site, cache = tmp_path / "site", tmp_path / "state" / "file-checks.json"
    cache.parent.mkdir()
    add_dist(site, "alpha", "1.0", {"alpha/small.py": "a\n", "alpha/large.py": "b" * 5000 + "\n",
                                    "alpha/mid.py": "c" * 300 + "\n"})
    _age(site)
    dists = fingerprint.installed_distributions([str(site)])
    reads: list[str] = []
    real = fingerprint._file_matches
    monkeypatch.setattr(fingerprint, "_file_matches", lambda d, p, h: reads.append(p) or real(d, p, h))
    if cached:
        monkeypatch.setattr(fingerprint, "_size", lambda d, p: pytest.fail("stat'ed twice"))
    assert fingerprint.check_files(dists, workers=1, cache=cache if cached else None) == {"alpha": []}
    order = [p for p in reads if p.endswith(".py")]
    assert order[:3] == ["alpha/large.py", "alpha/mid.py", "alpha/small.py"]
