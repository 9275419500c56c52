"""Training data formats: the registry of JSONL row shapes the trainer reads, each one declaration.

A ``DataFormat`` says which keys mark its rows (auto-detection tries the registry in order), what a valid row holds
(``valid``, and ``expects`` for the error message naming the file and line), and how a row becomes token ids with a
mask of the trained ones (``tokens``). A new format is one entry in ``FORMATS``; data.format's choices, the
malformed-row messages and the tokenizer all read it from there. Imports no torch: the config schema reads it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from builder.core.errors import SameboxError

Tokens = tuple[list[int], list[bool]]  # token ids, and whether each is trained (predicted by the one before it)


@dataclass(frozen=True)
class DataFormat:
    name: str
    keys: tuple[str, ...]  # a row holding all of these is taken for this format (data.format=auto)
    expects: str  # what a valid row holds, as the malformed-row message says it
    valid: Callable[[dict[str, Any]], bool]
    tokens: Callable[[Any, dict[str, Any], str], Tokens]  # (tokenizer, row, where the row is) -> Tokens


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_tokens(tokenizer: Any, prompt: str, completion: str) -> Tokens:
    """A prompt (not trained) followed by its completion (trained), each encoded on its own."""
    p, c = encode(tokenizer, prompt), encode(tokenizer, completion)
    return p + c, [False] * len(p) + [True] * len(c)


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Tokens:
    """Render the chat template turn by turn; assistant turns are the trained spans."""
    if not tokenizer.chat_template:
        raise SameboxError(f"{where}: messages rows need a tokenizer with a chat template",
                           hint="use alpaca or prompt_completion rows for a base model without one")
    ids: list[int] = []
    trained: list[bool] = []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            prefix = encode(tokenizer, tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                                                     add_generation_prompt=True)) if i else []
        full = encode(tokenizer, tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if full[: len(ids)] != ids or (msg["role"] == "assistant" and full[: len(prefix)] != prefix):
            raise SameboxError(f"{where}: the chat template does not render turns as prefixes of each other",
                               hint="use prompt_completion rows with the conversation rendered by you")
        if msg["role"] == "assistant":
            trained += [False] * (len(prefix) - len(ids)) + [True] * (len(full) - len(prefix))
        else:
            trained += [False] * (len(full) - len(ids))
        ids = full
    return ids, trained


def strings(*required: str, optional: tuple[str, ...] = ()) -> Callable[[dict[str, Any]], bool]:
    """A row check: every ``required`` key holds a string, and each ``optional`` key present does."""
    def valid(row: dict[str, Any]) -> bool:
        return all(isinstance(row.get(k), str) for k in required) and all(
            isinstance(row[k], str) for k in optional if k in row)
    return valid


def _valid_messages(row: dict[str, Any]) -> bool:
    msgs = row.get("messages")
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ) and any(m["role"] == "assistant" for m in msgs)


def _messages(tokenizer: Any, row: dict[str, Any], where: str) -> Tokens:
    return chat_tokens(tokenizer, row["messages"], where)


def _prompt_completion(tokenizer: Any, row: dict[str, Any], where: str) -> Tokens:
    return completion_tokens(tokenizer, row["prompt"], row["completion"])


def _alpaca(tokenizer: Any, row: dict[str, Any], where: str) -> Tokens:
    """The instruction (and input) as the user's turn of the chat template, when the tokenizer has one; the output
    follows as the completion."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        return completion_tokens(tokenizer, prompt, row["output"])
    return completion_tokens(tokenizer, f"{user}\n\n", row["output"])


# The data formats, in the order data.format=auto tries them. A new format is one entry here.
FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("messages", ("messages",),
               "key messages: a list of {role, content} with at least one assistant turn", _valid_messages,
               _messages),
    DataFormat("prompt_completion", ("prompt", "completion"), "keys prompt (str) and completion (str)",
               strings("prompt", "completion"), _prompt_completion),
    DataFormat("alpaca", ("instruction", "output"), "keys instruction (str), output (str) and optional input (str)",
               strings("instruction", "output", optional=("input",)), _alpaca),
)}


def detect_format(row: dict[str, Any]) -> DataFormat | None:
    """The first format whose keys the row holds."""
    return next((f for f in FORMATS.values() if all(k in row for k in f.keys)), None)
