"""`samebox serve` under load, as a user runs it (a subprocess, the tiny model, small limits): a flood of 64 clients
gets answers or quick 503s with Retry-After, never a hang or another error, and the server answers afterwards;
malformed, oversized and slow (slow-loris) requests get their 4xx or their connection closed without stalling a
normal request sent beside them."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY, Server, post

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
READ_TIMEOUT = 2
QUEUE_TIMEOUT = 5
LIMITS = ["--max-concurrent", "2", "--max-queue", "8", "--queue-timeout", str(QUEUE_TIMEOUT),
          "--read-timeout", str(READ_TIMEOUT)]
COMPLETION = {"model": "tiny-sft", "prompt": "red cat blue", "max_tokens": 4}


@pytest.fixture(scope="module")
def limited(run_dir, tmp_path_factory):
    srv = Server([str(run_dir), *LIMITS], tmp_path_factory.mktemp("serve-load") / "serve.log",
                 {"SAMEBOX_API_KEY": API_KEY})
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def timed_post(url: str, payload: dict | bytes = COMPLETION) -> tuple[int, float]:
    start = time.monotonic()
    status, _ = post(url + "/v1/completions", payload)
    return status, time.monotonic() - start


def raw(server: Server, data: bytes) -> socket.socket:
    """A connection that has sent ``data`` and then nothing more."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(data)
    return s


def head(length: int | None = None, extra: str = "") -> bytes:
    lines = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Authorization: Bearer {API_KEY}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def answer(s: socket.socket) -> bytes:
    """All the server sends until it closes the connection (a reset, where it closed with our bytes unread, ends
    it too)."""
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_a_flood_of_64_clients_gets_answers_or_quick_503s_and_the_server_answers_after(limited, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--url", limited.url,
                           "--model", "tiny-sft", "--clients", "64", "--seconds", "8", "--timeout", "30",
                           "--out", str(out)], capture_output=True, text=True, timeout=180,
                          env={"SAMEBOX_API_KEY": API_KEY, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["hung"] == 0 and report["errors"] == 0, report
    assert report["ok"] > 0 and report["refused"] > 0, report  # 64 clients against 2 running + 8 queued
    assert set(report["statuses"]) == {"200", "503"}, report  # every 503 had Retry-After: else an error
    # a refusal comes at once (the queue full) or at the queue's deadline, never later
    refused = report["refused_latency_ms"]
    assert refused["p50"] < 1000 and refused["max"] < (QUEUE_TIMEOUT + 2) * 1000, refused
    assert report["after"]["outcome"] == "ok", report
    status, seconds = timed_post(limited.url)
    assert status == 200 and seconds < 10
    assert API_KEY not in limited.log.read_text()


def test_slow_loris_bodies_and_headers_do_not_stall_a_normal_request(limited):
    slow_bodies = [raw(limited, head(length=500) + b'{"prompt": "re') for _ in range(12)]
    slow_heads = [raw(limited, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(12)]
    idle = [socket.create_connection(("127.0.0.1", limited.port), timeout=30) for _ in range(12)]
    try:
        time.sleep(0.3)
        # 12 stalled bodies would fill 2 turns and 8 places in the queue if they held any: they hold none
        status, seconds = timed_post(limited.url)
        assert status == 200 and seconds < READ_TIMEOUT
        start = time.monotonic()
        for s in slow_bodies:
            reply = answer(s)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"did not arrive within 2 s" in reply
        for s in slow_heads + idle:
            assert answer(s) == b""  # closed, no request to answer
        assert time.monotonic() - start < READ_TIMEOUT + 3
    finally:
        for s in slow_bodies + slow_heads + idle:
            s.close()
    assert timed_post(limited.url)[0] == 200


def test_oversized_requests_are_refused_at_once_and_a_normal_request_passes_beside_them(limited):
    declared = raw(limited, head(length=100 << 20) + b'{"prompt": "')
    reply = answer(declared)
    assert reply.startswith(b"HTTP/1.1 413") and b"over 8 MiB" in reply
    declared.close()

    # no Content-Length: chunked, 1 MiB at a time, a normal request in the middle, until the server answers
    chunked = raw(limited, head(extra="Transfer-Encoding: chunked\r\n"))
    piece = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
    for sent in range(1, 13):
        if sent == 4:
            assert timed_post(limited.url)[0] == 200
        try:
            chunked.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([chunked], [], [], 0.05)[0]:
            break
    reply = answer(chunked)
    assert reply.startswith(b"HTTP/1.1 413") and b"over 8 MiB" in reply and 8 <= sent <= 12, (sent, reply[:200])
    chunked.close()

    huge_headers = raw(limited, head(length=2, extra="X-Pad: " + "a" * (32 << 10) + "\r\n") + b"{}")
    assert answer(huge_headers).startswith(b"HTTP/1.1 400")  # headers past uvicorn's 16 KiB
    huge_headers.close()
    assert timed_post(limited.url)[0] == 200


@pytest.mark.parametrize(("payload", "message"), [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deep"),
    (b'{"prompt": "red", "max_tokens": 4', "not JSON"),
    (b"\xff" * 1000, "not JSON"),
])
def test_malformed_json_is_a_400_and_the_server_keeps_answering(limited, payload, message):
    status, body = post(limited.url + "/v1/completions", payload)
    assert status == 400 and message in body["error"]["message"]
    assert timed_post(limited.url)[0] == 200


def test_the_banner_states_the_limits(limited):
    assert "at most 2 requests at once and 8 waiting (up to 5 s); past that 503 with Retry-After" in \
        limited.log.read_text()
