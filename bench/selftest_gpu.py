"""Everything `samebox selftest` needs from the GPU machine, in one run.

    python bench/selftest_gpu.py --capture DIR [--wheels DIR]
        records the readings of a healthy machine as fixtures: DIR/{quick,full,no_visible_devices}.json and
        DIR/nvidia-smi-q.txt.
    python bench/selftest_gpu.py --to-fixtures DIR [--flash-attn-from FILE]
        (on any machine) copies DIR/{quick,full,no_visible_devices}.json over tests/fixtures/nvml/ (quick and
        full become healthy_{quick,full}.json), and FILE's (an --out report) flash-attn reading. Readings of
        version 1 (grouped under "gpu" and "env", as in bench/results/selftest_gpu.json) are written in the
        current layout: each reading at the top level under its probe's name.
    python bench/selftest_gpu.py --out FILE [--wheels DIR] [--sm80-extension PATH]
        runs quick and full (timed; quick first, in a process that has imported nothing heavy yet), then quick as
        the trainer's preflight runs it (`samebox selftest --quick --json` in a fresh interpreter: quick_cli), then
        each injected fault, and writes one JSON report. Each run's report.timings says where its time went.

--wheels DIR: flash-attn / bitsandbytes wheels to unpack into a temporary site dir for this run (the GPU
machine has neither installed). --sm80-extension: a flash-attn wheel or flash_attn_2_cuda*.so built for sm_80
only; without it that fault is reported n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures" / "nvml"
# Readings version 1 grouped the probes under "gpu" and "env"; these four were renamed in version 2.
V1_GROUPS = ("gpu", "env")
PARTS = ("quick", "full", "quick_cli", "faults")  # --parts: what --out runs (faults need quick's readings)
V1_RENAMED = {"accuracy": "matmul_accuracy", "sdpa": "sdpa_backends", "fused": "fused_layers", "lock": "lockfile"}


def unpack_wheels(wheels: Path | None, target: Path) -> list[str]:
    """Unzips each wheel into ``target`` (a wheel is a zip of its site-packages tree) and puts it on the path
    of this process and of its subprocesses."""
    if wheels is None:
        return []
    names = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(target)
        names.append(whl.name)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return names


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def readings_subprocess(mode: str, env: dict[str, str], data_dir: str) -> dict:
    """Collects readings in a fresh interpreter: CUDA_VISIBLE_DEVICES counts only before CUDA starts."""
    code = (
        "import json,sys; from builder.selftest.readings import collect; "
        "from builder.core.attention_needs import attention_needs; "
        f"print(json.dumps(collect({mode!r}, attention_needs(None), {data_dir!r}), default=str))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"subprocess_error": out.stderr[-4000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def capture(out_dir: Path) -> None:
    from builder.core.attention_needs import attention_needs
    from builder.selftest.readings import collect

    out_dir.mkdir(parents=True, exist_ok=True)
    smi = shutil.which("nvidia-smi")
    if smi:
        (out_dir / "nvidia-smi-q.txt").write_text(subprocess.run([smi, "-q"], capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory() as data_dir:
        for mode in ("quick", "full"):
            start = time.perf_counter()
            readings = collect(mode, attention_needs(None), data_dir)
            readings["capture_seconds"] = time.perf_counter() - start
            write_json(out_dir / f"{mode}.json", readings)
            print(f"captured {mode} in {readings['capture_seconds']:.1f}s", flush=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        write_json(out_dir / "no_visible_devices.json", readings_subprocess("quick", env, data_dir))


STANDIN_CU = r"""
#include <cuda_runtime.h>
__global__ void k(int *x) { if (x) *x = 1; }
extern "C" const char *launch() {
    k<<<1, 1>>>(nullptr);
    return cudaGetErrorString(cudaGetLastError());
}
"""


def timed_selftest(mode: str, data_dir: str) -> dict:
    from builder.selftest import run_selftest

    start = time.perf_counter()
    report = run_selftest(mode, data_dir=data_dir)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "report": report.to_dict(), "text": report.format(), "readings": report.readings}


def timed_cli(data_dir: str) -> dict:
    """`samebox selftest --quick --json` as the trainer's preflight runs it: a fresh interpreter, wall time included."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "builder", "selftest", "--quick", "--json", "--data-dir", data_dir],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    result: dict = {"wall_s": round(time.perf_counter() - start, 2), "exit_code": out.returncode}
    try:
        report = json.loads(out.stdout)
        result.update(duration_s=report["duration_s"], timings=report["timings"], summary=report["summary"])
    except (json.JSONDecodeError, KeyError):
        result["stderr"] = out.stderr[-3000:]
    return result


