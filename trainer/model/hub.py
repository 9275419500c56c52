"""Whether a hub model can be fetched here, asked in seconds before any download: an offline machine (or one
behind the GFW without a mirror) otherwise waits through the hub client's retries and ends in a traceback."""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from builder.core.errors import SameboxError
from trainer.config import ModelConfig

DEFAULT_ENDPOINT = "https://huggingface.co"
MIRROR = "https://hf-mirror.com"
TIMEOUT_S = 8.0
_TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub the Hugging Face client uses: $HF_ENDPOINT, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_hint(name: str) -> str:
    return (f"set HF_ENDPOINT={MIRROR} (a mirror reachable from China), use model.name=modelscope://{name}, or "
            "download the model where the network reaches it and point model.name at its local directory")


def check_hub_reachable(name: str, endpoint: str | None = None, timeout: float = TIMEOUT_S) -> None:
    """Raises SameboxError (naming HF_ENDPOINT, modelscope:// and a local dir) when ``endpoint`` gives no HTTP
    answer within ``timeout`` seconds. Any answer, 401 or 404 included, counts as reachable: whether the id exists
    and may be read is for the download to say."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    url = f"{endpoint}/api/models/{urllib.parse.quote(name)}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise SameboxError(f"model.name={name!r} is a hub id, but {endpoint} gave no answer in {timeout:.0f} s "
                           f"({reason}): this machine looks offline from that hub", hint=offline_hint(name)) from None


def cached_config(name: str, revision: str | None) -> str | None:
    """The model's config.json in the local Hugging Face cache, if it was downloaded before."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return found if isinstance(found, str) else None


def go_offline() -> None:
    """The hub client reads HF_HUB_OFFLINE when it is imported: set both, so a cached model loads at once."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def check_model_source(cfg: ModelConfig, timeout: float = TIMEOUT_S) -> None:
    """A hub id must be reachable, or already in the cache (then the run loads it offline, and says so).
    Local directories and ModelScope ids pass (ModelScope's client fails fast by itself)."""
    source, name = resolve_source(cfg)
    if source != "hub":
        return
    cached = cached_config(name, cfg.revision)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        if cached is None:
            raise SameboxError(f"HF_HUB_OFFLINE is set and {name} is not in the Hugging Face cache",
                               hint="unset HF_HUB_OFFLINE to download it, or " + offline_hint(name))
        return
    try:
        check_hub_reachable(name, hub_endpoint(), timeout)
    except SameboxError:
        if cached is None:
            raise
        go_offline()
        print(f"samebox: {hub_endpoint()} gave no answer; loading {name} from the local cache (HF_HUB_OFFLINE=1)",
              flush=True)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_source(cfg: ModelConfig) -> tuple[str, str]:
    """(source, name): local directory, hub id or ModelScope id, decided from the name when source is auto."""
    name = cfg.name
    if cfg.source == "modelscope" or name.startswith("modelscope://"):
        return "modelscope", name.removeprefix("modelscope://")
    local = Path(name).expanduser()
    if cfg.source == "local" or (cfg.source == "auto" and local.exists()):
        if not (local / "config.json").is_file():
            raise SameboxError(f"model directory {local} has no config.json",
                               hint="point model.name at a directory saved with save_pretrained")
        return "local", str(local)
    if HUB_ID.match(name):
        return "hub", name
    raise SameboxError(f"model.name={name!r} is neither a directory nor a hub id",
                       hint="use a local path, an id such as Qwen/Qwen2.5-7B, or modelscope://Qwen/Qwen2.5-7B")
