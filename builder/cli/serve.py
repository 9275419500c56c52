"""`samebox serve RUN_DIR|MODEL [--adapter DIR] [--port N] [--host H] [--api-key KEY]`: an OpenAI-compatible
server (/v1/models, /v1/chat/completions with streaming, /v1/completions) for a trained LoRA adapter on its base.

Everything a user can get wrong (the run dir, the adapter against the base, the engine, the port) is checked before
the weights load. The API key comes from --api-key or $SAMEBOX_API_KEY and is never printed.
"""

from __future__ import annotations

import argparse

from builder.core import supported


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _count(least: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {least}")
        return int(text)
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (above 0, at most 3600)")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained adapter (or any model) over an OpenAI-compatible HTTP API")
    p.add_argument("target", metavar="RUN_DIR|MODEL",
                   help="a `samebox train` output dir (base from its config.yaml, adapter from adapter/), "
                        "or a model: local dir, hub id, modelscope://id")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter to serve on the base (default: RUN_DIR/adapter)")
    p.add_argument("--name", help="the model name clients ask for (default: the run or model directory's name)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0, all)")
    p.add_argument("--port", type=_port, default=None,
                   help="default: 6006 on AutoDL (its public port), else 8000")
    p.add_argument("--api-key", default=None, help="require this key (default: $SAMEBOX_API_KEY; none if unset)")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "transformers"),
                   help="auto: vLLM where installed against this torch, else transformers serve")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="weights' dtype (auto: as saved)")
    p.add_argument("--device", default=None,
                   help="transformers engine: cuda (default with a GPU), cpu, cuda:1, or auto (spread over GPUs)")
    p.add_argument("--batching", default="auto", choices=("auto", "continuous", "off"),
                   help="transformers engine: continuous batching (auto: on a GPU)")
    load = p.add_argument_group("under load (transformers engine; past these a client gets 503 with Retry-After)")
    load.add_argument("--max-concurrent", type=_count(1), default=None, metavar="N",
                      help="requests in the engine at once (default: 32 with continuous batching, else 4)")
    load.add_argument("--max-queue", type=_count(0), default=None, metavar="N",
                      help="requests waiting for a turn, first come first served (default: 2 x --max-concurrent)")
    load.add_argument("--queue-timeout", type=_seconds, default=30.0, metavar="S",
                      help="the longest a request waits for its turn (default: 30)")
    load.add_argument("--read-timeout", type=_seconds, default=30.0, metavar="S",
                      help="the longest a client takes to send a request's headers, and again its body (408; "
                           "default: 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    supported.require("serve")  # a release outside the tested range: said now, not mid-run
    from trainer.serve.served import resolve_model
    from trainer.serve.server import ServeOptions, api_key, default_port, probe, serve

    served = resolve_model(args.target, args.adapter, args.name)  # a wrong path fails before torch is imported
    facts = probe()
    opts = ServeOptions(host=args.host, port=args.port or default_port(facts), api_key=api_key(args.api_key),
                        engine=args.engine, dtype=args.dtype, device=args.device, batching=args.batching,
                        max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                        queue_timeout_s=args.queue_timeout, read_timeout_s=args.read_timeout)
    return serve(served, opts, facts)