def findings_of(report: dict, check: str) -> list[dict]:
    return [f for f in report["findings"] if f["check"] == check]


def judged(readings: dict, check: str) -> list[dict]:
    from builder.selftest import report_from_readings

    return findings_of(report_from_readings(readings).to_dict(), check)


def fault_no_visible_devices() -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "builder", "selftest", "--quick", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = {
        "injected": 'CUDA_VISIBLE_DEVICES="" samebox selftest --quick --json',
        "exit_code": out.returncode,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    try:
        report = json.loads(out.stdout)
        result["findings"] = [f for f in report["findings"] if f["severity"] == "fail"]
    except json.JSONDecodeError:
        result["stderr"] = out.stderr[-3000:]
    return result


def fault_lock_drift(healthy: dict) -> dict:
    from importlib import metadata

    from builder.selftest import env_probes

    pins = [f"{name}=={metadata.version(name)}" for name in ("transformers", "peft", "safetensors")]
    pins[0] = "transformers==4.40.0"  # the injected drift: the lock says another transformers
    with tempfile.TemporaryDirectory() as d:
        lock = Path(d) / "drifted.txt"
        lock.write_text("# injected fault: transformers pinned to a version not installed\n" + "\n".join(pins) + "\n")
        readings = {**healthy, "lockfile": env_probes.lockfile_reading(str(lock), healthy["torch"].get("version"))}
        return {"injected": f"lockfile pinning {', '.join(pins)}", "findings": judged(readings, "lockfile")}


def _readonly_mount() -> str | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, point, _fs, opts, *_ = line.split()
        if "ro" in opts.split(",") and os.path.isdir(point) and not point.startswith("/proc"):
            return point
    return None


def _mount(*args: str) -> str | None:
    """Runs mount; None on success, else why not (no root, no mount in this container)."""
    try:
        out = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return str(e)
    return None if out.returncode == 0 else out.stderr.strip() or f"exit {out.returncode}"


def fault_data_dir(healthy: dict) -> dict:
    """--data-dir on a 1 MiB tmpfs and on a read-only bind mount (or an existing read-only mount)."""
    from builder.selftest import env_probes

    results, mounted = [], []
    with tempfile.TemporaryDirectory() as d:
        tiny, ro = Path(d) / "tiny", Path(d) / "ro"
        tiny.mkdir()
        ro.mkdir()
        try:
            targets = []
            why = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny))
            if why is None:
                mounted.append(tiny)
                targets.append(("1 MiB tmpfs", str(tiny)))
            else:
                results.append({"injected": "1 MiB tmpfs", "skipped": f"mount failed: {why}"})
            why = _mount("--bind", d, str(ro))
            if why is None:
                mounted.append(ro)
                why = _mount("-o", "remount,ro,bind", str(ro))
            if why is None:
                targets.append(("read-only bind mount", str(ro)))
            elif _readonly_mount():
                targets.append((f"read-only filesystem {_readonly_mount()}", str(_readonly_mount())))
            for label, path in targets:
                readings = {**healthy, "data_dir": env_probes.data_dir(path)}
                results.append({"injected": f"--data-dir on a {label}", "findings": judged(readings, "data_dir")})
        finally:
            for point in reversed(mounted):
                subprocess.run(["umount", str(point)], check=False)
    return {"cases": results}


def fault_sliding_window_slim(healthy: dict) -> dict:
    from builder.core.attention_needs import attention_needs
    from builder.selftest import kernel_probes

    with tempfile.TemporaryDirectory() as d:
        config = {
            "model_type": "mistral",
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "head_dim": 128,
            "sliding_window": 4096,
            "torch_dtype": "bfloat16",
        }
        (Path(d) / "config.json").write_text(json.dumps(config))
        needs = attention_needs(d)
        reading = kernel_probes.flash_attn(list(needs.head_dims), needs.dtype, needs.window)
    readings = {**healthy, "model": needs.to_dict(), "flash_attn": reading}
    result = {
        "injected": "--model config with sliding_window=4096 (Mistral-like)",
        "flash_attn_version": reading.get("dist_version") or reading.get("version"),
        "findings": judged(readings, "flash_attn"),
    }
    if not reading.get("installed"):
        result["note"] = "n/a: flash-attn is not installed here (carry a slim wheel with --wheels)"
    return result


