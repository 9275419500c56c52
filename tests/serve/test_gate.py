"""The gate alone (an ASGI app around a stand-in engine, no server): its turns and queue, its deadlines and ceilings
on request bodies, and its API key check. tests/serve/test_serve_load.py drives the same through a real server."""

from __future__ import annotations

import asyncio
import json

import pytest

from trainer.serve import gate as gate_module
from trainer.serve.gate import Gate, Limits

KEY = "sk-gate-7d1f0a"
COMPLETION = json.dumps({"prompt": "red", "max_tokens": 2}).encode()


class Engine:
    """A stand-in engine: answers 200 once ``release`` is set (set from the start unless ``hold``), counting the
    requests it got."""

    def __init__(self, hold: bool = False) -> None:
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await receive()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def scope(path: str = "/v1/completions", key: str | None = KEY, length: int | None = None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


def body_of(*chunks: bytes, then: asyncio.Event | None = None):
    """A receive that gives ``chunks`` and then waits (for ``then``, or forever) before the disconnect."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await (then or asyncio.Event()).wait()
        return {"type": "http.disconnect"}
    return receive


def trickle(first: bytes):
    """A slow-loris body: one chunk, then nothing."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.Event().wait()
    return receive


async def call(app, scope_: dict, receive) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request through ``app``."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope_, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(body)


def make_gate(engine, **limits) -> Gate:
    return Gate(engine, "tiny-sft", "tiny-sft", KEY, chat_template=True, limits=Limits(**limits))


def test_past_the_running_and_queued_requests_a_503_with_retry_after_at_once():
    async def main():
        engine = Engine(hold=True)
        gate = make_gate(engine, max_concurrent=1, max_queue=1, queue_timeout_s=30)
        first = asyncio.ensure_future(call(gate, scope(), body_of(COMPLETION)))
        second = asyncio.ensure_future(call(gate, scope(), body_of(COMPLETION)))
        await asyncio.sleep(0.05)
        assert (gate.admission.running, len(gate.admission.waiting), engine.calls) == (1, 1, 1)
        started = asyncio.get_running_loop().time()
        status, headers, body = await call(gate, scope(), body_of(COMPLETION))
        assert asyncio.get_running_loop().time() - started < 1.0
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert body["error"]["code"] == "server_busy" and "retry after 1 s" in body["error"]["message"]
        engine.release.set()  # the queued request gets the turn the first gives back
        assert (await first)[0] == 200 and (await second)[0] == 200
        assert engine.calls == 2 and (gate.admission.running, len(gate.admission.waiting)) == (0, 0)
    asyncio.run(main())


def test_a_queued_request_waits_no_longer_than_the_queue_timeout():
    async def main():
        engine = Engine(hold=True)
        gate = make_gate(engine, max_concurrent=1, max_queue=4, queue_timeout_s=0.3)
        first = asyncio.ensure_future(call(gate, scope(), body_of(COMPLETION)))
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        status, headers, body = await call(gate, scope(), body_of(COMPLETION))
        waited = asyncio.get_running_loop().time() - started
        assert status == 503 and b"retry-after" in headers and "within 0.3 s" in body["error"]["message"]
        assert 0.25 < waited < 2.0
        assert len(gate.admission.waiting) == 0 and engine.calls == 1
        engine.release.set()
        assert (await first)[0] == 200 and gate.admission.running == 0
    asyncio.run(main())


def test_a_client_that_leaves_while_queued_never_reaches_the_engine():
    async def main():
        engine = Engine(hold=True)
        gate = make_gate(engine, max_concurrent=1, max_queue=4, queue_timeout_s=30)
        first = asyncio.ensure_future(call(gate, scope(), body_of(COMPLETION)))
        leave = asyncio.Event()
        queued = asyncio.ensure_future(call(gate, scope(), body_of(COMPLETION, then=leave)))
        await asyncio.sleep(0.05)
        assert len(gate.admission.waiting) == 1
        leave.set()
        await asyncio.wait_for(queued, 1)  # at once, not at the queue timeout
        assert len(gate.admission.waiting) == 0
        engine.release.set()
        await first
        assert engine.calls == 1 and gate.admission.running == 0
    asyncio.run(main())


def test_a_slow_body_gets_408_and_a_normal_request_passes_meanwhile():
    async def main():
        engine = Engine()
        gate = make_gate(engine, max_concurrent=1, max_queue=0, read_timeout_s=0.5)
        slow = asyncio.ensure_future(call(gate, scope(length=1000), trickle(b'{"prompt": "re')))
        await asyncio.sleep(0.05)
        status, _, _ = await asyncio.wait_for(call(gate, scope(), body_of(COMPLETION)), 0.3)
        assert status == 200 and not slow.done()  # the slow body holds no turn: max_queue=0 would refuse otherwise
        status, headers, body = await asyncio.wait_for(slow, 2)
        assert status == 408 and headers[b"connection"] == b"close"
        assert "did not arrive within 0.5 s" in body["error"]["message"]
        assert gate.reading == 0
    asyncio.run(main())


def test_oversized_bodies_are_413_declared_or_not():
    async def main():
        engine = Engine()
        gate = make_gate(engine, max_body=1024)

        async def unread() -> dict:
            raise AssertionError("a declared oversized body is refused before it is read")

        status, headers, body = await call(gate, scope(length=4096), unread)
        assert status == 413 and headers[b"connection"] == b"close" and "over 1024 bytes" in body["error"]["message"]
        status, _, _ = await call(gate, scope(), body_of(b'{"prompt": "', b"x" * 600, b"x" * 600, b'"}'))
        assert status == 413 and engine.calls == 0 and gate.reading == 0
    asyncio.run(main())


def test_bodies_being_read_at_once_are_bounded():
    async def main():
        gate = make_gate(Engine(), read_budget=1000, read_timeout_s=5)
        slow = asyncio.ensure_future(call(gate, scope(), trickle(b" " * 800)))
        await asyncio.sleep(0.05)
        assert gate.reading == 800
        status, headers, _ = await call(gate, scope(), body_of(b" " * 300, COMPLETION))
        assert status == 503 and b"retry-after" in headers
        status, _, _ = await call(gate, scope(), body_of(COMPLETION))  # fits beside the 800 bytes
        assert status == 200
        slow.cancel()
    asyncio.run(main())


@pytest.mark.parametrize(("payload", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    (b'{"prompt": "a", ', "not JSON"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_json_is_a_400(payload, message):
    status, _, body = asyncio.run(call(make_gate(Engine()), scope(), body_of(payload)))
    assert status == 400 and message in body["error"]["message"]


def test_api_key_is_compared_in_constant_time_and_never_echoed(monkeypatch):
    compared = []

    def compare_digest(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(gate_module.hmac, "compare_digest", compare_digest)
    gate = make_gate(Engine())
    status, _, body = asyncio.run(call(gate, scope(key="sk-wrong-guess"), body_of(COMPLETION)))
    assert status == 401 and compared == [(b"sk-wrong-guess", KEY.encode())]
    text = json.dumps(body)
    assert KEY not in text and "sk-wrong-guess" not in text
    assert KEY not in repr(gate) and KEY not in str(vars(gate.limits))
    assert asyncio.run(call(gate, scope(), body_of(COMPLETION)))[0] == 200
