"""Run by tests/selftest/test_allreduce.py under torchrun (2 CPU processes, gloo): each rank writes its
all-reduce reading to OUT_DIR/rank<RANK>.json."""

import json
import os
import sys
from pathlib import Path

from builder.selftest.allreduce import torchrun_allreduce

if __name__ == "__main__":
    reading = torchrun_allreduce(backend="gloo", size_mib=1, iters=3, timeout_s=60)
    Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(reading))
