"""The gate in front of an engine's OpenAI-compatible app on a public port: an ASGI middleware, not a server.

It answers only the OpenAI routes samebox serves (the engine's admin routes, such as loading another model or
unloading this one, stay closed), checks the API key in constant time, lists the served model under its name, and
checks a request's shape before the engine sees it, so a bad request is a 4xx with a message in OpenAI's error
format, never a 500. A request that passes reaches the engine with ``model`` set to the engine's own name for it.

It also bounds the load (``Limits``): at most ``max_concurrent`` requests in the engine and ``max_queue`` more
waiting, first come first served, each at most ``queue_timeout_s``; past that a 503 with Retry-After at once, so a
client under a flood hears "busy" instead of timing out. A body must arrive within ``read_timeout_s`` (else 408)
and be at most ``max_body`` bytes (else 413), and the bodies being read at once total at most ``read_budget``
bytes (else 503): a slow or huge request costs its own connection, never another client's turn. The gate's memory
for bodies is so bounded: read_budget + (max_concurrent + max_queue) x max_body. What uvicorn does before a request
reaches the gate (headers, idle connections) is trainer/serve/connections.py's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
HEALTH = "/health"
ROUTES: dict[str, tuple[str, ...]] = {CHAT: ("POST",), COMPLETIONS: ("POST",), MODELS: ("GET",), HEALTH: ("GET",)}
ROLES = ("system", "developer", "user", "assistant", "tool")
RETRY_AFTER_S = 1  # a slot turns over in about one answer's time; a client that honours it spreads the retries


@dataclass(frozen=True)
class Limits:
    """How much the gate takes on at once (see the module docstring); `samebox serve` fills it from its options."""

    max_concurrent: int = 32
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    read_timeout_s: float = 30.0
    max_body: int = 8 << 20
    read_budget: int = 256 << 20


class RequestError(Exception):
    """A request answered by the gate: ``close`` when its body was not read to the end (the connection cannot carry
    another request), ``retry_after`` (seconds) on a 503."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 close: bool = False, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.close, self.retry_after = close, retry_after

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> list[tuple[bytes, bytes]]:
        extra = [(b"connection", b"close")] if self.close else []
        if self.retry_after is not None:
            extra.append((b"retry-after", str(self.retry_after).encode()))
        return extra


def busy(message: str, close: bool = False) -> RequestError:
    return RequestError(503, f"{message}; retry after {RETRY_AFTER_S} s", code="server_busy", close=close,
                        retry_after=RETRY_AFTER_S)


class Admission:
    """At most ``limit`` requests inside at once and at most ``queue`` more waiting for a turn, first come first
    served, each for at most ``wait_s`` seconds. ``enter`` returns once the request holds a turn (or raises the
    503 to answer); ``leave`` hands the turn to the first in the queue. One event loop, so no lock."""

    def __init__(self, limit: int, queue: int, wait_s: float) -> None:
        self.limit, self.queue, self.wait_s = limit, queue, wait_s
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()

    async def enter(self, gone: Receive) -> None:
        """``gone``: the request's receive, whose next message (its body read) is the client's disconnect: a client
        that leaves while queued leaves the queue, rather than taking a turn to answer no one."""
        if self.running < self.limit and not self.waiting:
            self.running += 1
            return
        if len(self.waiting) >= self.queue:
            raise busy(f"the server is busy ({self.running} requests running, {len(self.waiting)} waiting)")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        left = asyncio.ensure_future(gone())
        try:
            await asyncio.wait((turn, left), timeout=self.wait_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while waiting: give back the turn if it came meanwhile
            self._drop(turn)
            raise
        finally:
            left.cancel()
        if left.done() and not left.cancelled():
            self._drop(turn)
            raise RequestError(400, "the client went away while its request waited", close=True)
        if not turn.done():
            self._drop(turn)
            raise busy(f"the server is busy: no turn came within {self.wait_s:g} s in the queue")

    def leave(self) -> None:
        if self.waiting:
            self.waiting.popleft().set_result(None)  # the turn passes on: running stays the same
        else:
            self.running -= 1

    def _drop(self, turn: asyncio.Future[None]) -> None:
        if turn.done():
            self.leave()
        else:
            self.waiting.remove(turn)
            turn.cancel()


# --- request checks: one function per field, registered per route ----------------------------------------------


def _messages(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}] needs a 'role', one of {', '.join(ROLES)}", f"messages[{i}]")
        content = message.get("content")
        if not isinstance(content, (str, list)) and not (content is None and message["role"] == "assistant"):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts",
                               f"messages[{i}].content")


