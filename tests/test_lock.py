"""Lockfiles: header and input hash, --check without network, uv command construction, credential stripping,
the checks that keep a bad lock from being written, the readers, and the committed lockfiles themselves.

uv is replaced by a small fake script here; tests/test_lock_index.py runs the real uv (local index and PyPI).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from builder.cli import main
from builder.core import lockfile, pyindex
from builder.core.errors import SameboxError
from builder.core.spec import ImageSpec, load_catalog
from builder.image import lock
from builder.instance import drift
from tests.conftest import require

REPO = Path(__file__).resolve().parent.parent
TEST_ROOT = REPO / "tests" / "fixtures" / "catalog"
H = "0" * 63  # + one hex digit: a fake sha256

ENTRY = """
[[image]]
id = "t23"
torch = "2.3.0"
torch_local = "cu121"
cuda = "12.1"
cudnn = "8.9"
python = "3.12"
os = "ubuntu22.04"
base_image = "nvidia/cuda:12.1.1-cudnn8-devel-ubuntu22.04"
python_provider = "system"
archs = ["8.0"]
flash_attn = "2.7.4.post1"
torch_index = "{index}"
platforms = []
"""

BODY = f"""nvidia-cuda-runtime-cu12==12.1.105 \\
    --hash=sha256:{H}1
    # via torch
nvidia-cudnn-cu12==8.9.2.26 \\
    --hash=sha256:{H}2
    # via torch
six==1.17.0 \\
    --hash=sha256:{H}3
    # via -r images/requirements.in
torch==2.3.0 \\
    --hash=sha256:{H}4 \\
    --hash=sha256:{H}5
    # via
    #   -c {{PIN}}
    #   from https://bob:s3cret@mirror.example/simple
"""


def torch_root(tmp_path: Path, index: str = "pypi") -> ImageSpec:
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "images" / "matrix.toml").write_text(ENTRY.format(index=index))
    (tmp_path / "images" / "requirements.in").write_text("six\n")
    return load_catalog(tmp_path)[0]


def fixture_root(tmp_path: Path) -> ImageSpec:
    root = tmp_path / "catalog"
    shutil.copytree(TEST_ROOT, root)
    return load_catalog(root)[0]


@pytest.fixture
def fake_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for uv: `--version`, and `pip compile ... -o OUT` writing $FAKE_UV_BODY ({PIN} = the -c file)."""
    script = tmp_path / "fake-uv"
    script.write_text(f"""#!{sys.executable}
import os, sys, pathlib
args = sys.argv[1:]
if args == ["--version"]:
    print("uv 0.0.1 (fake)"); sys.exit(0)
pathlib.Path(os.environ["FAKE_UV_ARGS"]).write_text("\\n".join(args))
if os.environ.get("FAKE_UV_FAIL"):
    sys.stderr.write("error: GET https://bob:s3cret@mirror.example/simple/six/ failed\\n"); sys.exit(2)
pin = args[args.index("-c") + 1] if "-c" in args else ""
pathlib.Path(args[args.index("-o") + 1]).write_text(os.environ["FAKE_UV_BODY"].replace("{{PIN}}", pin))
""")
    script.chmod(0o755)
    monkeypatch.setattr(lock, "find_uv", lambda: str(script))
    monkeypatch.setattr(pyindex, "reachable", lambda url, timeout=10: True)
    monkeypatch.setenv("FAKE_UV_ARGS", str(tmp_path / "uv-args.txt"))
    monkeypatch.setenv("FAKE_UV_BODY", BODY)
    return tmp_path / "uv-args.txt"


def no_fetch(name: str, hashes: set[str]) -> None:
    return None


# --- header, hash, freshness -------------------------------------------------------------------------------------


