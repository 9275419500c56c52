"""The trainer's library imports (trainer.model.load.import_libraries for an NF4 config: peft, transformers' model
classes, the fused layers, bitsandbytes) with torch.compile deferred to each function's first call
(builder/core/lazy_compile.py) against the same imports as they were, side by side: fresh interpreters, alternated,
torch imported before the clock starts in both.

    .venv/bin/python bench/imports_cpu.py [--runs 5] [--out bench/results/imports_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from header import header  # noqa: E402

CHILD = """
import sys, time
import torch
from builder.core import lazy_compile
if sys.argv[1] == "as_before":
    import contextlib
    lazy_compile.compile_on_first_call = contextlib.nullcontext
from trainer.config import ModelConfig
from trainer.model import load
began = time.perf_counter()
load.import_libraries(ModelConfig(name="x", quantization="nf4"))
print(round(time.perf_counter() - began, 3), "torch._inductor.compile_fx" in sys.modules)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "imports_cpu.json"))
    opts = p.parse_args()
    repo = Path(__file__).resolve().parent.parent
    seconds: dict[str, list[float]] = {"as_before": [], "deferred": []}
    inductor: dict[str, bool] = {}
    for _ in range(opts.runs):
        for arm in seconds:
            out = subprocess.run([sys.executable, "-c", CHILD, arm], cwd=repo, capture_output=True, text=True,
                                 check=True).stdout.split()
            seconds[arm].append(float(out[-2]))
            inductor[arm] = out[-1] == "True"
    medians = {arm: statistics.median(v) for arm, v in seconds.items()}
    doc = {"header": header(" ".join(["python", *sys.argv])), "benchmark": __doc__.split("\n\n")[0].replace("\n", " "),
           "runs": opts.runs, "seconds": seconds, "median_s": medians, "inductor_imported": inductor,
           "deferred_vs_as_before": round(medians["deferred"] / medians["as_before"], 3)}
    Path(opts.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_s", "inductor_imported", "deferred_vs_as_before")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
