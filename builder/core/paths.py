"""Where the project's data lives (images/ and lockfiles/), in a checkout or an installed copy."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The directory holding images/ and lockfiles/: $SAMEBOX_ROOT, else the checkout this package sits in."""
    env = os.environ.get("SAMEBOX_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]