def _standin_extension(work: Path) -> tuple[str | None, str | None]:
    """A CUDA library built for sm_80 only with nvcc, and the error its kernel launch really gives here."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if not nvcc:
        return None, None
    src, so = work / "standin.cu", work / "standin_sm80.so"
    src.write_text(STANDIN_CU)
    build = subprocess.run(
        [nvcc, "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=sm_80", "-o", str(so), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0:
        return None, build.stderr[-500:]
    import ctypes

    lib = ctypes.CDLL(str(so))
    lib.launch.restype = ctypes.c_char_p
    return str(so), lib.launch().decode()


def fault_sm80_flash_attn(healthy: dict, sm80: Path | None) -> dict:
    from builder.selftest import kernel_probes

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        error = None
        if sm80 and sm80.suffix == ".whl":
            with zipfile.ZipFile(sm80) as z:
                names = [n for n in z.namelist() if n.startswith("flash_attn_2_cuda") and n.endswith(".so")]
                z.extract(names[0], work)
                extension, source = str(work / names[0]), f"wheel {sm80.name}"
        elif sm80:
            extension, source = str(sm80), f"extension {sm80}"
        else:
            extension, error = _standin_extension(work)
            source = "stand-in CUDA library built here with nvcc for sm_80 only"
        if not extension:
            return {
                "injected": "flash-attn for sm_80 only",
                "severity": "n/a",
                "note": f"no --sm80-extension given and no nvcc to build a stand-in ({error})",
            }
        archs = kernel_probes.elf_archs(extension)
        reading = {
            "installed": True,
            "version": "sm_80-only",
            "extension": extension,
            "elf_archs": archs,
            "head_dims": [64, 128],
            "dtype": "bfloat16",
            "window": None,
            "cases": {"128": {"error": error}} if error else {},
            "features": {},
        }
        readings = {**healthy, "flash_attn": reading}
        result = {
            "injected": f"flash-attn extension with SASS for sm_80 only ({source})",
            "elf_archs": archs,
            "findings": judged(readings, "flash_attn"),
        }
        if error:
            result["launch_error"] = error
            # The same readings without cuobjdump's answer: the 'no kernel image' message alone must be caught.
            reading_no_elf = {**reading, "elf_archs": None}
            result["findings_from_launch_error"] = judged({**healthy, "flash_attn": reading_no_elf}, "flash_attn")
        return result


def run_all(unpacked: list[str], sm80: Path | None, parts: tuple[str, ...] = PARTS) -> dict:
    out: dict = {"wheels": unpacked, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": list(parts)}
    with tempfile.TemporaryDirectory() as data_dir:
        for mode in ("quick", "full"):
            if mode not in parts:
                continue
            out[mode] = timed_selftest(mode, data_dir)
            timings = sorted(out[mode]["report"]["timings"].items(), key=lambda kv: -kv[1])[:6]
            print(f"{mode}: {out[mode]['wall_s']}s, {out[mode]['report']['summary']}, slowest {timings}", flush=True)
        if "quick_cli" in parts:
            out["quick_cli"] = timed_cli(data_dir)
            print(f"quick_cli: {out['quick_cli']['wall_s']}s (exit {out['quick_cli']['exit_code']})", flush=True)
    if "faults" not in parts:
        return out
    healthy = out["quick"]["readings"]
    faults = {}
    for name, fn in (
        ("cuda_visible_devices_empty", fault_no_visible_devices),
        ("lock_drift", lambda: fault_lock_drift(healthy)),
        ("data_dir", lambda: fault_data_dir(healthy)),
        ("sliding_window_on_slim_flash_attn", lambda: fault_sliding_window_slim(healthy)),
        ("flash_attn_sm80_only", lambda: fault_sm80_flash_attn(healthy, sm80)),
    ):
        try:
            faults[name] = fn()
        except Exception as e:  # one broken injection must not lose the others' results
            faults[name] = {"bench_error": f"{type(e).__name__}: {e}"}
        print(f"fault {name}: {json.dumps(faults[name], default=str)[:400]}", flush=True)
    out["faults"] = faults
    return out


def as_current(readings: dict) -> dict:
    """``readings`` in the current layout (builder.selftest.readings.READINGS_VERSION): version 1's "gpu" and
    "env" groups become top-level readings under their probes' names (a group of None, the GPU probes of a
    machine without one, adds nothing). Current readings come back unchanged."""
    from builder.selftest.readings import READINGS_VERSION

    if readings.get("readings_version", 1) >= 2:
        return dict(readings)
    out = {k: v for k, v in readings.items() if k not in V1_GROUPS}
    for group in V1_GROUPS:
        for name, reading in (readings.get(group) or {}).items():
            out[V1_RENAMED.get(name, name)] = reading
    out["readings_version"] = READINGS_VERSION
    return out


def gpu_names(readings: dict) -> str:
    return ", ".join(d["name"] for d in (readings.get("nvml") or {}).get("devices") or []) or "no GPU"


def fixture_of_capture(readings: dict, name: str) -> dict:
    """A --capture file's readings as the CI fixture: the current layout, labelled with where they came from."""
    fixture = as_current(readings)
    fixture["fixture_source"] = f"captured by bench/selftest_gpu.py --capture on {gpu_names(fixture)} ({name})"
    return fixture


