"""Converge a rented instance (no Docker) to the environment of the catalog image its platform replicates.

setup.sh finds the interpreter and samebox's source, then runs ``python -m builder.instance.converge``. The run has
three stages: ``parse_options`` (every bad option reported together), ``preflight`` (the platform matched against the
catalog, the lockfile, state and cache directories: everything that can refuse the run with exit 2 refuses it here,
before anything is written) and ``plan`` (the steps, counted, each a function of builder/instance/converge_steps.py),
then ``execute`` runs them with "==> [i/N] step" progress and a 'running' marker in the state directory. Every step
re-checks the state it converges, so a run killed at any point converges when run again.

Exit status: 0 done, 1 a step failed, 2 bad input or a platform this image cannot use.
Standard library only: it runs on the platform's bare Python before anything is installed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import builder
from builder.core import compat, readahead, settings
from builder.core.catalog import Catalog
from builder.core.environment import Capability, Environment, Rental, probe_rental
from builder.core.errors import SameboxError
from builder.core.fsutil import write_atomic
from builder.core.output import slowest
from builder.core.settings import AUTODL_DATA_DISK
from builder.instance import converge_steps as steps
from builder.instance.converge_steps import Match, Options, Preflight, Run, StepFailed

PROG = "bash setup.sh"
# One home for the profile names: compat's table (builder/wheels/key.py's PROFILES is the same tuple, but that module
# needs builder.core.spec, which a bare Python 3.10 cannot import). The first profile is the default: every feature.
FLASH_ATTN_PROFILES = tuple(compat.FLASH_ATTN_PROFILES)
DEFAULT_FLASH_ATTN_PROFILE = compat.DEFAULT_FLASH_ATTN_PROFILE


# --- options ----------------------------------------------------------------------------------------------------


def _one_of(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SameboxError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False,  # setup.sh reads --python, --samebox-src, --wheelhouse by full name
                description="Converge this instance to the samebox environment of its catalog image.",
                epilog="Exit status: 0 done, 1 a step failed (its output says which), 2 bad input or a platform "
                       "this image cannot use.")
    add = p.add_argument
    add("--image", default="", metavar="ID",
        help="the catalog image to replicate (default: the one this instance's platform fits)")
    add("--python", default="", metavar="PATH", help="the interpreter with the platform's torch (default: conda "
                                                     "base, the active venv, python3); setup.sh runs this module in it")
    add("--offline", action="store_true", help="install from --wheelhouse only, with no network")
    add("--wheelhouse", default="", metavar="DIR", help="a directory of the locked wheels (pip's --find-links)")
    add("--cache-dir", default="", metavar="DIR", help="where HF_HOME, PIP_CACHE_DIR, TORCH_HOME and the wheel "
                                                       f"cache go (default: {AUTODL_DATA_DISK}/.cache on AutoDL, else "
                                                       "~/.cache; or SAMEBOX_CACHE_DIR)")
    add("--samebox-src", default="", metavar="DIR|WHEEL",
        help="samebox's source checkout or wheel (default: the one this module runs from)")
    add("--root", default="", metavar="DIR",
        help="a catalog root holding images/ and lockfiles/ (default: the checkout)")
    add("--catalog", default="", metavar="FILE", help="images/matrix.toml, or the JSON list of entries a standalone "
                                                      "setup script embeds (default: ROOT/images/matrix.toml)")
    add("--lockfile", default="", metavar="FILE",
        help="the image's lockfile, kept in the state directory (default: ROOT/lockfiles/IMAGE.txt)")
    add("--min-free-mb", default=None, metavar="N",
        help=f"free space the cache disk needs (default {settings.DEFAULT_MIN_FREE_MB}, or SAMEBOX_MIN_FREE_MB)")
    add("--no-flash-attn", dest="flash_attn", action="store_false", help="leave flash-attn out")
    add("--flash-attn-profile", default=None, metavar="PROFILE",
        help=f"{_one_of(FLASH_ATTN_PROFILES)} (default {DEFAULT_FLASH_ATTN_PROFILE}, or SAMEBOX_FA_PROFILE): "
             f"{compat.FLASH_ATTN_PROFILE_HELP}")
    add("--no-selftest", dest="selftest", action="store_false", help="skip the GPU self-test")
    return p


def _path(value: str) -> Path | None:
    return Path(os.path.abspath(value)) if value else None


def _own_source() -> Path:
    """The checkout (or wheel) this module was imported from: builder/'s parent."""
    return Path(os.path.abspath(builder.__file__)).parents[1]