def test_lock_writes_header_and_is_fresh(tmp_path: Path, fake_uv: Path) -> None:
    spec = torch_root(tmp_path)
    result = lock.lock_image(spec, fetch=no_fetch)
    text = spec.lockfile.read_text()
    assert text.startswith(lock.MARKER)
    assert f"# Regenerate with: samebox lock --root {tmp_path.resolve()} --image t23" in text
    assert f"# inputs-sha256: {lock.inputs_sha256(spec)}" in text
    assert "torch 2.3.0 from PyPI | Python 3.12 | x86_64-manylinux_2_28" in text
    assert "uv 0.0.1 pip compile" in text
    assert "-c samebox-torch-pin" in text and "torch-pin.txt" not in text
    assert (result.packages, result.torch, result.cuda_runtime) == (4, "2.3.0", "12.1")
    assert result.unchecked == ("six==1.17.0",)  # torch and nvidia-* are not asked for metadata
    assert lock.check_lock(spec).state == "fresh"


def test_check_needs_no_network_and_sees_every_input(tmp_path: Path, fake_uv: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = torch_root(tmp_path)
    lock.lock_image(spec, fetch=no_fetch)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("--check must not use the network or run uv")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    check = ["lock", "--check", "--root", str(tmp_path)]
    assert main(check) == 0
    (tmp_path / "images" / "requirements.in").write_text("six\npeft\n")
    assert main(check) == 1
    assert "inputs changed" in lock.check_lock(spec).reason
    (tmp_path / "images" / "requirements.in").write_text("six\n")
    assert main(check) == 0
    (tmp_path / "images" / "constraints").mkdir()
    lock.constraints_file(spec).write_text("six<2\n")
    assert main(check) == 1
    lock.constraints_file(spec).unlink()
    matrix = tmp_path / "images" / "matrix.toml"
    matrix.write_text(matrix.read_text().replace('python = "3.12"', 'python = "3.11"'))
    assert main(check + ["--json"]) == 1


def test_check_reports_hand_written_and_missing_lockfiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = torch_root(tmp_path)
    assert main(["lock", "--check", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no lockfile for image 't23'" in err and f"samebox lock --root {tmp_path.resolve()} --image t23" in err
    with pytest.raises(SameboxError, match="make it with"):
        lock.lockfile_sha256(spec)
    spec.lockfile.parent.mkdir()
    spec.lockfile.write_text("six==1.17.0\n")
    assert lock.check_lock(spec).state == "stale"
    capsys.readouterr()
    assert main(["lock", "--check", "--root", str(tmp_path)]) == 1
    assert f"t23: regenerate with `samebox lock --root {tmp_path.resolve()} --image t23`" in capsys.readouterr().err


def test_input_hash_ignores_uv_version_but_not_torch(tmp_path: Path) -> None:
    spec = torch_root(tmp_path)
    inputs = lock.lock_inputs(spec)
    assert "uv" not in json.dumps(inputs) and inputs["platform"] == lock.LOCK_PLATFORM
    other = dataclasses.replace(spec, torch="2.3.1")
    assert lock.inputs_sha256(other) != lock.inputs_sha256(spec)


# --- uv command and constraints ----------------------------------------------------------------------------------


def test_uv_command_targets_the_image_not_the_host(tmp_path: Path) -> None:
    spec = torch_root(tmp_path)
    cmd = lock.uv_command(spec, "uv", Path("/t/pin.txt"), Path("/t/out.txt"), upgrade=False)
    joined = " ".join(cmd)
    assert cmd[:4] == ["uv", "pip", "compile", "images/requirements.in"]
    assert "-c /t/pin.txt" in joined and "--generate-hashes" in cmd and "--upgrade" not in cmd
    assert "--python-version 3.12 --python-platform x86_64-manylinux_2_28" in joined
    assert "--extra-index-url" not in cmd
    assert lock.torch_pin(spec) == "torch==2.3.0"


def test_uv_command_for_a_pytorch_index_variant_and_constraints_file(tmp_path: Path) -> None:
    spec = torch_root(tmp_path, index="https://download.pytorch.org/whl/cu121")
    (tmp_path / "images" / "constraints").mkdir()
    lock.constraints_file(spec).write_text("numpy<2\n")
    cmd = lock.uv_command(spec, "uv", Path("/t/pin.txt"), Path("/t/out.txt"), upgrade=True)
    joined = " ".join(cmd)
    assert lock.torch_pin(spec) == "torch==2.3.0+cu121"
    assert "--extra-index-url https://download.pytorch.org/whl/cu121 --index-strategy first-index" in joined
    assert "-c images/constraints/t23.txt" in joined and "--upgrade" in cmd
    assert lock.required_indexes(spec)[0] == "https://download.pytorch.org/whl/cu121"


def test_no_torch_entry_has_no_pin(tmp_path: Path) -> None:
    spec = fixture_root(tmp_path)
    assert lock.torch_pin(spec) == ""
    assert "-c" not in lock.uv_command(spec, "uv", Path("/p"), Path("/o"), upgrade=False)


# --- credentials ---------------------------------------------------------------------------------------------------


def test_redact_and_uv_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pyindex.redact("see https://bob:s3cret@mirror.example/simple and http://tok@x.cn/a") == \
        "see https://mirror.example/simple and http://x.cn/a"
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT",
                "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.tuna.tsinghua.edu.cn/simple")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    env = pyindex.uv_environment()
    assert env["UV_DEFAULT_INDEX"] == "https://pypi.tuna.tsinghua.edu.cn/simple"
    assert env["SSL_CERT_FILE"] == str(ca)
    assert pyindex.default_index() == "https://pypi.tuna.tsinghua.edu.cn/simple"
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    assert pyindex.uv_environment()["UV_SYSTEM_CERTS"] == "1"


def test_credentials_never_reach_the_lockfile_or_the_error(tmp_path: Path, fake_uv: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = torch_root(tmp_path, index="https://bob:s3cret@torch.example/whl/cu121")
    monkeypatch.setenv("FAKE_UV_BODY", BODY.replace("torch==2.3.0 ", "torch==2.3.0+cu121 "))
    lock.lock_image(spec, fetch=no_fetch)
    text = spec.lockfile.read_text()
    assert "s3cret" not in text and "bob" not in text
    assert "torch 2.3.0+cu121 from https://torch.example/whl/cu121" in text
    monkeypatch.setenv("FAKE_UV_FAIL", "1")
    with pytest.raises(SameboxError) as err:
        lock.lock_image(spec, fetch=no_fetch)
    assert "s3cret" not in str(err.value) and "https://mirror.example/simple/six/" in str(err.value)
    assert spec.lockfile.read_text() == text  # a failed lock leaves the old one alone


# --- checks that keep a bad lock from being written ----------------------------------------------------------------


@pytest.mark.parametrize(("edit", "message"), [
    (("torch==2.3.0 ", "torch==2.3.1 "), "torch is 2.3.1, the pin is 2.3.0"),
    (("cuda-runtime-cu12==12.1.105", "cuda-runtime-cu12==12.4.127"), "pulls the CUDA 12.4 runtime"),
    (("cudnn-cu12==8.9.2.26", "cudnn-cu12==9.1.0.70"), 'set cudnn = "9.1"'),
    ((f"    --hash=sha256:{H}3\n", ""), "six==1.17.0 has no --hash"),
])
def test_bad_resolution_writes_nothing(tmp_path: Path, fake_uv: Path, monkeypatch: pytest.MonkeyPatch,
                                       edit: tuple[str, str], message: str) -> None:
    spec = torch_root(tmp_path)
    monkeypatch.setenv("FAKE_UV_BODY", BODY.replace(*edit))
    with pytest.raises(SameboxError) as err:
        lock.lock_image(spec, fetch=no_fetch)
    assert message in str(err.value)
    assert not spec.lockfile.exists() and not list(spec.lockfile.parent.glob(".*tmp"))


def test_declared_torch_bound_violation_writes_nothing(tmp_path: Path, fake_uv: Path) -> None:
    spec = torch_root(tmp_path)
    meta = 'Name: six\nVersion: 1.17.0\nProvides-Extra: torch\nRequires-Dist: torch>=2.6; extra == "torch"\n'
    with pytest.raises(SameboxError) as err:
        lock.lock_image(spec, fetch=lambda name, hashes: meta if name == "six" else None)
    assert "six 1.17.0 declares torch>=2.6 (extra 'torch'), but this image has torch 2.3.0" in str(err.value)
    assert "images/constraints/t23.txt" in str(err.value)
    assert not spec.lockfile.exists()


@pytest.mark.slow
def test_cannot_lock_without_the_variant_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    spec = torch_root(tmp_path, index=f"http://127.0.0.1:{port}/whl/cu121")
    with pytest.raises(SameboxError, match=rf"cannot lock t23 here: needs http://127.0.0.1:{port}/whl/cu121"):
        lock.lock_image(spec)
    assert not spec.lockfile.exists()


def test_bad_inputs(tmp_path: Path, fake_uv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = torch_root(tmp_path)
    assert main(["lock", "--image", "nope", "--root", str(tmp_path)]) == 2
    assert "known images: t23" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lock", "--image", "t23", "--all"])
    spec.lockfile.parent.mkdir()
    spec.lockfile.write_text("# my own pins\nsix==1.0\n")
    with pytest.raises(SameboxError, match="refusing to overwrite"):
        lock.lock_image(spec, fetch=no_fetch)
    spec.lockfile.unlink()
    spec.requirements_in.unlink()
    with pytest.raises(SameboxError, match="requirements.in not found"):
        lock.lock_image(spec, fetch=no_fetch)


# --- the gate before `samebox image` and `samebox render` ----------------------------------------------------------


def _edit_a_pin(spec: ImageSpec) -> None:
    """A pin changed by hand: the header's content-sha256 no longer matches (the inputs still do)."""
    text = spec.lockfile.read_text()
    first = lockfile.parse_lock(text)[0]
    spec.lockfile.write_text(text.replace(f"{first.block.split()[0]} ", f"{first.name}==0.0.0 ", 1))


BUILDS = {"image": ["--engine", "none"], "render": []}


@pytest.mark.parametrize("command", sorted(BUILDS))
def test_a_stale_lock_stops_image_and_render(tmp_path: Path, command: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    spec = fixture_root(tmp_path)
    _edit_a_pin(spec)
    assert lock.check_lock(spec).state == "stale"
    argv = [command, "--root", str(spec.root), "--image", spec.id, "--output", str(tmp_path / "out"),
            *BUILDS[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stale lockfile" in err and str(spec.lockfile) in err and "content-sha256" in err
    assert f"`samebox lock --root {spec.root} --image {spec.id}`" in err and "--allow-stale" in err
    assert not (tmp_path / "out").exists()
    # A changed input (requirements.in) is stale too, and says so.
    spec.requirements_in.write_text(spec.requirements_in.read_text() + "extra-pkg\n")
    assert main(argv) == 2
    assert "inputs changed" in capsys.readouterr().err and not (tmp_path / "out").exists()

    assert main(argv + ["--allow-stale"]) == 0
    captured = capsys.readouterr()
    assert f"samebox: warning: {spec.lockfile} is stale: inputs changed" in captured.err
    assert f"(--allow-stale; `samebox lock --root {spec.root} --image {spec.id}` regenerates it)" in captured.err
    context = tmp_path / "out" if command == "image" else tmp_path / "out" / spec.id
    assert (context / "Dockerfile").is_file()


def test_render_all_names_every_stale_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    specs = load_catalog(fixture_root(tmp_path).root)
    for spec in specs:
        _edit_a_pin(spec)
    out = tmp_path / "out"
    assert main(["render", "--all", "--root", str(specs[0].root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(f"`samebox lock --root {s.root} --image {s.id}`" in err for s in specs) and not out.exists()
    assert main(["render", "--all", "--root", str(specs[0].root), "--output", str(out), "--allow-stale"]) == 0
    assert err.count("content-sha256") == len(specs) and (out / "docker-bake.json").is_file()


@pytest.mark.parametrize("target", ["image", "render"])
def test_make_forwards_allow_stale(target: str) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    for extra, expected in (([], False), (["ALLOW_STALE=1"], True)):
        out = subprocess.run(["make", "-n", target, "TORCH=2.3", *extra], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and ("--allow-stale" in out.stdout) is expected, out.stderr


def test_fresh_locks_pass_the_gate_quietly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = fixture_root(tmp_path)
    assert lock.require_fresh_locks([spec]) == []
    assert main(["render", "--root", str(spec.root), "--image", spec.id, "--print"]) == 0
    assert "warning" not in capsys.readouterr().err


# --- readers --------------------------------------------------------------------------------------------------------


def test_readers(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text(BODY.replace("six==", "Six_Pkg==") + f"nvidia-ml-py==13.0 \\\n    --hash=sha256:{H}6\n"
                    f"triton==3.0.0 \\\n    --hash=sha256:{H}7\n")
    assert lockfile.read_lock(path) == {"nvidia-cuda-runtime-cu12": "12.1.105", "nvidia-cudnn-cu12": "8.9.2.26",
                                        "six-pkg": "1.17.0", "torch": "2.3.0", "nvidia-ml-py": "13.0",
                                        "triton": "3.0.0"}
    packages = {p.name: p for p in lockfile.parse_lock(path.read_text())}
    assert packages["torch"].hashes == {f"{H}4", f"{H}5"}
    assert packages["torch"].block == f"torch==2.3.0 \\\n    --hash=sha256:{H}4 \\\n    --hash=sha256:{H}5"
    # What a setup run installs on an instance: everything but the platform's torch, triton and CUDA libraries.
    assert [p.name for p in drift.read_pins(path) if not p.platform_provided] == ["six-pkg", "nvidia-ml-py"]
    with pytest.raises(SameboxError, match="lockfile not found"):
        lockfile.read_lock(tmp_path / "missing.txt")




# --- the committed lockfiles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", [None, TEST_ROOT], ids=["catalog", "test-catalog"])
def test_committed_lockfiles_are_fresh_and_hashed(root: Path | None) -> None:
    specs = load_catalog(root)
    assert main(["lock", "--check"] + (["--root", str(root)] if root else [])) == 0
    for spec in specs:
        text = spec.lockfile.read_text()
        packages = lockfile.parse_lock(text)
        assert packages and all(p.hashes for p in packages), spec.id
        for line in text.splitlines():  # nothing but comments, requirement lines and their hashes
            assert line.startswith("#") or line.strip().startswith(("--hash=sha256:", "# via", "#   ")) \
                or lockfile.REQUIREMENT.match(line), f"{spec.id}: {line!r}"
        locked = {p.name: p.version for p in packages}
        if spec.has_torch:
            assert locked["torch"] == lock.torch_pin(spec).removeprefix("torch==")
            assert lock.cuda_runtime(locked) == spec.cuda and lock.cudnn_version(locked) == spec.cudnn
            installs = {p.name for p in drift.read_pins(spec.lockfile) if not p.platform_provided}
            assert installs and "torch" not in installs and "triton" not in installs
            assert not any(n.startswith("nvidia-") and n != "nvidia-ml-py" for n in installs), spec.id


def test_a_torch_floor_leaves_a_requirement_out_of_older_images(tmp_path: Path, fake_uv: Path) -> None:
    spec = torch_root(tmp_path)  # torch 2.3
    spec.requirements_in.write_text("six\nliger-kernel  # samebox: torch>=2.5 (needs a newer triton)\n"
                                    "older-ok  # samebox: torch>=2.1\n")
    text, dropped = lock.requirements_for(spec)
    assert dropped == ["liger-kernel"] and "older-ok" in text and "liger" not in text
    lock.lock_image(spec, fetch=no_fetch)
    args = fake_uv.read_text().splitlines()
    assert args[2] != "images/requirements.in"  # uv resolved the filtered copy...
    assert "samebox-lock-" in args[2] and args[2] not in spec.lockfile.read_text()  # ...not named in the lock


@pytest.mark.parametrize("root", [None], ids=["catalog"])
def test_liger_is_locked_exactly_where_its_triton_fits(root: Path | None) -> None:
    for spec in load_catalog(root):
        locked = {p.name for p in lockfile.parse_lock(spec.lockfile.read_text())}
        assert ("liger-kernel" in locked) == (Version(spec.torch) >= Version("2.5")), spec.id
