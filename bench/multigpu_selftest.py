"""The self-test's all-reduce check on a machine with two or more GPUs, in one run: the busbw part of
bench/results/multigpu.json.

    python bench/multigpu_selftest.py --out $OUT/multigpu_selftest.json

Writes: the machine (GPUs, driver, torch, NCCL, `nvidia-smi topo -m`); the local all-reduce (torch.multiprocessing,
NCCL) at 2..n GPUs with 256 MiB and a size sweep at n GPUs, each judged by the check; the same with
NCCL_P2P_DISABLE=1; the all-reduce across torchrun's ranks; and `samebox selftest --quick --json` run plainly and
under torchrun, with exit codes and wall times. Each part survives the others failing.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SIZES_MIB = (1, 16, 64, 256, 1024)


def machine() -> dict[str, Any]:
    import torch

    smi = shutil.which("nvidia-smi")
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_cores": os.cpu_count(),
    }
    if smi:
        info["driver"] = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split()[:1]
        info["topo"] = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True).stdout
    return info


def judged(reading: dict[str, Any], nvml: dict[str, Any]) -> list[dict[str, str]]:
    """The self-test's all-reduce check on one reading, with this machine's NVML reading for its topology: the
    readings it judges, each under its probe's name (torch's says the GPU probes ran)."""
    from builder.selftest.checks_interconnect import allreduce
    from builder.selftest.probes import ALLREDUCE, NVML, TORCH

    readings = {NVML.name: nvml, TORCH.name: {"cuda_available": True}, ALLREDUCE.name: reading}
    return [f.to_dict() for f in allreduce(readings)]


def local_runs(
    n: int, nvml: dict[str, Any], env: dict[str, str], backend: str = "nccl", sizes: tuple[int, ...] = SIZES_MIB
) -> dict[str, Any]:
    """The local check at 2..n GPUs (256 MiB; the smoke run 4) and a size sweep at n, with ``env`` set for the
    ranks."""
    from builder.selftest.allreduce import local_allreduce

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the spawned ranks inherit this process's environment
    try:
        out: dict[str, Any] = {"env": env, "by_gpus": {}, "by_size_mib": {}}
        for world in range(2, n + 1):
            reading = local_allreduce(world, backend, size_mib=sizes[-2], iters=30, timeout_s=120)
            out["by_gpus"][world] = {"reading": reading, "findings": judged(reading, nvml)}
            print(f"{env or 'default'} {world} GPUs: busbw {reading.get('busbw_gbps')}", flush=True)
        for size in sizes:
            reading = local_allreduce(n, backend, size_mib=size, iters=30, timeout_s=120)
            out["by_size_mib"][size] = {k: reading.get(k) for k in ("busbw_gbps", "algbw_gbps", "timed_out", "error")}
        return out
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rank_probe(out_dir: Path, backend: str | None) -> None:
    """Run under torchrun: this rank's all-reduce reading -> OUT_DIR/rank<RANK>.json."""
    from builder.selftest.allreduce import torchrun_allreduce

    reading = torchrun_allreduce(backend=backend, size_mib=256, iters=30, timeout_s=120)
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(reading))


def run(argv: list[str], timeout: float = 300) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"argv": argv, "timed_out": True, "wall_s": round(time.perf_counter() - start, 2)}
    return {
        "argv": argv,
        "exit_code": p.returncode,
        "wall_s": round(time.perf_counter() - start, 2),
        "stdout": p.stdout[-20000:],
        "stderr": p.stderr[-4000:],
    }


def torchrun(n: int, backend: str = "nccl") -> dict[str, Any]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    with tempfile.TemporaryDirectory() as d:
        probe = run([*launcher, str(Path(__file__).resolve()), "--rank-probe", d, "--backend", backend])
        probe["ranks"] = [json.loads(p.read_text()) for p in sorted(Path(d).glob("rank*.json"))]
    probe.pop("stdout", None)
    selftest = run([*launcher, "-m", "builder", "selftest", "--quick"])
    return {"allreduce": probe, "selftest_quick": selftest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: gloo, two processes, no self-test")
    parser.add_argument("--rank-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="nccl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_probe:
        rank_probe(args.rank_probe, args.backend)
        return 0
    import torch

    from builder.core.nvml import read_nvml

    backend = "gloo" if args.smoke else "nccl"
    n = 2 if args.smoke else torch.cuda.device_count()
    sizes = (1, 4, 16) if args.smoke else SIZES_MIB
    result: dict[str, Any] = {
        "command": "python bench/multigpu_selftest.py --out $OUT/multigpu_selftest.json",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
    }
    if n < 2:
        result["error"] = f"{n} GPU(s): this benchmark needs two or more"
    else:
        nvml = read_nvml()
        result["nvml_nvlink_active"] = [d.get("nvlink_active") for d in nvml.get("devices", [])]
        parts = (
            ("local", lambda: local_runs(n, nvml, {}, backend, sizes)),
            ("local_p2p_disabled", lambda: local_runs(n, nvml, {"NCCL_P2P_DISABLE": "1"}, backend, sizes)),
            ("torchrun", lambda: torchrun(n, backend)),
            ("selftest_quick", lambda: run([sys.executable, "-m", "builder", "selftest", "--quick", "--json"])),
        )[: 3 if args.smoke else 4]
        for name, fn in parts:
            try:
                result[name] = fn()
            except Exception as e:  # one broken part must not lose the others
                result[name] = {"bench_error": f"{type(e).__name__}: {e}"}
    text = json.dumps(result, indent=1, default=str) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
