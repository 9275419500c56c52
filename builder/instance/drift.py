"""Drift: how two fingerprints differ, and how the live environment differs from its lockfile.

``diff_fingerprints`` groups differences into environment drift (Python/OS, torch/CUDA, packages added, removed or
changed, files changed inside a package) and, reported apart, differences of the machine (GPU model, driver) and of
settings (selected environment variables, pip configuration), which are not drift.

``verify_lock`` checks the live environment against a lockfile; ``plan_install`` says which locked packages a setup
run still has to install. On an instance torch, triton and nvidia-* come from the platform: they are verified, never
installed. Lockfiles are read by builder/core/lockfile.py's parser. Imports the standard library only: setup.sh runs
``python -m builder.instance.drift`` before anything else is installed.
"""

from __future__ import annotations

import argparse
import shutil
import site
import sys
from pathlib import Path
from typing import Any

from builder.core import environment
from builder.core.errors import SameboxError
from builder.core.lockfile import LockedPackage, read_lock_file
from builder.core.output import text_value
from builder.instance import fingerprint


def read_pins(lockfile: Path) -> list[LockedPackage]:
    """Every `name==version --hash=...` requirement of the lockfile a setup run was given."""
    return read_lock_file(lockfile, "pass a lockfile written by `samebox lock` (lockfiles/<id>.txt)")


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


# --- live environment vs lockfile -------------------------------------------------------------------------------


def _package_problems(pins: list[LockedPackage], check_files: bool = True, rehash: bool = False) -> dict[str, str]:
    """Canonical name -> what is wrong with it in the live environment (absent from the result: fine)."""
    dists = environment.installed_distributions()
    present = {p.name: dists[p.name] for p in pins if p.name in dists}
    modified = fingerprint.check_files(present, cache=fingerprint.default_checks_path(), refresh=rehash) \
        if check_files else {name: [] for name in present}
    problems = {}
    for pin in pins:
        dist = present.get(pin.name)
        if dist is None:
            problems[pin.name] = f"{pin.name} {pin.version} is locked but not installed"
        elif pin.platform_provided and _base_version(dist.version) != _base_version(pin.version):
            problems[pin.name] = (f"{pin.name} {dist.version} comes with the platform but the lock has {pin.version}: "
                                  "this base image is not the one the lock was made for")
        elif not pin.platform_provided and dist.version != pin.version:
            problems[pin.name] = f"{pin.name} is {dist.version}, the lock has {pin.version}"
        elif modified[pin.name]:
            paths = modified[pin.name]
            shown = ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
            problems[pin.name] = f"{pin.name} {dist.version}: {len(paths)} file(s) differ from its RECORD ({shown})"
    return problems


def split_lock_problems(lockfile: Path, check_files: bool = True, rehash: bool = False) -> tuple[list[str], list[str]]:
    """(drift, platform): problems of the packages samebox installs (and of torch itself), and version differences
    of the other libraries the platform ships with its torch (nvidia-*, triton, cuda-*), which setup keeps as
    they are: those say the base image differs from the one the lock was made for, not that the environment drifted.
    """
    pins = read_pins(lockfile)
    if not pins:
        return [f"{lockfile}: no pinned requirements found"], []
    problems = _package_problems(pins, check_files, rehash)
    platform_libs = {p.name for p in pins if p.platform_provided and p.name != "torch"}
    drift = [problems[n] for n in sorted(problems) if n not in platform_libs]
    platform = [problems[n] for n in sorted(problems) if n in platform_libs]
    return drift, platform


def verify_lock(lockfile: Path, torch: str = "", check_files: bool = True, rehash: bool = False) -> list[str]:
    """Problems of the live environment against ``lockfile``, one line each; empty when it matches.

    ``torch`` is the torch.__version__ the catalog entry expects ('2.3.0+cu121'); when given, the local tag is
    checked too. ``check_files=False`` skips hashing installed files against their RECORD; ``rehash`` hashes every
    file again, also those of distributions whose files are unchanged since they were last hashed.
    """
    drift, platform = split_lock_problems(lockfile, check_files, rehash)
    out = sorted(drift + platform)
    if torch and torch != "none":
        dists = environment.installed_distributions()
        have = dists["torch"].version if "torch" in dists else "none"
        if have != torch:
            out.append(f"torch is {have}, the image expects {torch}")
    return out


def is_intact(name: str, version: str = "") -> bool:
    """Whether a distribution is installed (at ``version``'s public part, when given) with every file as its RECORD
    says."""
    dist = environment.installed_distributions().get(environment.canonical_name(name))
    if dist is None or (version and _base_version(dist.version) != _base_version(version)):
        return False
    return not fingerprint.check_files({name: dist}, cache=fingerprint.default_checks_path())[name]


def plan_install(lockfile: Path) -> tuple[list[LockedPackage], list[str]]:
    """The locked packages (not platform-provided) a setup run must (re)install, each with why.

    Re-checks the installed state instead of trusting earlier runs: a package is planned when it is missing, at
    another version, lacks its RECORD, or has files that differ from it. Leftovers of a pip killed mid-install are
    cleaned first: its '~'-prefixed stash directories, and the metadata of a package whose RECORD was never
    written (pip cannot uninstall it otherwise; the reinstall overwrites its files).
    """
    pins = [p for p in read_pins(lockfile) if not p.platform_provided]
    _clean_interrupted_installs({p.name for p in pins})
    problems = _package_problems(pins)
    return [p for p in pins if p.name in problems], [problems[p.name] for p in pins if p.name in problems]


