"""A hub model name on a machine that cannot reach the hub: exit 2 in seconds, naming the ways that work, instead of
a long wait and a traceback. Against local stand-ins: a port nothing listens on, and an HTTP server."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time

import pytest
import yaml

from builder.cli import main as cli_main
from builder.core.errors import SameboxError
from trainer.config import ModelConfig
from trainer.model import hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, whatever go_offline sets
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return cache


def test_offline_hub_exits_2_fast_naming_mirror_modelscope_and_local_dir(make_config, tmp_path, monkeypatch,
                                                                         capsys, hf_cache):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    cfg = make_config(overrides=("model.name=Qwen/Qwen2.5-7B",)).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    assert cli_main(["train", str(tmp_path / "c.yaml"), "--no-preflight"]) == 2
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert "model.name='Qwen/Qwen2.5-7B' is a hub id" in err and "looks offline" in err
    assert "HF_ENDPOINT=https://hf-mirror.com" in err and "modelscope://Qwen/Qwen2.5-7B" in err
    assert "local directory" in err and "Traceback" not in err


def test_any_http_answer_counts_as_reachable():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (the handler's API)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub.check_hub_reachable("org/model", f"http://127.0.0.1:{server.server_port}", timeout=5)
    finally:
        server.shutdown()
    with pytest.raises(SameboxError, match="looks offline"):
        hub.check_hub_reachable("org/model", f"http://127.0.0.1:{_closed_port()}", timeout=5)


def test_a_cached_model_loads_offline_and_an_uncached_one_under_hf_hub_offline_fails(monkeypatch, hf_cache, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    snapshot = hf_cache / "models--org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hf_cache / "models--org--cached" / "refs").mkdir()
    (hf_cache / "models--org--cached" / "refs" / "main").write_text("abc")
    hub.check_model_source(ModelConfig(name="org/cached"))
    assert "loading org/cached from the local cache (HF_HUB_OFFLINE=1)" in capsys.readouterr().out
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises(SameboxError, match="HF_HUB_OFFLINE is set and org/other is not in the Hugging Face cache"):
        hub.check_model_source(ModelConfig(name="org/other"))


def test_local_dirs_and_modelscope_ids_are_not_asked_about(tiny_model_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("asked the network")

    monkeypatch.setattr(hub, "check_hub_reachable", no_network)
    hub.check_model_source(ModelConfig(name=str(tiny_model_dir)))
    hub.check_model_source(ModelConfig(name="modelscope://Qwen/Qwen2.5-7B"))
