"""How long `make test` (the fast tier) takes on this machine, and how many tests it runs, beside the whole suite's
count: one results file with the fixed header. The full tier (`make test-all`, what CI runs) is timed by CI itself.

  .venv/bin/python bench/test_tiers.py --out bench/results/test_tiers.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from header import REPO, header  # noqa: E402

FAST = "not slow and not integration and not docker"


def count(marker: str | None) -> int:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", *(["-m", marker] if marker else [])]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).stdout
    found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", out)
    return int(found.group(1)) if found else -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t = time.perf_counter()
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "builder", "trainer", "tests", "bench"], cwd=REPO,
                          capture_output=True, text=True)
    lint_s = time.perf_counter() - t
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-m", FAST], cwd=REPO,
                         capture_output=True, text=True)
    tests_s = time.perf_counter() - t
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
    result = {"header": header("python bench/test_tiers.py " + " ".join(sys.argv[1:])),
              "fast_tier": {"command": f'ruff check ...; pytest -q -m "{FAST}"', "exit": run.returncode,
                            "lint_s": round(lint_s, 1), "lint_exit": lint.returncode, "tests_s": round(tests_s, 1),
                            "total_s": round(lint_s + tests_s, 1), "summary": last, "tests": count(FAST)},
              "all_tests": count(None)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["fast_tier"]), "all:", result["all_tests"])
    return run.returncode or lint.returncode


if __name__ == "__main__":
    sys.exit(main())