def parse_options(argv: Sequence[str], environ: Mapping[str, str]) -> Options:
    """The options, or SameboxError listing every problem with them."""
    args, unknown = _parser().parse_known_args(list(argv))
    problems = [f"unknown option {a}" for a in unknown]
    if args.offline and not args.wheelhouse:
        problems.append("--offline needs --wheelhouse DIR (a directory of the locked wheels)")
    if args.wheelhouse and not os.path.isdir(args.wheelhouse):
        problems.append(f"wheelhouse {args.wheelhouse} is not a directory")
    min_free = args.min_free_mb if args.min_free_mb is not None else settings.min_free_mb(environ)
    if not min_free.isdigit():
        problems.append(f"--min-free-mb must be a number of MiB, got '{min_free}'")
    profile = args.flash_attn_profile or settings.flash_attn_profile(environ) or DEFAULT_FLASH_ATTN_PROFILE
    if args.flash_attn and profile not in FLASH_ATTN_PROFILES:  # only a run that may build flash-attn needs one
        problems.append(f"flash-attn profile (--flash-attn-profile or SAMEBOX_FA_PROFILE) must be "
                        f"{_one_of(FLASH_ATTN_PROFILES)}, got '{profile}'")
    python = args.python or settings.python(environ) or sys.executable
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        problems.append(f"--python {python} is not the interpreter running this ({sys.executable}): run "
                        f"`{python} -m builder.instance.converge`, as setup.sh does")
    src = args.samebox_src or str(_own_source())
    if not os.path.exists(src):
        problems.append(f"samebox source {src} does not exist; pass --samebox-src DIR|WHEEL")
    if problems:
        raise SameboxError("\n".join(problems))
    return Options(
        image=args.image,
        python=sys.executable,
        offline=args.offline,
        wheelhouse=_path(args.wheelhouse),
        cache_dir=_path(args.cache_dir) or settings.cache_dir_override(environ),
        samebox_src=Path(os.path.abspath(src)),
        root=_path(args.root),
        catalog=_path(args.catalog),
        lockfile=_path(args.lockfile),
        min_free_mb=int(min_free),
        flash_attn=args.flash_attn,
        flash_attn_profile=profile,
        selftest=args.selftest,
        state=settings.state_dir(environ),
        venv=settings.venv_dir(environ),
    )


# --- preflight ----------------------------------------------------------------------------------------------------


def flash_attn2_gpu(env: Environment) -> bool:
    """Whether a GPU here can run flash-attn 2 (sm80+), or one's capability is unknown (the wheel resolver decides);
    False without a GPU or where every GPU is older (V100, T4, 2080 Ti: the trainer uses SDPA there)."""
    floor = Capability.parse(compat.FLASH_ATTN2_MIN_CAPABILITY)
    return any(g.capability is None or g.capability >= floor for g in env.gpus)


def _detect_and_match(catalog: Path, image: str, rental: Rental | None = None) -> Match:
    """The one place converge asks what the instance is (the Environment probe) and which catalog image replicates
    it (``Catalog.match``)."""
    try:
        entries = Catalog.read(catalog)
    except (ValueError, KeyError, TypeError) as e:  # JSON syntax, or entries of the wrong shape
        raise SameboxError(f"the catalog {catalog} cannot be read ({type(e).__name__}: {e})",
                           "pass images/matrix.toml or the JSON list a setup script embeds") from None
    env = Environment.probe(rental=rental)
    try:
        spec = entries.match(env, image)
    except SameboxError as e:
        raise SameboxError(str(e)) from None
    return Match(image=spec.id, image_torch=spec.torch_full, provider=spec.python_provider,
                 flash_attn=spec.flash_attn, torch=env.torch_version, gpus=tuple(g.name for g in env.gpus),
                 flash_attn2_gpu=flash_attn2_gpu(env), describe=env.describe(), data_disk=env.rental.data_disk,
                 shared_fs=env.rental.shared_fs, lockfile=None if catalog.suffix == ".json" else spec.lockfile)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    """Whether ``path`` is (or can be made as) a writable directory, checked without creating anything."""
    here = _nearest_existing(path)
    return here.is_dir() and os.access(here, os.W_OK | os.X_OK)