def flash_attn_fixture(report: dict, report_name: str) -> dict:
    """An --out report's quick flash-attn reading as the CI fixture flash_attn_slim.json."""
    quick = as_current(report["quick"]["readings"])
    return {
        "fixture_source": f"the quick run's flash_attn reading in {report_name} on {gpu_names(quick)}",
        **quick["flash_attn"],
    }


def to_fixtures(capture_dir: Path, run: Path | None = None, fixtures: Path = FIXTURES) -> None:
    """Copies a capture's readings over the fixtures the CI tests judge: quick/full -> healthy_{quick,full},
    no_visible_devices -> no_visible_devices. With ``run`` (a --out report), also its quick run's flash-attn
    reading -> flash_attn_slim.json (the capture may have had no flash-attn installed)."""
    for name, fixture in (("quick", "healthy_quick"), ("full", "healthy_full"), ("no_visible_devices", None)):
        path = capture_dir / f"{name}.json"
        if not path.is_file():
            continue
        readings = fixture_of_capture(json.loads(path.read_text()), name)
        write_json(fixtures / f"{fixture or name}.json", readings)
        print(f"wrote {fixtures / f'{fixture or name}.json'} ({gpu_names(readings)})")
    if run:
        reading = flash_attn_fixture(json.loads(run.read_text()), run.name)
        write_json(fixtures / "flash_attn_slim.json", reading)
        print(f"wrote {fixtures / 'flash_attn_slim.json'} ({reading.get('dist_version')})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", type=Path, help="write healthy-machine readings (fixtures) into this dir")
    parser.add_argument("--to-fixtures", type=Path, help="copy a capture dir's readings over the CI fixtures")
    parser.add_argument("--flash-attn-from", type=Path, help="with --to-fixtures: a --out report whose flash-attn "
                        "reading becomes tests/fixtures/nvml/flash_attn_slim.json")
    parser.add_argument("--out", type=Path, help="write the quick/full/fault-injection report to this file")
    parser.add_argument("--wheels", type=Path, help="dir of flash-attn / bitsandbytes wheels to unpack for this run")
    parser.add_argument("--sm80-extension", type=Path, help="flash-attn wheel or .so built for sm_80 only")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"with --out: comma-separated subset of {','.join(PARTS)} (faults need quick)")
    args = parser.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or ("faults" in parts and "quick" not in parts):
        parser.error(f"--parts {args.parts!r}: choose from {','.join(PARTS)}; faults need quick")
    if args.to_fixtures:
        to_fixtures(args.to_fixtures, args.flash_attn_from)
        return 0
    with tempfile.TemporaryDirectory() as site:
        unpacked = unpack_wheels(args.wheels, Path(site))
        print(f"unpacked wheels: {unpacked}", flush=True)
        if args.capture:
            capture(args.capture)
        if args.out:
            write_json(args.out, run_all(unpacked, args.sm80_extension, parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
