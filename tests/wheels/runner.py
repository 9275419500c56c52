"""A separate process resolving the fake key (for the lock and kill tests): python -m tests.wheels.runner CACHE.

The fake release facts come from the environment (FAKE_SDIST_SHA, FAKE_SDIST_URL); prints the Resolution JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from builder.core import compat
from builder.wheels import build
from builder.wheels.cache import WheelCache
from builder.wheels.key import WheelKey
from builder.wheels.resolve import resolve_wheel
from tests.envs import make_env
from tests.wheels import fakes


def main() -> None:
    compat.FLASH_ATTN_RELEASES[fakes.VERSION] = fakes.fake_release(os.environ["FAKE_SDIST_SHA"],
                                                                   os.environ["FAKE_SDIST_URL"])
    build.BUILD_MODULES = ("setuptools",)
    facts = make_env("2.11.0+cu130", "13.0", fakes.PYDOT)
    key = WheelKey(fakes.VERSION, "2.11.0+cu130", "13.0", fakes.PY, True, ("9.0",), "slim")
    result = resolve_wheel(key, WheelCache(Path(sys.argv[1])), facts,
                           say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main()
