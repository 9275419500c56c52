"""Render setup.sh from images/setup.sh.j2: the checkout's own script, or a standalone one for one image.

The checkout's script (setup.sh at the repository root) reads the catalog and lockfiles next to it. A standalone
script embeds its image's catalog entry and lockfile, so it only needs samebox's source (a checkout or a wheel).
Inputs are fed sorted and the output carries no timestamp: rendering twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from builder.core.errors import SameboxError
from builder.core.fsutil import read_text
from builder.core.settings import project_root
from builder.core.spec import ImageSpec

TEMPLATE = "setup.sh.j2"
# The embedded entry is the ImageSpec itself (builder/core/catalog.py reads it back), less what names the machine it was
# rendered on: the instance's lockfile is the embedded one.
MACHINE_FIELDS = ("lockfile", "root")


def _template_dir() -> Path:
    return project_root() / "images"


def render_setup_script(spec: ImageSpec | None, command: str) -> str:
    """The checkout's setup.sh (``spec`` None) or the standalone script of one image."""
    import jinja2

    template_path = _template_dir() / TEMPLATE
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_path.parent)), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    entries_json, lock_text = "", ""
    if spec is not None:
        if not spec.lockfile.is_file():
            raise SameboxError(f"no lockfile {spec.lockfile} for image {spec.id}",
                               f"make it first: make lock IMAGE={spec.id}")
        entry = {k: v for k, v in sorted(spec.to_dict().items()) if k not in MACHINE_FIELDS}
        entries_json = json.dumps([entry], indent=1, sort_keys=True)
        lock_text = read_text(spec.lockfile, "lockfile", f"regenerate it: make lock IMAGE={spec.id}")
        if not lock_text.endswith("\n"):
            lock_text += "\n"
        if "SAMEBOX_LOCK_EOF" in lock_text:
            raise SameboxError(f"{spec.lockfile} contains the heredoc marker SAMEBOX_LOCK_EOF", "regenerate the lock")
    inputs = hashlib.sha256(template_path.read_bytes() + entries_json.encode() + lock_text.encode()).hexdigest()
    return env.get_template(TEMPLATE).render(
        command=command,
        entries_json=entries_json,
        image_id=spec.id if spec else "",
        inputs_sha256=inputs,
        lock_text=lock_text,
    )
