"""builder/core/environment.py: the one probe of the instance, and the one spelling of a compute capability."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from builder.core.environment import Capability, Environment, TorchBuild, probe_torch
from tests.conftest import REPO


@pytest.mark.parametrize("spelling", ["9.0", "90", "sm_90", "sm_90a", "compute_90", [9, 0], (9, 0), " 9.0 "])
def test_every_spelling_of_a_capability_is_one_value(spelling) -> None:
    cap = Capability.parse(spelling)
    assert cap == Capability(9, 0) and (str(cap), cap.sm, cap.digits, cap.as_list()) == ("9.0", "sm_90", "90", [9, 0])


def test_capabilities_of_two_digit_majors_order_and_run_rules() -> None:
    assert Capability.parse("120") == Capability.parse("sm_120") == Capability(12, 0)
    assert Capability.parse("sm_100a") == Capability(10, 0)
    assert Capability(8, 6) > Capability(8, 0) and Capability(12, 0) > Capability(9, 0)
    assert Capability(8, 6).runs("8.0") and not Capability(8, 0).runs("8.6")
    assert not Capability(9, 0).runs("8.0"), "SASS runs only within its major"


@pytest.mark.parametrize("bad", ["9", "nine", "9.x", "", [9], "sm_"])
def test_a_wrong_capability_says_how_to_write_one(bad) -> None:
    with pytest.raises(ValueError, match="write it like 8.0"):
        Capability.parse(bad)
    assert Capability.maybe(bad) is None


def test_the_probe_of_this_interpreter() -> None:
    env = Environment.probe(torch=True, gpus=False, distributions=True)
    assert env.python == f"{sys.version_info.major}.{sys.version_info.minor}" and env.executable == sys.executable
    assert env.torch is not None and env.torch_version.startswith("2.") and not env.torch.error
    names = dict(env.distributions)
    assert names["torch"].split("+")[0] == env.torch.public
    assert json.loads(json.dumps(env.to_dict()))["torch_version"] == env.torch_version
    assert probe_torch(devices=True).cuda_available in (True, False)


def test_a_broken_torch_is_a_note_not_a_crash(tmp_path) -> None:
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    code = ("from builder.core.environment import Environment; e = Environment.probe(gpus=False); "
            "print(e.torch_version, '|', e.notes[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}).stdout
    assert out.startswith("none | torch is installed but does not import: OSError: libcudart.so.12")


def test_the_environment_layer_imports_the_standard_library_only() -> None:
    """The setup script runs it on the platform's bare Python, before anything is installed."""
    code = ("import sys; import builder.core.environment, builder.core.catalog; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jinja2', 'packaging', 'torch', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_torch_build_parts() -> None:
    build = TorchBuild(version="2.3.0+cu121", cuda="12.1.105", arch_list=("compute_90", "sm_80", "sm_90"))
    assert (build.local, build.public, build.cuda_minor) == ("cu121", "2.3.0", "12.1")
    assert build.sass() == (Capability(8, 0), Capability(9, 0))


def test_an_unchanged_torch_is_not_imported_again_to_be_described(tmp_path) -> None:
    """setup, fingerprint and verify each ask what torch is; the second asker reads the first one's answer, as long
    as the torch that imports is the RECORD's (a shadowing torch on PYTHONPATH is imported and reported)."""
    code = ("import sys; from builder.core.environment import probe_torch; b = probe_torch(); "
            "print(b.version, b.cuda, 'torch' in sys.modules)")
    (tmp_path / "state").mkdir()
    env = {"PATH": "/usr/bin:/bin", "SAMEBOX_STATE": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert first.split()[-1] == "True" and second.split()[-1] == "False"
    assert first.split()[:2] == second.split()[:2]
    # another loader path can load another cuDNN: torch is asked again
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**env, "LD_LIBRARY_PATH": str(tmp_path)}).stdout
    assert other.split()[-1] == "True"
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    code = "from builder.core.environment import probe_torch; print(probe_torch().error)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": f"{tmp_path / 'shadow'}:{REPO}"}).stdout
    assert "libcudart" in out


def test_a_second_instance_of_the_region_reads_the_torch_report_the_first_kept(tmp_path) -> None:
    """setup.sh points $SAMEBOX_FILE_CHECKS at the region's shared disk: an instance with an empty state (a clone, a
    second instance) reads the report another instance of the same torch kept there, and keeps it in its own state;
    another torch (another loader path here) is imported and reported."""
    code = ("import sys; from builder.core.environment import probe_torch; b = probe_torch(); "
            "print(b.version, b.cuda, 'torch' in sys.modules)")
    region = tmp_path / "region" / "samebox"
    region.mkdir(parents=True)
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SAMEBOX_FILE_CHECKS": str(region / "file-checks.json")}

    def probe(state: str, **extra: str) -> list[str]:
        (tmp_path / state).mkdir(exist_ok=True)
        env = {**base, "SAMEBOX_STATE": str(tmp_path / state), **extra}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout.split()

    first = probe("one")
    assert first[-1] == "True"
    shared = json.loads((region / "torch-builds.json").read_text())["builds"]
    assert len(shared) == 1 and shared[0]["build"]["version"] == first[0]
    second = probe("two")
    assert second == [*first[:2], "False"]
    assert json.loads((tmp_path / "two" / "torch-build.json").read_text())["build"]["version"] == first[0]
    assert probe("three", LD_LIBRARY_PATH=str(tmp_path))[-1] == "True"
    assert len(json.loads((region / "torch-builds.json").read_text())["builds"]) == 2
    # an unreadable shared file is no report: torch is asked again
    (region / "torch-builds.json").write_text("{not json")
    assert probe("four")[-1] == "True"


def test_an_instance_that_knew_its_torch_before_the_region_did_tells_the_region(tmp_path) -> None:
    code = "from builder.core.environment import probe_torch; print(probe_torch().version)"
    (tmp_path / "state").mkdir()
    region = tmp_path / "region"
    region.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SAMEBOX_STATE": str(tmp_path / "state")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    assert not (region / "torch-builds.json").exists()
    env["SAMEBOX_FILE_CHECKS"] = str(region / "file-checks.json")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    assert len(json.loads((region / "torch-builds.json").read_text())["builds"]) == 1


def test_the_torch_report_is_keyed_by_torch_and_its_native_libraries_not_its_python_requirements(tmp_path) -> None:
    """setup reinstalls torch's pure-Python requirements (filelock, ...) at the lock's versions between its checks and
    its fingerprint: that keeps the report; another cuDNN does not."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("__version__ = '9.9.0'\n")
    records = {}
    for dist, requires in (("torch-9.9.0", ["filelock", "nvidia-cudnn-cu12==9.1"]), ("filelock-3.0", []),
                           ("nvidia_cudnn_cu12-9.1", [])):
        info = site / f"{dist}.dist-info"
        info.mkdir()
        name, version = dist.rsplit("-", 1)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        records[name] = info / "RECORD"
        records[name].write_text(f"{info.name}/METADATA,,\n")
    code = "from builder.core.environment import _torch_keys; print(_torch_keys()[1])"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{REPO}"}

    def key() -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout.strip()

    first = key()
    assert "nvidia_cudnn_cu12-9.1.dist-info/RECORD" in first and "filelock" not in first
    records["filelock"].write_text("another filelock\n")
    assert key() == first
    records["nvidia_cudnn_cu12"].write_text("another cudnn\n")
    assert key() != first
