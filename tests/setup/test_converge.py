"""builder/instance/converge.py without a container: options, the plan and its count, the refusals that leave
nothing written, the progress and 'running' marker, and the values earlier setup scripts recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from builder.core import compat, settings
from builder.core.catalog import Catalog
from builder.core.errors import SameboxError
from builder.instance import converge
from builder.instance import converge_steps as steps
from builder.instance.converge import Step, execute, parse_options, plan, preflight
from builder.instance.converge_steps import Match, Preflight, Run, StepFailed
from tests.conftest import REPO

CPU = Match(image="img", image_torch="none", provider="system", flash_attn="", torch="none", gpus=(),
            flash_attn2_gpu=False, describe="Python 3.11 / torch none / no GPU")
H100 = Match(image="img", image_torch="2.5.1+cu124", provider="conda", flash_attn="2.8.3", torch="2.5.1+cu124",
             gpus=("NVIDIA H100 80GB HBM3",), flash_attn2_gpu=True, describe="Python 3.12 / torch 2.5.1+cu124 / H100")


def _opts(*argv: str, **environ: str) -> converge.Options:
    return parse_options(list(argv), environ)


def _pre(match: Match, tmp_path: Path) -> Preflight:
    lock = tmp_path / "lock.txt"
    return Preflight(match=match, root=tmp_path, catalog=tmp_path / "matrix.toml", lock_source=lock, lockfile=lock,
                     cache_dir=tmp_path / "cache", free_mb=10_000, needs_venv=False)


# --- options ------------------------------------------------------------------------------------------------------


def test_every_bad_option_is_reported_together(tmp_path: Path) -> None:
    with pytest.raises(SameboxError) as caught:
        _opts("--offline", "--min-free-mb", "lots", "--frobnicate", "--flash-attn-profile", "turbo")
    text = str(caught.value)
    for message in ("unknown option --frobnicate", "--offline needs --wheelhouse DIR",
                    "--min-free-mb must be a number of MiB, got 'lots'", "must be full, slim or lean, got 'turbo'"):
        assert message in text
    with pytest.raises(SameboxError, match="wheelhouse .*no-such is not a directory"):
        _opts("--wheelhouse", str(tmp_path / "no-such"))
    with pytest.raises(SameboxError, match="expected one argument"):
        _opts("--image")


def test_profiles_are_compats_and_checked_only_when_flash_attn_may_be_built() -> None:
    for profile in compat.FLASH_ATTN_PROFILES:
        assert _opts("--flash-attn-profile", profile).flash_attn_profile == profile
    assert _opts().flash_attn_profile == "full"
    assert _opts(SAMEBOX_FA_PROFILE="lean").flash_attn_profile == "lean"
    assert not _opts("--no-flash-attn", "--flash-attn-profile", "turbo").flash_attn
    with pytest.raises(SameboxError, match=r"\(--flash-attn-profile or SAMEBOX_FA_PROFILE\)"):
        _opts(SAMEBOX_FA_PROFILE="turbo")


def test_environment_defaults_and_the_command_line_over_them(tmp_path: Path) -> None:
    opts = _opts(SAMEBOX_MIN_FREE_MB="7", SAMEBOX_STATE=str(tmp_path / "st"), SAMEBOX_CACHE_DIR=str(tmp_path / "c"))
    assert (opts.min_free_mb, opts.state, opts.cache_dir) == (7, tmp_path / "st", tmp_path / "c")
    assert _opts("--min-free-mb", "9", SAMEBOX_MIN_FREE_MB="7").min_free_mb == 9
    assert _opts().min_free_mb == settings.DEFAULT_MIN_FREE_MB
    assert _opts().samebox_src == REPO  # the source this module was imported from
    with pytest.raises(SameboxError, match="is not the interpreter running this"):
        _opts("--python", "/bin/sh")


# --- the plan -----------------------------------------------------------------------------------------------------

BASE = ["source", "python", "platform", "caches", "torch", "packages", "samebox"]


@pytest.mark.parametrize(("argv", "match", "names"), [
    ((), CPU, [*BASE, "flash-attn", "fingerprint"]),
    (("--no-flash-attn",), CPU, [*BASE, "fingerprint"]),
    (("--no-selftest",), CPU, [*BASE, "flash-attn", "fingerprint"]),
    ((), H100, [*BASE, "flash-attn", "fingerprint", "selftest"]),
    (("--no-selftest",), H100, [*BASE, "flash-attn", "fingerprint"]),
    (("--no-flash-attn", "--no-selftest"), H100, [*BASE, "fingerprint"]),
])
def test_plan_steps_follow_the_options_and_the_gpu(tmp_path: Path, argv: tuple[str, ...], match: Match,
                                                  names: list[str]) -> None:
    assert [s.name for s in plan(_opts(*argv), _pre(match, tmp_path))] == names


def test_progress_counts_the_plan_and_the_marker_names_the_step(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    opts = _opts(SAMEBOX_STATE=str(tmp_path / "state"))
    run = Run(opts=opts, pre=_pre(CPU, tmp_path), work=tmp_path, python=sys.executable)
    seen = []

    def fails(r: Run) -> None:
        seen.append((opts.state / "running").read_text())
        raise StepFailed("it broke")

    with pytest.raises(StepFailed, match="step 'second' failed: it broke"):
        execute(run, [Step("first", lambda r: None), Step("second", fails), Step("third", lambda r: None)])
    assert capsys.readouterr().out == "==> [1/3] first\n==> [2/3] second\n"
    assert seen == ["2 second\n"]
    execute(run, [Step("only", lambda r: None)])
    out = capsys.readouterr().out
    assert "the previous run stopped during step 'second'" in out and "==> [1/1] only" in out
    assert not (opts.state / "running").exists()
    # each step's seconds, the failed one's too, for the summary and setup-timings.json
    assert list(run.seconds) == ["first", "second", "only"] and all(v >= 0 for v in run.seconds.values())
    converge._write_timings(run, 1.5)
    timings = json.loads((opts.state / "setup-timings.json").read_text())
    assert timings["total_s"] == 1.5 and list(timings["step_seconds"]) == ["first", "second", "only"]
    assert converge._summary(run, 2).startswith("samebox setup: done in 2s (")


# A stand-in for the target interpreter: `python -m builder fingerprint|selftest ...` as the steps call it. The
# self-test writes when it started and ended; the fingerprint waits until the self-test has started (it runs beside).
FAKE_PYTHON = """#!/bin/sh
shift 2
case "$1" in
  fingerprint)
    nice > "$LOG/fingerprint.nice"
    for _ in $(seq 100); do [ -f "$LOG/selftest.began" ] && break; sleep 0.05; done
    [ -f "$LOG/selftest.began" ] && echo began-before-fingerprint-ended > "$LOG/overlap"
    exit "${FINGERPRINT_RC:-0}" ;;
  selftest)
    date +%s.%N > "$LOG/selftest.began"; echo "selftest says $*"; echo "selftest warns" >&2
    sleep "${SELFTEST_SLEEP:-0}"; date +%s.%N > "$LOG/selftest.ended"; exit "${SELFTEST_RC:-0}" ;;
