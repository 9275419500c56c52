"""`samebox serve`: an OpenAI-compatible server for a base model + LoRA adapter, through an existing engine.

Engines are a registry, best first. vLLM serves LoRA adapters natively and fast, but pins its own torch: it is used
only where it is installed against this very torch (builder/core/compat.py says which vLLM pins which torch); samebox
never installs it, since that would replace the platform's torch. `transformers serve` (transformers >= 5.17 plus
its serving extra: fastapi, uvicorn, pydantic, openai) runs wherever the lock's transformers does; samebox loads
base + adapter into it, merges the LoRA into the weights in memory (no extra matmuls per token, nothing written to
disk) and puts trainer/serve/gate.py in front: API key, the OpenAI routes only, 4xx for bad requests, bounded
concurrency and queue (503 with Retry-After past them); trainer/serve/connections.py sets uvicorn's connection
limits beneath it.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import json
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from builder.core import compat, settings, supported
from builder.core.errors import SameboxError
from trainer.serve.gate import Limits
from trainer.serve.served import ServedModel, adapter_config, loaded_line, merge_lora, overlay_dir

AUTODL_PORT = 6006  # AutoDL maps each instance's 6006 (and 6008) to a public address
DEFAULT_PORT = 8000  # elsewhere: the port OpenAI-compatible servers (vLLM, transformers serve) use
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
# Requests in the engine at once by default: continuous batching answers 32 clients at about one client's time to
# first token (bench/results/serve_gpu.json); one at a time, a few in flight keep the engine busy between answers.
MAX_CONCURRENT = {"continuous": 32, "off": 4}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = AUTODL_PORT
    api_key: str | None = None
    engine: str = "auto"
    dtype: str = "auto"  # the weights' own dtype (bf16 for today's chat models)
    device: str | None = None  # transformers engine: cuda (or cpu) when None; "auto" spreads over the GPUs
    batching: str = "auto"  # continuous (paged KV cache, many clients at once) on a GPU, one at a time on a CPU
    max_concurrent: int | None = None  # transformers engine: requests in the engine at once (None: by batching)
    max_queue: int | None = None  # requests waiting for a turn (None: twice max_concurrent)
    queue_timeout_s: float = Limits.queue_timeout_s  # the longest a request waits for a turn before its 503
    read_timeout_s: float = Limits.read_timeout_s  # the longest a client takes to send its headers, again its body


@dataclass(frozen=True)
class Facts:
    """What decides the engine, probed once (``probe``)."""

    torch: str  # base version, '2.11.0'
    cuda: bool
    transformers: str
    serve_extra_missing: tuple[str, ...] = ()
    vllm: str = ""  # installed version, '' when absent
    vllm_torch: str = ""  # the torch its metadata pins, '' when absent or unpinned
    autodl: bool = False


def probe() -> Facts:
    import torch
    import transformers

    from builder.core.environment import probe_rental

    missing = tuple(m for m in ("fastapi", "uvicorn", "pydantic", "openai") if importlib.util.find_spec(m) is None)
    vllm, vllm_torch = "", ""
    if importlib.util.find_spec("vllm") is not None:
        vllm = importlib.metadata.version("vllm")
        pins = [r for r in importlib.metadata.requires("vllm") or [] if r.replace(" ", "").startswith("torch==")]
        vllm_torch = pins[0].split("==", 1)[1].split(";")[0].strip() if pins else ""
    return Facts(compat.torch_release(torch.__version__), torch.cuda.is_available(), transformers.__version__, missing,
                 vllm, vllm_torch, probe_rental().autodl)


def default_port(facts: Facts) -> int:
    return AUTODL_PORT if facts.autodl else DEFAULT_PORT


# --- engines ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    name: str
    unusable: Callable[[Facts], str | None]  # why it cannot run here, or None
    serve: Callable[[ServedModel, ServeOptions, Facts], int] = field(repr=False)


def _vllm_unusable(f: Facts) -> str | None:
    torch_minor = ".".join(f.torch.split(".")[:2])
    fits = compat.VLLM_FOR_TORCH.get(torch_minor)
    if not f.vllm:
        if fits is None:
            return f"no vLLM release pins torch {f.torch} (vLLM pins its own torch; this one is the platform's)"
        return f"not installed (vllm=={fits} pins torch {torch_minor}: pip install vllm=={fits})"
    if f.vllm_torch and f.vllm_torch.split("+")[0] != f.torch:
        return f"vllm {f.vllm} pins torch {f.vllm_torch}, this environment has torch {f.torch}"
    if not f.cuda:
        return "needs a CUDA GPU"
    return None


def _transformers_unusable(f: Facts) -> str | None:
    floor = supported.SERVE_TRANSFORMERS_FLOOR
    if Version(f.transformers) < Version(floor):
        return (f"transformers {f.transformers} is older than {floor}, whose `transformers serve` samebox drives "
                "(catalog images with torch >= 2.5 lock a newer one)")
    if f.serve_extra_missing:
        return (f"its serving extra is not installed ({', '.join(f.serve_extra_missing)}): "
                "pip install fastapi uvicorn openai")
    return None


def serve_vllm(served: ServedModel, opts: ServeOptions, facts: Facts) -> int:
    argv = vllm_argv(served, opts)
    env = dict(os.environ)
    if opts.api_key:
        env["VLLM_API_KEY"] = opts.api_key  # in the environment, not argv: `ps` shows argv to every user
    print(f"samebox serve: {shlex.join(argv)}", flush=True)
    os.execvpe(argv[0], argv, env)
    return 1  # not reached: exec replaces this process


def vllm_argv(served: ServedModel, opts: ServeOptions) -> list[str]:
    """`vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER`: clients ask for NAME (the adapter) or
    NAME-base (the base alone)."""
    argv = ["vllm", "serve", str(served.base_dir), "--host", opts.host, "--port", str(opts.port),
            "--served-model-name", f"{served.name}-base" if served.adapter_dir else served.name]
    if opts.dtype != "auto":
        argv += ["--dtype", opts.dtype]
    if served.trust_remote_code:
        argv.append("--trust-remote-code")
    if served.adapter_dir is not None:
        rank = int(adapter_config(served.adapter_dir).get("r", 16))
        max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
        argv += ["--enable-lora", "--lora-modules", f"{served.name}={served.adapter_dir}",
                 "--max-lora-rank", str(max_rank)]
    return argv


def serve_transformers(served: ServedModel, opts: ServeOptions, facts: Facts) -> int:
    with tempfile.TemporaryDirectory(prefix="samebox-serve-") as tmp:
        overlay = overlay_dir(served, Path(tmp))
        # The engine names a local model by the path it was given: a relative one makes responses say the name.
        os.chdir(tmp)
        dialect = transformers_dialect()
        if dialect == "engine-process":
            _serve_engine_process(served, opts, facts, has_chat_template(overlay))
        else:
            _serve_in_process(served, opts, facts)
    return 0


def transformers_dialect() -> str:
    """Which `transformers serve` this is, by its shape rather than its version number: 'in-process' (5.17-5.24:
    the model loads in the server's process; ``Serve(non_blocking=True)`` builds it and starts it on a thread),
    'engine-process' (5.25 on: the model loads and generates in a process of its own, which a ``ModelLoader``
    loads it in; ``Serve(...)`` runs the server at once). Another shape is a SameboxError at start, never a
    traceback once the banner is out."""
    import inspect

    from transformers.cli.serve import Serve

    params = inspect.signature(Serve.__init__).parameters
    if "non_blocking" in params and hasattr(Serve, "start_server"):
        return "in-process"
    try:
        from transformers.cli.serving import model_manager, server
    except ImportError:
        model_manager = server = None
    if (model_manager is not None and hasattr(model_manager, "ModelLoader") and hasattr(server, "build_server")
            and hasattr(Serve, "run")):
        return "engine-process"
    import transformers

    raise SameboxError(f"transformers {transformers.__version__}'s `transformers serve` is not one samebox knows how "
                       f"to drive (it drives {supported.range_text('transformers', 'serve')})",
                       f"install a release in that range ({supported.pip_spec('transformers', 'serve')}), or "
                       "serve with --engine vllm where vLLM is installed against this torch")


def has_chat_template(model_dir: Path) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(str(model_dir)), "chat_template", None))


def gate_limits(opts: ServeOptions, facts: Facts) -> Limits:
    """The gate's limits from the options, the defaults filled in by how the engine batches."""
    running = opts.max_concurrent or MAX_CONCURRENT["continuous" if _continuous(opts, facts) else "off"]
    return Limits(max_concurrent=running, max_queue=2 * running if opts.max_queue is None else opts.max_queue,
                  queue_timeout_s=opts.queue_timeout_s, read_timeout_s=opts.read_timeout_s)


def _serve_in_process(served: ServedModel, opts: ServeOptions, facts: Facts) -> None:
    from trainer.serve import connections
    from trainer.serve.gate import Gate

    server = _transformers_server(served, opts, facts, non_blocking=True)
    model, tokenizer = _loaded(server)
    merged = merge_lora(model)
    limits = gate_limits(opts, facts)
    config = server.server.config
    config.app = Gate(config.app, served.name, served.name, opts.api_key,
                      chat_template=bool(getattr(tokenizer, "chat_template", None)), limits=limits)
    connections.configure(config, limits)
    print(loaded_line(served.describe(), model, merged), flush=True)
    server.server.run()


def _serve_engine_process(served: ServedModel, opts: ServeOptions, facts: Facts, chat_template: bool) -> None:
    """transformers builds its app and its uvicorn.Config inside ``Serve.run`` and loads the model in a spawned
    process through ``self.loader``: for this run only, the gate goes around the app ``build_server`` returns,
    uvicorn.Config takes trainer/serve/connections.py's settings, and the loader becomes
    trainer.serve.loader.MergingLoader, which merges the LoRA where the weights live."""
    import uvicorn
    from transformers.cli.serve import Serve
    from transformers.cli.serving import server as tf_server

    from trainer.serve import connections
    from trainer.serve.gate import Gate
    from trainer.serve.loader import MergingLoader

    limits = gate_limits(opts, facts)
    build_server, uvicorn_config = tf_server.build_server, uvicorn.Config

    def gated(*args, **kwargs):
        return Gate(build_server(*args, **kwargs), served.name, served.name, opts.api_key, chat_template, limits)

    class _Limited(uvicorn_config):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            connections.configure(self, limits)

    class _Gated(Serve):
        def run(self, *args, **kwargs) -> None:
            self.loader.__class__ = MergingLoader
            self.loader.describe = served.describe()
            tf_server.build_server, uvicorn.Config = gated, _Limited
            try:
                super().run(*args, **kwargs)
            finally:
                tf_server.build_server, uvicorn.Config = build_server, uvicorn_config

    _Gated(**_serve_kwargs(served, opts, facts))


def _continuous(opts: ServeOptions, facts: Facts) -> bool:
    return opts.batching == "continuous" or (opts.batching == "auto" and facts.cuda)


def _serve_kwargs(served: ServedModel, opts: ServeOptions, facts: Facts) -> dict:
    continuous = _continuous(opts, facts)
    # One device by default: transformers' "auto" is accelerate's device_map, whose per-module hooks cost every
    # decoding step; "auto" stays available for a model that needs several GPUs.
    device = opts.device or ("cuda" if facts.cuda else "cpu")
    return dict(force_model=served.name, continuous_batching=continuous, device=device, dtype=opts.dtype,
                trust_remote_code=served.trust_remote_code, host=opts.host, port=opts.port, log_level="warning")


def _transformers_server(served: ServedModel, opts: ServeOptions, facts: Facts, non_blocking: bool):
    from transformers.cli.serve import Serve

    class _Built(Serve):
        """transformers' server, built but not started, so the gate goes in front of its app first."""

        def start_server(self) -> None:
            pass

    return _Built(**_serve_kwargs(served, opts, facts), non_blocking=non_blocking)


def _loaded(server):
    """The (model, tokenizer) the server preloaded for its one model."""
    (timed,) = server._model_manager.loaded_models.values()
    return timed.model, timed.processor


def choose_engine(requested: str, facts: Facts) -> tuple[Engine, list[str]]:
    """The engine to run and a note per better engine passed over (why); a requested engine that cannot run here,
    or none at all, is a SameboxError naming every reason."""
    reasons = {e.name: e.unusable(facts) for e in ENGINES}
    if requested != "auto":
        engine = next((e for e in ENGINES if e.name == requested), None)
        if engine is None:
            raise SameboxError(f"unknown engine {requested!r}", f"choose auto or one of: {', '.join(reasons)}")
        if reasons[requested]:
            others = [f"--engine {n}" for n, why in reasons.items() if why is None]
            raise SameboxError(f"engine {requested} cannot run here: {reasons[requested]}",
                               f"use {' or '.join(others)}" if others else "")
        return engine, []
    notes = []
    for engine in ENGINES:
        if reasons[engine.name] is None:
            return engine, notes
        notes.append(f"{engine.name}: {reasons[engine.name]}")
    raise SameboxError("no serving engine can run here", "install transformers serve's extra (pip install fastapi "
                       "uvicorn openai) where transformers is new enough, or export a GGUF (samebox export RUN_DIR "
                       "--gguf OUT.gguf) and serve it with ollama", notes)


ENGINES: tuple[Engine, ...] = (
    Engine("vllm", _vllm_unusable, serve_vllm),
    Engine("transformers", _transformers_unusable, serve_transformers),
)


# --- checks before anything loads -------------------------------------------------------------------------------


def api_key(flag: str | None) -> str | None:
    """--api-key, else $SAMEBOX_API_KEY; empty means none."""
    key = flag if flag is not None else settings.api_key()
    return key or None


def check_port(host: str, port: int) -> None:
    """Bind the address the server will take (as uvicorn does, SO_REUSEADDR) and let it go: a port in use or a
    host that is not this machine's fails here, before minutes of model loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SameboxError(
                    f"port {port} is in use on {host}",
                    f"stop what listens there (`ss -ltnp 'sport = :{port}'` names it; ollama moved there with "
                    f"OLLAMA_HOST?) or pass another --port (on AutoDL the other public port is 6008)") from None
            if e.errno == errno.EACCES:
                raise SameboxError(f"no permission to listen on port {port}", "use a port above 1023") from None
            raise SameboxError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                               "--host takes an address of this machine: 0.0.0.0 (all), 127.0.0.1 (local only)"
                               ) from None


def banner(served: ServedModel, engine: Engine, notes: list[str], opts: ServeOptions, facts: Facts) -> str:
    """What the user reads before the weights load: engine and why, the address, a request that works."""
    lines = [f"samebox serve: engine {engine.name}" + (f" (passed over {'; '.join(notes)})" if notes else "")]
    public = " (AutoDL maps it to your instance's public address)" if facts.autodl and opts.port in (6006, 6008) \
        else ""
    lines.append(f"samebox serve: http://{opts.host}:{opts.port}/v1{public}")
    if opts.api_key:
        lines.append("samebox serve: API key required (Authorization: Bearer ...; from --api-key or "
                     f"{settings.API_KEY_VARIABLE})")
    elif opts.host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"samebox serve: no API key: anyone who reaches port {opts.port} can use the model; "
                     f"set {settings.API_KEY_VARIABLE} to require one")
    if engine.name == "transformers":
        limits = gate_limits(opts, facts)
        lines.append(f"samebox serve: at most {limits.max_concurrent} requests at once and {limits.max_queue} waiting "
                     f"(up to {limits.queue_timeout_s:g} s); past that 503 with Retry-After")
    auth = f" -H \"Authorization: Bearer ${settings.API_KEY_VARIABLE}\"" if opts.api_key else ""
    request = json.dumps({"model": served.name, "messages": [{"role": "user", "content": "hello"}]})
    lines.append(f"samebox serve: try: curl http://127.0.0.1:{opts.port}/v1/chat/completions"
                 f" -H 'Content-Type: application/json'{auth} -d '{request}'")
    return "\n".join(lines)


def serve(served: ServedModel, opts: ServeOptions, facts: Facts) -> int:
    engine, notes = choose_engine(opts.engine, facts)
    check_port(opts.host, opts.port)
    print(banner(served, engine, notes, opts, facts), flush=True)
    sys.stdout.flush()
    return engine.serve(served, opts, facts)
