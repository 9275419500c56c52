"""Everything `samebox selftest` needs from the GPU machine, in one run.

    python bench/selftest_gpu.py --capture DIR [--wheels DIR]
        records the readings of a healthy machine as fixtures: DIR/{quick,full,no_visible_devices}.json and
        DIR/nvidia-smi-q.txt (the tests' fixtures under tests/fixtures/nvml/ are made from these).
    python bench/selftest_gpu.py --out FILE [--wheels DIR] [--sm80-extension PATH]
        runs quick and full (timed), then each injected fault, and writes one JSON report.

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
        "from builder.selftest.model import attention_needs; "
        f"print(json.dumps(collect({mode!r}, attention_needs(None), {data_dir!r}), default=str))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        return {"subprocess_error": out.stderr[-4000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def capture(out_dir: Path) -> None:
    from builder.selftest.model import attention_needs
    from builder.selftest.readings import collect

    out_dir.mkdir(parents=True, exist_ok=True)
    smi = shutil.which("nvidia-smi")
    if smi:
        (out_dir / "nvidia-smi-q.txt").write_text(
            subprocess.run([smi, "-q"], capture_output=True, text=True).stdout
        )
    with tempfile.TemporaryDirectory() as data_dir:
        for mode in ("quick", "full"):
            start = time.perf_counter()
            readings = collect(mode, attention_needs(None), data_dir)
            readings["capture_seconds"] = time.perf_counter() - start
            write_json(out_dir / f"{mode}.json", readings)
            print(f"captured {mode} in {readings['capture_seconds']:.1f}s", flush=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        write_json(out_dir / "no_visible_devices.json", readings_subprocess("quick", env, data_dir))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--capture", type=Path, help="write healthy-machine readings (fixtures) into this dir"
    )
    parser.add_argument("--out", type=Path, help="write the quick/full/fault-injection report to this file")
    parser.add_argument(
        "--wheels", type=Path, help="dir of flash-attn / bitsandbytes wheels to unpack for this run"
    )
    parser.add_argument("--sm80-extension", type=Path, help="flash-attn wheel or .so built for sm_80 only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as site:
        unpacked = unpack_wheels(args.wheels, Path(site))
        print(f"unpacked wheels: {unpacked}", flush=True)
        if args.capture:
            capture(args.capture)
        if args.out:
            from bench.selftest_faults import run_all  # noqa: PLC0415 - only the --out mode needs it

            write_json(args.out, run_all(unpacked, args.sm80_extension))
    return 0


if __name__ == "__main__":
    sys.exit(main())