def _share_findings(opts: Options, rental: Rental) -> None:
    """$SAMEBOX_FILE_CHECKS as the caches step will export it (the findings beside the region's wheel cache), set
    before the platform probe: a second instance of the region reads the torch report the first one kept there
    instead of importing torch from a cold disk. Reads only; nothing is made here."""
    if settings.get("FILE_CHECKS"):
        return
    cache = settings.instance_cache(opts.cache_dir, rental.data_disk, rental.shared_fs)
    wheels = settings.wheel_cache(caches=cache, shared_fs=Path(rental.shared_fs) if rental.shared_fs else None)
    os.environ[settings.PREFIX + "FILE_CHECKS"] = str(settings.shared_file_checks(wheels))


def preflight(opts: Options, match: Callable[[Path, str], Match] = _detect_and_match) -> Preflight:
    """Everything that can refuse the run, checked before the first step writes anything."""
    if not _writable(opts.state):
        raise SameboxError(f"state directory {opts.state} is not writable; set SAMEBOX_STATE")
    root = opts.root
    if opts.catalog is None:
        root = root or opts.samebox_src
        if not root.is_dir():
            raise SameboxError(f"--root {root} is not a directory")
    catalog = opts.catalog or root / "images" / "matrix.toml"
    if not catalog.is_file():
        raise SameboxError(f"no catalog at {catalog}; pass --root DIR (a directory holding images/ and lockfiles/)")
    found = match(catalog, opts.image)
    lock = opts.lockfile or found.lockfile
    if lock is None:
        raise SameboxError(f"no lockfile for image {found.image}; pass --lockfile FILE or --root DIR")
    if not lock.is_file():
        raise SameboxError(f"no lockfile {lock} for image {found.image}; make it with "
                           f"`make lock IMAGE={found.image}`")
    cache = settings.instance_cache(opts.cache_dir, found.data_disk, found.shared_fs)
    if not _writable(cache):
        raise SameboxError(f"cache directory {cache} is not writable (read-only disk?); pass --cache-dir DIR on a "
                           "writable disk")
    disk = os.statvfs(_nearest_existing(cache))
    free_mb = disk.f_bavail * disk.f_frsize // (1024 * 1024)
    if free_mb < opts.min_free_mb:
        raise SameboxError(f"cache directory {cache} has {free_mb} MiB free, at least {opts.min_free_mb} MiB are "
                           f"needed; pass --cache-dir DIR on a larger disk (AutoDL: {AUTODL_DATA_DISK}) or "
                           "--min-free-mb N")
    return Preflight(match=found, root=root, catalog=catalog, lock_source=lock,
                     lockfile=opts.state / "lock.txt" if opts.lockfile else lock, cache_dir=cache, free_mb=free_mb,
                     needs_venv=found.provider == "system" and found.torch == steps.NO_TORCH)


# --- plan and run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Run], None]


def plan(opts: Options, pre: Preflight) -> list[Step]:
    """The steps of this run, in order. A step that converges state is planned on every instance and says why when it
    has nothing to do there (flash-attn on a CPU instance: re-run on a GPU one to add it); an option turns a step off
    by leaving it out. The self-test checks GPUs, so it is planned only where there is one."""
    planned = [Step("source", steps.source), Step("python", steps.python), Step("platform", steps.platform),
               Step("caches", steps.caches), Step("torch", steps.torch), Step("packages", steps.packages),
               Step("samebox", steps.samebox)]
    if opts.flash_attn:
        planned.append(Step("flash-attn", steps.flash_attn))
    planned.append(Step("fingerprint", steps.fingerprint))
    if steps.wants_selftest(opts, pre):  # started beside the fingerprint, waited for here
        planned.append(Step("selftest", steps.selftest))
    return planned


def _mark_running(state: Path, number: int, name: str) -> None:
    tmp = state / ".running.tmp"
    tmp.write_text(f"{number} {name}\n")
    os.replace(tmp, state / "running")


