"""Load harness for `samebox serve` (any OpenAI-compatible server): K clients at once, each sending one completion
after another over a kept-alive connection, for T seconds or R requests in all; a JSON report of what came back.

  SAMEBOX_API_KEY=... python bench/serve_load.py --url http://127.0.0.1:6006 --model NAME --clients 64 --seconds 30
  python bench/serve_load.py --smoke --out /tmp/serve_load.json    # CPU: starts `samebox serve` on a tiny model

Each request ends as one of: ok (200 with a choice), refused (503 or 429 with Retry-After: the server said busy),
error (any other status, a 503/429 without Retry-After, a dropped connection) or hung (no answer within
--timeout). A refused client waits what Retry-After says (times 1 to 1.5, so the retries spread) before its next
request, as a well-behaved client does; --no-backoff sends the next at once. A kept-alive connection the server
closed while idle is retried once on a new one, as HTTP client libraries do (counted in stale_retries). After the
load, one more request (`after`) says whether the server still answers. The key comes from the environment
(--key-env), never argv.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
SMOKE_LIMITS = "--max-concurrent 2 --max-queue 8 --queue-timeout 5 --read-timeout 5"


@dataclass
class Tally:
    """What the clients saw, added to under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {"ok": [], "refused": []})
    started: int = 0
    stale_retries: int = 0

    def claim(self, limit: int | None) -> bool:
        """Whether another request may start (``limit``: requests in all, None for no limit)."""
        with self.lock:
            if limit is not None and self.started >= limit:
                return False
            self.started += 1
            return True

    def add(self, outcome: str, ms: float, status: int | None = None, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if status is not None:
                self.statuses[str(status)] += 1
            if error is not None:
                self.errors[error] += 1
            if outcome in self.latency_ms:
                self.latency_ms[outcome].append(ms)


@dataclass(frozen=True)
class Load:
    url: str
    model: str
    key: str | None
    clients: int
    seconds: float | None
    requests: int | None
    max_tokens: int
    timeout: float
    backoff: bool = True
    max_backoff: float = 10.0


STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Connection:
    """One client's kept-alive connection: ``post`` reconnects once where the server closed an idle one."""

    def __init__(self, load: Load, tally: Tally) -> None:
        self.load, self.tally = load, tally
        self.conn, self.used = self._open(), 0

    def _open(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.load.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), timeout=self.load.timeout)

    def reopen(self) -> None:
        self.conn.close()
        self.conn, self.used = self._open(), 0

    def post(self, body: bytes) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json"}
        if self.load.key:
            headers["Authorization"] = f"Bearer {self.load.key}"
        while True:
            try:
                self.conn.request("POST", "/v1/completions", body=body, headers=headers)
                response = self.conn.getresponse()
                result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
                break
            except STALE:
                if not self.used:
                    raise
                with self.tally.lock:
                    self.tally.stale_retries += 1
                self.reopen()
        self.used += 1
        if result[1].get("connection", "").lower() == "close":
            self.reopen()
        return result


def classify(status: int, headers: dict, data: bytes) -> tuple[str, str | None]:
    """(outcome, error kind) of one answer."""
    if status == 200:
        try:
            ok = bool(json.loads(data).get("choices"))
        except ValueError:
            ok = False
        return ("ok", None) if ok else ("error", "200 without a choice")
    if status in (429, 503):
        if headers.get("retry-after", "").strip().isdigit():
            return "refused", None
        return "error", f"{status} without Retry-After"
    return "error", f"status {status}"


def completion(load: Load, prompt: str) -> bytes:
    request = {"prompt": prompt, "max_tokens": load.max_tokens, "temperature": 0}
    if load.model:
        request["model"] = load.model
    return json.dumps(request).encode()


def client(index: int, load: Load, tally: Tally, stop_at: float) -> None:
    rng = random.Random(index)
    body = completion(load, f"red cat blue {index}")
    conn = Connection(load, tally)
    while time.monotonic() < stop_at and tally.claim(load.requests):
        start = time.perf_counter()
        try:
            status, headers, data = conn.post(body)
        except TimeoutError:
            tally.add("hung", (time.perf_counter() - start) * 1000, error="no answer within the timeout")
            conn.reopen()
            continue
        except (OSError, http.client.HTTPException) as e:
            tally.add("error", (time.perf_counter() - start) * 1000, error=type(e).__name__)
            conn.reopen()
            continue
        outcome, error = classify(status, headers, data)
        tally.add(outcome, (time.perf_counter() - start) * 1000, status, error)
        if outcome == "refused" and load.backoff:
            wait = min(float(headers["retry-after"]), load.max_backoff) * rng.uniform(1.0, 1.5)
            time.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
    conn.conn.close()


