"""`make test-latest`: the trainer and serve tests against the newest releases of the packages samebox supports.

Builds a scratch venv (.venv-latest) from the dev lock, upgrades transformers, peft, accelerate and bitsandbytes to
the newest releases the index has (pip resolves what they pull in), runs tests/trainer and tests/serve there, and
prints a table of locked and newest versions with the tests that broke. Exit 0: nothing broke, the supported range
(builder/data/supported.toml) can move up with `make lock-dev`; exit 1: the listed tests fail on the newest releases.
Not part of CI: its result depends on the day it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.core import supported  # noqa: E402
from builder.core.lockfile import read_lock  # noqa: E402
from builder.image import devlock  # noqa: E402

PIP = ["-m", "pip", "--disable-pip-version-check"]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv-latest"), help="scratch venv (rebuilt each run)")
    ap.add_argument("--extra-index-url", default=None, help="where torch's CPU build comes from, if pip needs it")
    ap.add_argument("--tests", nargs="*", default=["tests/trainer", "tests/serve"])
    args = ap.parse_args()

    env_dir = Path(args.venv)
    venv.EnvBuilder(clear=True, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    extra = ["--extra-index-url", args.extra_index_url] if args.extra_index_url else []
    if run([py, *PIP, "install", "-q", "--require-hashes", "--no-deps", "-r", devlock.DEV_LOCK, *extra]).returncode:
        print("samebox: could not install lockfiles/dev.txt into the scratch venv", file=sys.stderr)
        return 2
    if run([py, *PIP, "install", "-q", "--upgrade", *supported.PACKAGES, *extra]).returncode:
        print("samebox: pip could not install the newest releases (see above)", file=sys.stderr)
        return 2
    run([py, *PIP, "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], check=True)

    locked = read_lock(ROOT / devlock.DEV_LOCK)
    probe = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    newest = json.loads(run([py, "-c", probe, *supported.PACKAGES], capture_output=True, text=True,
                            check=True).stdout)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        tests = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args.tests])
        broke = _failures(report) if report.is_file() else ["(pytest wrote no report)"]
    print()
    print(f"{'package':<14}{'dev lock':<12}{'newest':<12}")
    for name in supported.PACKAGES:
        mark = "" if locked.get(name) == newest[name] else "  <- newer"
        print(f"{name:<14}{locked.get(name, '-'):<12}{newest[name]:<12}{mark}")
    if tests.returncode == 0:
        print("\nnothing broke: `make lock-dev` moves the supported range up to these releases")
        return 0
    print(f"\n{len(broke)} test(s) broke on the newest releases:")
    for name in broke:
        print(f"  {name}")
    return 1


def _failures(report: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    out = []
    for case in ET.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            out.append(f"{case.get('classname')}::{case.get('name')}")
    return out


if __name__ == "__main__":
    sys.exit(main())