def execute(run: Run, planned: list[Step]) -> None:
    """Run the steps with their progress; the 'running' marker names the step a killed run stopped in."""
    state = run.opts.state
    state.mkdir(parents=True, exist_ok=True)
    marker = state / "running"
    if marker.is_file():
        stopped = marker.read_text().strip().partition(" ")[2]
        print(f"samebox setup: the previous run stopped during step '{stopped}'; every step re-checks its state")
    for number, step in enumerate(planned, 1):
        print(f"==> [{number}/{len(planned)}] {step.name}")
        _mark_running(state, number, step.name)
        began = time.monotonic()
        try:
            step.run(run)
        except StepFailed as e:
            steps.stop_background(run)
            raise StepFailed(f"step '{step.name}' failed: {e}") from None
        except BaseException:
            steps.stop_background(run)
            raise
        finally:
            run.seconds[step.name] = round(time.monotonic() - began, 2)
    marker.unlink()


def start_readahead(opts: Options, pre: Preflight) -> readahead.Prefetch | None:
    """Where the self-test will run: the libraries its torch maps, read from a cold disk (a new instance) beside the
    steps before it, which install packages and hash files but import no torch."""
    return readahead.start_libraries() if steps.wants_selftest(opts, pre) else None


def _write_timings(run: Run, total: float) -> None:
    """$SAMEBOX_STATE/setup-timings.json: each step's seconds in the last run (``checks``: the platform probe and
    the checks before step 1), for `bench/first_step_gpu.sh` and anyone asking where setup's time went."""
    if not run.opts.state.is_dir():
        return
    data = {"total_s": round(total, 2), "step_seconds": run.seconds, "selftest_passed": run.selftest_passed,
            "selftest_own_s": run.selftest_own_s}  # the selftest step's seconds are those left after the fingerprint
    if run.readahead is not None:
        data["readahead"] = {"bytes": run.readahead.total_bytes, "read_bytes": run.readahead.read_bytes,
                             "seconds": run.readahead.seconds, "stopped": run.readahead.stopped}
    try:
        write_atomic(run.opts.state / "setup-timings.json", json.dumps(data, indent=2) + "\n")
    except OSError:
        pass  # a record only


def _summary(run: Run, seconds: int) -> str:
    pre, opts = run.pre, run.opts
    if run.selftest_passed:
        selftest = "passed"
    else:
        selftest = "skipped (--no-selftest)" if not opts.selftest else "skipped (no GPU)"
    rows = [("image", pre.match.image), ("python", run.python), ("torch", f"{pre.match.torch} (platform's, untouched)"),
            ("caches", str(pre.cache_dir)), ("environment", f". {opts.state / 'env.sh'} (added to ~/.bashrc)"),
            ("fingerprint", str(opts.state / "fingerprint.json")), ("selftest", selftest)]
    took = slowest(run.seconds, 3)
    head = f"samebox setup: done in {seconds}s" + (f" ({took})" if took else "")
    return head + "\n" + "".join(f"  {k:<12} {v}\n" for k, v in rows)


def _pythonpath_without(source: Path, environ: Mapping[str, str]) -> str:
    """PYTHONPATH as the user had it: setup.sh put samebox's source in front for this process only (pip and samebox's
    installed CLI must see the environment, not the checkout)."""
    parts = environ.get("PYTHONPATH", "").split(os.pathsep)
    if parts and parts[0] == str(source):
        parts = parts[1:]
    return os.pathsep.join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # in order with the installers' output
    start = time.monotonic()
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv, os.environ)
        rental = probe_rental()  # the platform probe's rental part, taken first: where the region's caches are
        _share_findings(opts, rental)
        pre = preflight(opts, functools.partial(_detect_and_match, rental=rental))
        planned = plan(opts, pre)
        outer = _pythonpath_without(opts.samebox_src, os.environ)
        if outer:
            os.environ["PYTHONPATH"] = outer
        else:
            os.environ.pop("PYTHONPATH", None)
        work = Path(tempfile.mkdtemp(prefix="samebox-setup."))
        try:
            run = Run(opts=opts, pre=pre, work=work, python=opts.python)
            run.seconds["checks"] = round(time.monotonic() - start, 2)
            run.readahead = start_readahead(opts, pre)
            try:
                execute(run, planned)
            finally:
                if run.readahead is not None:
                    run.readahead.stop(wait=2.0)
                _write_timings(run, time.monotonic() - start)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except SameboxError as e:
        print("\n".join(f"samebox setup: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    except StepFailed as e:
        print(f"samebox setup: {e}", file=sys.stderr)
        return 1
    print(_summary(run, int(time.monotonic() - start)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