def after_check(load: Load) -> dict:
    """One request on a fresh connection once the load is over: does the server still answer, and how fast."""
    conn = Connection(load, Tally())
    start = time.perf_counter()
    try:
        status, headers, data = conn.post(completion(load, "after"))
        outcome, _ = classify(status, headers, data)
    except (OSError, http.client.HTTPException) as e:
        status, outcome = None, f"error: {type(e).__name__}"
    finally:
        conn.conn.close()
    return {"status": status, "outcome": outcome, "latency_ms": round((time.perf_counter() - start) * 1000, 1)}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50": round(statistics.median(ordered), 1), "p99": round(p99, 1), "max": round(ordered[-1], 1)}


def drive(load: Load) -> dict:
    """Run the load; the report (without the header main() adds)."""
    tally = Tally()
    stop_at = time.monotonic() + (load.seconds if load.seconds is not None else 10 ** 9)
    threads = [threading.Thread(target=client, args=(i, load, tally, stop_at), daemon=True)
               for i in range(load.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out = tally.outcomes
    return {
        "clients": load.clients, "seconds": load.seconds, "requests_limit": load.requests,
        "max_tokens": load.max_tokens, "client_timeout_s": load.timeout, "backoff": load.backoff,
        "wall_s": round(wall, 2), "requests": sum(out.values()), "ok": out["ok"], "refused": out["refused"],
        "errors": out["error"], "hung": out["hung"], "ok_per_s": round(out["ok"] / wall, 1),
        "statuses": dict(sorted(tally.statuses.items())), "error_kinds": dict(tally.errors),
        "stale_retries": tally.stale_retries,
        "ok_latency_ms": percentiles(tally.latency_ms["ok"]),
        "refused_latency_ms": percentiles(tally.latency_ms["refused"]),
        "after": after_check(load),
    }


# --- --smoke: a tiny model served here --------------------------------------------------------------------------


def smoke(args: argparse.Namespace) -> dict:
    # this directory's: the same tiny model, run directory and server start as the serving bench
    from serve_gpu import TINY, make_run, start_server, stop_server

    key = "sk-load-smoke"
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        run = make_run(Path(tmp), TINY, rank=8)
        proc, url = start_server(run, ["--device", "cpu", *shlex.split(args.serve_args)], Path(tmp) / "serve.log",
                                 {"SAMEBOX_API_KEY": key})
        try:
            report = drive(Load(url, run.name, key, args.clients, args.seconds, args.requests, args.max_tokens,
                                args.timeout, not args.no_backoff))
        finally:
            stop_server(proc, 20)
        log = (Path(tmp) / "serve.log").read_text()
        if key in log:
            raise SystemExit("the server's log shows the API key")
    report["server"] = f"samebox serve RUN --device cpu {args.serve_args} (tiny random Qwen2 + LoRA r8)"
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:6006 (or --smoke)")
    p.add_argument("--smoke", action="store_true", help="serve a tiny model on the CPU here and drive it")
    p.add_argument("--serve-args", default=SMOKE_LIMITS, help=f"--smoke: the server's options ({SMOKE_LIMITS})")
    p.add_argument("--model", default="", help="the model name to ask for (default: the server's own)")
    p.add_argument("--key-env", default="SAMEBOX_API_KEY", help="environment variable holding the API key")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=None, help="run this long (default 20 without --requests)")
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests in all")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds (hung past it)")
    p.add_argument("--no-backoff", action="store_true", help="after a 503/429, send the next request at once")
    p.add_argument("--out", help="write the JSON report here as well as to stdout")
    args = p.parse_args()
    if bool(args.url) == args.smoke:
        p.error("give --url or --smoke")
    if args.seconds is None and args.requests is None:
        args.seconds = 20.0
    if args.smoke:
        report = smoke(args)
    else:
        load = Load(args.url.rstrip("/"), args.model, os.environ.get(args.key_env) or None, args.clients,
                    args.seconds, args.requests, args.max_tokens, args.timeout, not args.no_backoff)
        report = drive(load)
    report = {"command": shlex.join(["python", *sys.argv]), "client_machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "smoke": args.smoke, **report}
    if args.smoke:  # the server ran here, on this transformers
        report["transformers"] = importlib.metadata.version("transformers")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