def _prompt(value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(400, "'prompt' must be a string", "prompt")


def _positive_int(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RequestError(400, f"'{name}' must be a positive integer, got {value!r}", name)
    return check


def _number(name: str, low: float, high: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not low <= value <= high):
            raise RequestError(400, f"'{name}' must be a number from {low:g} to {high:g}, got {value!r}", name)
    return check


def _flag(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not isinstance(value, bool):
            raise RequestError(400, f"'{name}' must be true or false, got {value!r}", name)
    return check


def _one_choice(value: Any) -> None:
    if value not in (None, 1):
        raise RequestError(400, "'n' must be 1: this server returns one choice per request", "n")


COMMON: dict[str, Callable[[Any], None]] = {
    "max_tokens": _positive_int("max_tokens"), "max_completion_tokens": _positive_int("max_completion_tokens"),
    "temperature": _number("temperature", 0.0, 2.0), "top_p": _number("top_p", 0.0, 1.0),
    "stream": _flag("stream"), "n": _one_choice,
}
REQUIRED: dict[str, dict[str, Callable[[Any], None]]] = {CHAT: {"messages": _messages},
                                                         COMPLETIONS: {"prompt": _prompt}}


# --- the middleware ---------------------------------------------------------------------------------------------


class Gate:
    """``Gate(app, name, engine_model, api_key, chat_template, limits)``: ``name`` is what clients ask for,
    ``engine_model`` what the engine calls the same model; ``chat_template`` False answers chat requests 400 (the
    tokenizer has none, so only /v1/completions can work)."""

    def __init__(self, app: App, name: str, engine_model: str, api_key: str | None, chat_template: bool,
                 limits: Limits = Limits()) -> None:
        self.app, self.name, self.engine_model = app, name, engine_model
        self.api_key = api_key.encode() if api_key else None
        self.chat_template = chat_template
        self.limits = limits
        self.admission = Admission(limits.max_concurrent, limits.max_queue, limits.queue_timeout_s)
        self.reading = 0  # bytes of the request bodies being read now

    def __repr__(self) -> str:  # never the key
        return f"Gate({self.name!r}, api_key={'set' if self.api_key else 'none'}, {self.limits})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._admit(scope, receive)
            if isinstance(body, bytes):
                await self.admission.enter(receive)
        except RequestError as e:
            await _respond(send, e.status, e.body(), e.headers())
            return
        if body is None:
            await self.app(scope, receive, send)
            return
        if isinstance(body, dict):
            await _respond(send, 200, body)
            return
        try:
            await self._forward(scope, receive, send, body)
        finally:
            self.admission.leave()

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: disconnects reach the engine as usual
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)

    async def _admit(self, scope: Scope, receive: Receive) -> bytes | dict | None:
        """The body to hand on, None to hand the request on untouched, a dict to answer with (200), or a
        RequestError raised to answer with."""
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        if path not in ROUTES:
            raise RequestError(404, f"no route {path}; this server answers {', '.join(ROUTES)}")
        if method not in ROUTES[path]:
            raise RequestError(405, f"{path} takes {' or '.join(ROUTES[path])}, not {method}")
        if path == HEALTH:
            return None
        if self.api_key is not None and not self._authorized(scope):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        if path == MODELS:
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                "owned_by": "samebox"}]}
        request = _parse(await self._read_body(scope, receive))
        self._check(path, request)
        request["model"] = self.engine_model
        return json.dumps(request).encode()

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key or b"")

    def _check(self, path: str, request: dict) -> None:
        model = request.get("model")
        if model is not None and model not in (self.name, self.engine_model):
            raise RequestError(404, f"model {model!r} is not served here; this server serves {self.name!r}", "model",
                               "model_not_found")
        if path == CHAT and not self.chat_template:
            raise RequestError(400, f"{self.name} has no chat template, so it cannot take chat messages; "
                                    f"send a plain prompt to {COMPLETIONS}", "messages")
        for field, check in REQUIRED[path].items():
            if field not in request:
                raise RequestError(400, f"'{field}' is required", field)
            check(request[field])
        for field, check in COMMON.items():
            check(request.get(field))


    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, read against one deadline and two ceilings: this request's (max_body, 413) and that of
        all bodies being read at once (read_budget, 503). A Content-Length over either is refused unread."""
        limits = self.limits
        too_big = RequestError(413, f"request body over {_size(limits.max_body)}: send a shorter one", close=True)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limits.max_body:
            raise too_big
        if declared.isdigit() and self.reading + int(declared) > limits.read_budget:
            raise busy("the server is busy reading other requests", close=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.read_timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise RequestError(408, f"the request body did not arrive within {limits.read_timeout_s:g} s",
                                       close=True) from None
                if message["type"] == "http.disconnect":
                    raise RequestError(400, "the client went away before its request arrived", close=True)
                chunk = message.get("body", b"")
                if size + len(chunk) > limits.max_body:
                    raise too_big
                if self.reading + len(chunk) > limits.read_budget:
                    raise busy("the server is busy reading other requests", close=True)
                chunks.append(chunk)
                size += len(chunk)
                self.reading += len(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
        finally:
            self.reading -= size


def _parse(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the request body is not JSON: {e}") from None
    except RecursionError:  # '[[[[...' thousands deep: the parser's stack, not a 500
        raise RequestError(400, "the request body is not JSON this server takes: nested too deep") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return request


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


async def _respond(send: Send, status: int, payload: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