esac
"""


def _fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **environ: str) -> Run:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    monkeypatch.setenv("LOG", str(tmp_path))
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    opts = _opts(SAMEBOX_STATE=str(tmp_path / "state"))
    work = tmp_path / "work"
    work.mkdir()
    return Run(opts=opts, pre=_pre(H100, tmp_path), work=work, python=str(fake))


def test_the_selftest_runs_beside_the_fingerprint_and_its_output_comes_in_its_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run = _fake_run(tmp_path, monkeypatch)
    execute(run, [Step("fingerprint", steps.fingerprint), Step("selftest", steps.selftest)])
    assert (tmp_path / "overlap").is_file()  # started before the fingerprint ended
    assert int((tmp_path / "fingerprint.nice").read_text()) >= 10  # the hashing yields to the self-test
    captured = capsys.readouterr()
    fingerprint_part, _, selftest_part = captured.out.partition("==> [2/2] selftest")
    assert "selftest says" not in fingerprint_part and "the self-test runs beside it" in fingerprint_part
    assert "selftest says selftest --quick --reuse all" in selftest_part and "selftest passed (" in selftest_part
    assert "selftest warns" in captured.err
    assert run.selftest_passed and run.selftest_own_s is not None and run.selftest_proc is None


def test_a_failing_background_selftest_fails_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _fake_run(tmp_path, monkeypatch, SELFTEST_RC="1")
    with pytest.raises(StepFailed, match="step 'selftest' failed: the GPU self-test found problems"):
        execute(run, [Step("fingerprint", steps.fingerprint), Step("selftest", steps.selftest)])
    assert not run.selftest_passed


def test_a_failed_fingerprint_stops_the_selftest_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _fake_run(tmp_path, monkeypatch, FINGERPRINT_RC="1", SELFTEST_SLEEP="30")
    began = time.monotonic()
    with pytest.raises(StepFailed, match="step 'fingerprint' failed"):
        execute(run, [Step("fingerprint", steps.fingerprint), Step("selftest", steps.selftest)])
    assert run.selftest_proc is None and time.monotonic() - began < 20
    assert not (tmp_path / "selftest.ended").exists()  # terminated, not waited for


# --- refusals: exit 2, nothing written ----------------------------------------------------------------------------


def _catalog_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "lockfiles").mkdir()
    (root / "images" / "matrix.toml").write_text("")
    return root


def test_preflight_refuses_before_anything_is_written(tmp_path: Path) -> None:
    root = _catalog_root(tmp_path)
    img = replace(CPU, lockfile=root / "lockfiles" / "img.txt")  # the matched ImageSpec's lockfile
    state, cache = tmp_path / "state", tmp_path / "cache"
    opts = _opts("--root", str(root), "--cache-dir", str(cache), SAMEBOX_STATE=str(state))
    with pytest.raises(SameboxError, match="no lockfile .*img.txt for image img; make it with `make lock IMAGE=img`"):
        preflight(opts, lambda catalog, image: img)
    (root / "lockfiles" / "img.txt").write_text("six==1.16.0\n")
    huge = _opts("--root", str(root), "--cache-dir", str(cache), "--min-free-mb", str(10**12),
                 SAMEBOX_STATE=str(state))
    with pytest.raises(SameboxError, match=f"cache directory {cache} has \\d+ MiB free, at least {10**12} MiB"):
        preflight(huge, lambda catalog, image: img)
    with pytest.raises(SameboxError, match="no catalog at"):
        preflight(_opts("--root", str(tmp_path), SAMEBOX_STATE=str(state)), lambda catalog, image: img)
    (tmp_path / "file").write_text("")
    with pytest.raises(SameboxError, match="cache directory .*file/cache is not writable"):
        preflight(_opts("--root", str(root), "--cache-dir", str(tmp_path / "file" / "cache"),
                        SAMEBOX_STATE=str(state)), lambda catalog, image: img)
    pre = preflight(opts, lambda catalog, image: img)
    assert (pre.lockfile, pre.cache_dir, pre.needs_venv) == (root / "lockfiles" / "img.txt", cache, True)
    assert not state.exists() and not cache.exists()


def test_a_platform_the_catalog_cannot_replicate_exits_2_with_nothing_written(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    real = Catalog.load().find("torch2.3-cu121-py312").to_dict()
    catalog.write_text(json.dumps([{**real, "id": "old", "python": "2.7", "torch": "1.0.0", "torch_local": "cu90",
                                    "platforms": ["Ancient base"]}]))
    lock = tmp_path / "lock.txt"
    lock.write_text("six==1.16.0\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "builder.instance.converge", "--catalog", str(catalog), "--lockfile",
                          str(lock)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "samebox setup: error: no catalog image replicates this instance" in run.stderr
    assert "'Ancient base' -> old" in run.stderr and "Traceback" not in run.stderr
    assert list(home.iterdir()) == [] and run.stdout == ""


def test_the_rental_is_probed_once_and_the_probe_sees_the_regions_findings(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """setup needs the rental facts (where the region's caches are) before torch's report: they are probed once and
    handed to the platform probe, which runs with $SAMEBOX_FILE_CHECKS already pointing at the region."""
    from builder.core import environment

    calls, seen = [], []
    real_rental = environment.probe_rental

    def rental():
        calls.append(1)
        return real_rental()

    def probe(**kwargs):
        seen.append((kwargs.get("rental"), settings.get("FILE_CHECKS")))
        raise SameboxError("stop here")

    monkeypatch.setattr(environment, "probe_rental", rental)
    monkeypatch.setattr(converge, "probe_rental", rental)
    monkeypatch.setattr(environment.Environment, "probe", staticmethod(probe))
    monkeypatch.setenv("SAMEBOX_FILE_CHECKS", "")  # recorded: what main sets is undone after the test
    monkeypatch.delenv("SAMEBOX_FILE_CHECKS")
    monkeypatch.delenv("SAMEBOX_WHEEL_CACHE", raising=False)
    monkeypatch.setenv("SAMEBOX_STATE", str(tmp_path / "state"))
    lock = tmp_path / "lock.txt"
    lock.write_text("six==1.16.0\n")
    code = converge.main(["--catalog", str(REPO / "images" / "matrix.toml"), "--lockfile", str(lock), "--cache-dir",
                          str(tmp_path / "region"), "--python", sys.executable, "--samebox-src", str(REPO)])
    assert code == 2 and calls == [1]
    assert seen == [(real_rental(), str(tmp_path / "region" / "samebox" / "file-checks.json"))]
    assert not (tmp_path / "state").exists() and not (tmp_path / "region").exists()


# --- what the steps write -----------------------------------------------------------------------------------------


def test_source_digest_is_the_one_earlier_setup_scripts_recorded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in ("pyproject.toml", "builder/a.py", "builder/B.py", "builder/sub/c.typed", "builder/skip.txt",
                "builder/data/t.json",
                "trainer/t.py", "trainer/cfg.toml"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    earlier = subprocess.run(
        "find pyproject.toml builder trainer -type f \\( -name '*.py' -o -name '*.toml' -o -name '*.typed' "
        "-o -name '*.json' \\) "
        "| LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1",
        shell=True, cwd=src, capture_output=True, text=True, check=True).stdout.strip()
    assert steps.source_digest(src) == earlier
    (src / "builder" / "a.py").write_text("changed")
    assert steps.source_digest(src) != earlier


def test_env_sh_keeps_a_path_full_of_shell_syntax_a_path(tmp_path: Path) -> None:
    odd = tmp_path / "odd \"dir\" $(touch pwned) 'q'"
    pre = Preflight(match=CPU, root=None, catalog=tmp_path / "c.json", lock_source=tmp_path / "l",
                    lockfile=tmp_path / "state" / "lock.txt", cache_dir=odd, free_mb=1, needs_venv=False)
    run = Run(opts=_opts(), pre=pre, work=tmp_path, python=sys.executable, wheel_cache=odd / "wheels")
    env_sh = tmp_path / "env.sh"
    env_sh.write_text(steps.env_sh(run))
    script = '. "$1" && printf "%s\\n" "$HF_HOME" "$SAMEBOX_LOCKFILE" "${SAMEBOX_ROOT-unset}"'
    out = subprocess.run(["bash", "-c", script, "-", str(env_sh)], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == [f"{odd}/huggingface", str(tmp_path / "state" / "lock.txt"), "unset"]
    assert not (tmp_path / "pwned").exists()


def test_the_platform_probe_sees_the_findings_where_the_caches_step_will_put_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the probe (a second instance's state is empty): $SAMEBOX_FILE_CHECKS is the path the caches step
    exports, beside the region's wheels, so the torch report an earlier instance kept there is found."""
    monkeypatch.setenv("SAMEBOX_FILE_CHECKS", "")  # recorded, so what _share_findings sets is undone after the test
    monkeypatch.delenv("SAMEBOX_FILE_CHECKS")
    monkeypatch.delenv("SAMEBOX_WHEEL_CACHE", raising=False)
    for where in ("AUTODL_DATA_DISK", "AUTODL_SHARED_FS"):  # not AutoDL, whatever this host is
        monkeypatch.setattr(settings, where, tmp_path / "absent" / where)
    opts = _opts("--cache-dir", str(tmp_path / "region"))
    pre = replace(_pre(H100, tmp_path), cache_dir=tmp_path / "region")
    run = Run(opts=opts, pre=pre, work=tmp_path, python=sys.executable,
              wheel_cache=settings.wheel_cache(caches=pre.cache_dir, shared_fs=None))
    exported = dict(line[len("export "):].split("=", 1) for line in steps.env_sh(run).splitlines()[1:])
    rental = converge.probe_rental()
    converge._share_findings(opts, rental)
    assert settings.file_checks() == tmp_path / "region" / "samebox" / "file-checks.json"
    assert str(settings.file_checks()) == exported["SAMEBOX_FILE_CHECKS"]
    assert not (tmp_path / "region").exists()  # a check writes nothing
    monkeypatch.setenv("SAMEBOX_FILE_CHECKS", str(tmp_path / "mine.json"))  # the user's own is kept
    converge._share_findings(opts, rental)
    assert settings.file_checks() == tmp_path / "mine.json"


def test_where_the_selftest_runs_setup_reads_its_libraries_from_the_start(tmp_path: Path) -> None:
    opts = _opts("--cache-dir", str(tmp_path / "c"))
    state = tmp_path / "state"
    state.mkdir()
    opts = replace(opts, state=state)
    warm = converge.start_readahead(opts, _pre(H100, tmp_path))
    assert warm is not None and warm.total_bytes == warm.library_bytes > 0  # this torch's libraries
    assert any(f.name.startswith("libtorch") for f in warm.files)
    assert converge.start_readahead(opts, _pre(CPU, tmp_path)) is None  # no GPU, no self-test
    assert converge.start_readahead(replace(opts, selftest=False), _pre(H100, tmp_path)) is None
    assert warm.join(30).done()
    run = Run(opts=opts, pre=_pre(H100, tmp_path), work=tmp_path, python=sys.executable, readahead=warm)
    converge._write_timings(run, 1.0)
    timings = json.loads((state / "setup-timings.json").read_text())
    assert timings["readahead"]["bytes"] == timings["readahead"]["read_bytes"] == warm.total_bytes


def test_the_rendered_setup_sh_only_finds_python_and_the_source() -> None:
    text = (REPO / "setup.sh").read_text()
    assert len(text.splitlines()) < 80
    assert 'exec "$PY" -m builder.instance.converge "$@"' in text
    assert "==>" not in text  # the steps and their count live in builder/instance/converge.py
