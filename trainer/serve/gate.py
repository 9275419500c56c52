"""The gate in front of an engine's OpenAI-compatible app on a public port: an ASGI middleware, not a server.

It answers only the OpenAI routes samebox serves (the engine's admin routes, such as loading another model or
unloading this one, stay closed), checks the API key in constant time, lists the served model under its name, and
checks a request's shape before the engine sees it, so a bad request is a 4xx with a message in OpenAI's error
format, never a 500. A request that passes reaches the engine with ``model`` set to the engine's own name for it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 8 << 20
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
HEALTH = "/health"
ROUTES: dict[str, tuple[str, ...]] = {CHAT: ("POST",), COMPLETIONS: ("POST",), MODELS: ("GET",), HEALTH: ("GET",)}
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


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
    """``Gate(app, name, engine_model, api_key, chat_template)``: ``name`` is what clients ask for, ``engine_model``
    what the engine calls the same model; ``chat_template`` False answers chat requests 400 (the tokenizer has
    none, so only /v1/completions can work)."""

    def __init__(self, app: App, name: str, engine_model: str, api_key: str | None, chat_template: bool) -> None:
        self.app, self.name, self.engine_model = app, name, engine_model
        self.api_key = api_key.encode() if api_key else None
        self.chat_template = chat_template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._admit(scope, receive)
        except RequestError as e:
            await _respond(send, e.status, e.body())
            return
        if body is None:
            await self.app(scope, receive, send)
            return
        if isinstance(body, dict):
            await _respond(send, 200, body)
            return
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
        request = await _read_json(receive)
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


async def _read_json(receive: Receive) -> dict:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "the client went away before its request arrived")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY >> 20} MiB")
        if not message.get("more_body"):
            break
    try:
        request = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the request body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return request


async def _respond(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
