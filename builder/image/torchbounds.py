"""Check every locked package's declared torch requirement against the image's torch.

The resolver only enforces requirements it activates. Many packages state their torch bound inside an extra
(transformers: ``torch>=2.2; extra == "torch"``), so a lock can hold a package that says it does not support the
image's torch. This reads each locked wheel's metadata and reports every torch requirement, in any extra, whose
marker applies to the image's Python and platform and whose specifier excludes the image's torch.

Only the base requirements and the torch runtime extra speak for a package's torch support. Other extras pin
torch for their own tooling (datasets[benchmarks] says torch==2.0.1, datasets[audio] torch>=2.8 for torchcodec),
and counting them would reject every torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from email.parser import HeaderParser

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# "" = no extra. The runtime extra's usual names.
RUNTIME_EXTRAS = ("", "torch", "pytorch")
# Keep the index polite and the check a few seconds long.
_WORKERS = 16

MetadataFetcher = Callable[[str, set[str]], "str | None"]


def target_environment(python: str) -> dict[str, str]:
    """PEP 508 marker environment of a CPython ``python`` on x86_64 Linux (the lock's target, not this host)."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    }


def declared_torch_requirements(metadata: str, python: str) -> list[tuple[str, str]]:
    """(specifier, extra or "") for every ``Requires-Dist: torch...`` that applies on the target Python/platform,
    with no extra or a RUNTIME_EXTRAS one."""
    msg = HeaderParser().parsestr(metadata)
    provided = {canonicalize_name(e) for e in msg.get_all("Provides-Extra") or []}
    extras = [e for e in RUNTIME_EXTRAS if not e or e in provided]
    env = target_environment(python)
    found: list[tuple[str, str]] = []
    for line in msg.get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != "torch":
            continue
        applies = [e for e in extras if req.marker is None or _applies(req.marker, env, e)]
        if applies:
            found.append((str(req.specifier), applies[0]))
    return found


def _applies(marker: Marker, env: dict[str, str], extra: str) -> bool:
    return marker.evaluate({**env, "extra": extra})


def torch_bound_problems(
    torch: str,
    python: str,
    locked: Mapping[str, tuple[str, set[str]]],
    fetch: MetadataFetcher,
) -> tuple[list[str], list[str]]:
    """(problems, unchecked) for ``locked`` = {name: (version, sha256 set)}; ``fetch(name, hashes)`` returns the
    wheel's METADATA text or None. A problem names the package, its bound and the fix."""
    names = sorted(locked)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        texts = list(pool.map(lambda n: fetch(n, locked[n][1]), names))
    problems: list[str] = []
    unchecked: list[str] = []
    for name, text in zip(names, texts, strict=True):
        version = locked[name][0]
        if text is None:
            unchecked.append(f"{name}=={version}")
            continue
        for spec, extra in declared_torch_requirements(text, python):
            if spec and not _contains(spec, torch):
                where = f" (extra '{extra}')" if extra else ""
                problem = (
                    f"{name} {version} declares torch{spec}{where}, but this image has torch {torch}: "
                    f"pin an older {name} in the image's constraints file"
                )
                if problem not in problems:
                    problems.append(problem)
    return problems, unchecked


def _contains(specifier: str, version: str) -> bool:
    return SpecifierSet(specifier).contains(version, prereleases=True)
