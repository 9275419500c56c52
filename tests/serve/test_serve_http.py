"""`samebox serve RUN_DIR` as a user runs it (a subprocess, transformers serve behind the gate), asked by the
`openai` client and by plain HTTP: it answers with the adapter's output, streams, lists its model, refuses a wrong
key, and turns bad requests into 4xx with a message while it keeps serving."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.serve.conftest import API_KEY, post

# every test here talks to a real `samebox serve` process over HTTP
pytestmark = pytest.mark.integration

PROMPT = "red cat blue"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(base_dir, run_dir):
    """Greedy output of plain transformers for PROMPT: base alone and base + adapter. They must differ, or the
    test could not tell which one the server runs."""
    from transformers import AutoTokenizer

    from tests.serve.conftest import greedy_text

    ids = AutoTokenizer.from_pretrained(base_dir)(PROMPT)["input_ids"]
    base = greedy_text(base_dir, ids, None, MAX_TOKENS)
    tuned = greedy_text(base_dir, ids, run_dir / "adapter", MAX_TOKENS)
    assert base != tuned
    return {"base": base, "adapter": tuned}


def test_completion_is_the_adapters_output(client, expected):
    reply = client.completions.create(model="tiny-sft", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == expected["adapter"]
    assert reply.choices[0].text != expected["base"]
    assert reply.usage.completion_tokens <= MAX_TOKENS


def test_chat_answers_and_streams_the_same_text(client):
    messages = [{"role": "user", "content": "reverse: sun moon"}]
    whole = client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    assert "<|im_start|>" not in text and "reverse: sun moon" not in text  # the reply, not the prompt

    chunks = list(client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # streamed token by token, not one block at the end
    # A random model's last byte tokens can end inside a UTF-8 character: the whole decode shows such a tail as
    # U+FFFD; the stream holds it back (transformers up to 5.24) or sends it as U+FFFD too (5.25 on).
    assert "".join(pieces).rstrip("\ufffd") == text.rstrip("\ufffd")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_lists_the_served_name(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-sft"]
    request = urllib.request.Request(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-sft"


def test_plain_http_chat(server):
    status, body = post(server.url + "/v1/chat/completions",
                        {"model": "tiny-sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] <= 4


def test_wrong_or_missing_api_key_is_refused(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-sft", prompt="red", max_tokens=2)
    status, body = post(server.url + "/v1/completions", {"prompt": "red", "max_tokens": 2}, key=None)
    assert status == 401 and "API key" in body["error"]["message"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:  # health needs no key: for probes
        assert r.status == 200


BAD_REQUESTS = [
    ("/v1/chat/completions", {"model": "tiny-sft"}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "needs a 'role'"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -3}, 400, "'max_tokens' must be a positive integer"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4o"}, 404, "'gpt-4o' is not served here"),
    ("/v1/completions", b"{not json", 400, "not JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/reset", {}, 404, "no route /reset"),  # the engine's admin routes stay closed on a public port
    ("/load_model", {"model": "Qwen/Qwen2.5-7B"}, 404, "no route /load_model"),
]


@pytest.mark.parametrize(("path", "payload", "status", "message"), BAD_REQUESTS)
def test_bad_request_is_a_4xx_with_a_message(server, path, payload, status, message):
    got, body = post(server.url + path, payload)
    assert got == status, body
    assert message in body["error"]["message"]


def test_bad_request_through_the_client_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError, match="positive integer"):
        client.completions.create(model="tiny-sft", prompt="red", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="red", max_tokens=2)
    assert client.completions.create(model="tiny-sft", prompt="red", max_tokens=2).choices[0].text is not None


def test_log_names_engine_and_never_the_key(server, client):
    client.completions.create(model="tiny-sft", prompt="red", max_tokens=2)
    log = server.log.read_text()
    assert "engine transformers" in log and "LoRA merged into the weights" in log
    assert API_KEY not in log