def _clean_interrupted_installs(names: set[str]) -> None:
    for sp in {Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]}:
        if not sp.is_dir():
            continue
        for entry in sp.glob("~*"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for name, dist in environment.installed_distributions().items():
        path = Path(environment.dist_dir(dist))
        if name in names and dist.files is None and path.name.endswith(".dist-info"):
            shutil.rmtree(path)


# --- fingerprint vs fingerprint ---------------------------------------------------------------------------------

DRIFT_GROUPS = ("python/os", "torch/cuda", "packages added", "packages removed", "packages changed", "files changed")
INFO_GROUPS = ("machine", "settings")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _changes(a: Any, b: Any, prefix: str) -> list[dict[str, Any]]:
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    return [{"what": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def diff_fingerprints(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """{'drift': bool, 'groups': {group: [{'what', 'a', 'b'}...]}} with every group of DRIFT_GROUPS + INFO_GROUPS."""
    pa, pb = a["packages"], b["packages"]
    groups: dict[str, list[dict[str, Any]]] = {
        "python/os": _changes(a["python"], b["python"], "python") + _changes(a["os"], b["os"], "os"),
        "torch/cuda": _changes(a["torch"], b["torch"], "torch") + _changes(a["nvcc"], b["nvcc"], "nvcc"),
        "packages added": [{"what": n, "a": None, "b": pb[n]["version"]} for n in sorted(set(pb) - set(pa))],
        "packages removed": [{"what": n, "a": pa[n]["version"], "b": None} for n in sorted(set(pa) - set(pb))],
        "packages changed": [{"what": n, "a": pa[n]["version"], "b": pb[n]["version"]}
                             for n in sorted(set(pa) & set(pb)) if pa[n]["version"] != pb[n]["version"]],
        "files changed": [],
        "machine": _changes(a["machine"], b["machine"], "machine"),
        "settings": _changes(a["env"], b["env"], "env") + _changes(a["pip_config"], b["pip_config"], "pip_config"),
    }
    for n in sorted(set(pa) & set(pb)):
        if pa[n]["version"] != pb[n]["version"]:
            continue
        mod_a, mod_b = pa[n].get("modified", []), pb[n].get("modified", [])
        if pa[n]["record"] != pb[n]["record"] or mod_a != mod_b:
            detail = sorted(set(mod_a) ^ set(mod_b))
            groups["files changed"].append({"what": n, "a": pa[n]["record"][:12] + _mods(mod_a),
                                            "b": pb[n]["record"][:12] + _mods(mod_b), "files": detail})
    return {"drift": any(groups[g] for g in DRIFT_GROUPS), "groups": groups}


def _mods(modified: list[str]) -> str:
    return f" ({len(modified)} modified)" if modified else ""


def _shown(value: Any) -> str:
    """A fingerprint value as text, never a Python repr: '(absent)' where one side lacks it."""
    return "(absent)" if value is None else text_value(value)


def format_diff(report: dict[str, Any]) -> str:
    """The report for people (`samebox diff`; --json prints it whole): each group, each change as a -> b."""
    lines = []
    for group in DRIFT_GROUPS + INFO_GROUPS:
        items = report["groups"][group]
        if not items:
            continue
        note = " (not drift)" if group in INFO_GROUPS else ""
        lines.append(f"{group}{note}: {len(items)}")
        for item in items:
            files = f"  [{', '.join(item['files'][:3])}]" if item.get("files") else ""
            lines.append(f"  {item['what']}: {_shown(item['a'])} -> {_shown(item['b'])}{files}")
    lines.append("drift: yes" if report["drift"] else "drift: none")
    return "\n".join(lines)


# --- command line for setup.sh ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.instance.drift", description="setup.sh's lockfile steps")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_plan = sub.add_parser("plan", help="write the locked requirements still to install; print why")
    p_plan.add_argument("--lock", type=Path, required=True)
    p_plan.add_argument("--out", type=Path, required=True)
    p_platform = sub.add_parser("platform", help="verify torch/triton/nvidia-* of the platform against the lock")
    p_platform.add_argument("--lock", type=Path, required=True)
    p_intact = sub.add_parser("intact", help="exit 0 when a distribution is installed, intact, at --version")
    p_intact.add_argument("name")
    p_intact.add_argument("--version", default="")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SameboxError as e:  # a lockfile that cannot be read: what would work, exit 2 (as the samebox CLI)
        print(f"samebox: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "intact":
        return 0 if is_intact(args.name, args.version) else 1
    if args.cmd == "plan":
        todo, why = plan_install(args.lock)
        args.out.write_text("".join(p.block + "\n" for p in todo))
        print("\n".join(why))
        return 0
    pins = [p for p in read_pins(args.lock) if p.platform_provided]
    problems = _package_problems(pins, check_files=False)
    print("\n".join(problems[n] for n in sorted(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
