"""trainer/data/formats.py: the data-format registry drives auto-detection, row checks, the config's choices and
tokenization; a new format is one entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from tests.trainer.conftest import write_jsonl
from trainer.config import DataConfig, load_config
from trainer.data import formats
from trainer.data.dataset import IGNORE, read_rows, tokenize_row


def test_config_choices_are_the_registry() -> None:
    for name in formats.FORMATS:
        assert load_config(None, ["model.name=m", "data.path=d", f"data.format={name}"]).data.format == name
    with pytest.raises(SameboxError) as e:
        load_config(None, ["model.name=m", "data.path=d", "data.format=sharegpt"])
    assert all(name in e.value.problems[0] for name in formats.FORMATS)


@pytest.mark.parametrize(("row", "expected"), [
    ({"messages": [], "prompt": "p", "completion": "c"}, "messages"),  # registry order decides between shapes
    ({"prompt": "p", "completion": "c", "instruction": "i", "output": "o"}, "prompt_completion"),
    ({"instruction": "i", "output": "o", "input": "x"}, "alpaca"),
    ({"instruction": "i"}, None),
])
def test_detection_follows_the_registry_order(row: dict, expected: str | None) -> None:
    found = formats.detect_format(row)
    assert (found.name if found else None) == expected


def test_rows_of_a_named_format_are_checked_by_its_entry(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}, {"instruction": "i", "output": "o"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(SameboxError) as e:
        read_rows(path, "prompt_completion")
    assert e.value.problems == [f"{path}:2: expected keys prompt (str) and completion (str)",
                                f"{path}:3: expected keys prompt (str) and completion (str)"]
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o", "input": None}])
    with pytest.raises(SameboxError, match="optional input"):
        read_rows(alpaca, "auto")


def test_a_new_format_is_one_registry_entry(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    qa = formats.DataFormat("qa", ("question", "answer"), "keys question (str) and answer (str)",
                            formats.strings("question", "answer"),
                            lambda tok, row, where: formats.completion_tokens(tok, row["question"] + "\n",
                                                                              row["answer"]))
    monkeypatch.setitem(formats.FORMATS, "qa", qa)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "reverse: cat dog", "answer": "dog cat"}])
    fmt, rows = read_rows(path, "auto")
    assert fmt == "qa"
    ids, targets, _ = tokenize_row(tokenizer, fmt, rows[0], DataConfig(path=str(path)), "t")
    trained = [t for t in targets if t != IGNORE]
    assert tokenizer.decode(trained[:-1]).strip() == "dog cat" and trained[-1] == tokenizer.eos_token_id
    with pytest.raises(SameboxError) as e:
        read_rows(write_jsonl(tmp_path / "odd.jsonl", [{"q": 1}]), "auto")
    assert "qa: keys question (str) and answer (str)" in e.value.problems[0]


def test_messages_need_a_chat_template(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", None)
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(SameboxError, match="row 3: messages rows need a tokenizer with a chat template"):
        tokenize_row(tokenizer, "messages", row, DataConfig(path="x"), "row 3")
    ids, _, _ = tokenize_row(tokenizer, "alpaca", {"instruction": "a", "output": "b"}, DataConfig(path="x"), "t")
    assert tokenizer.decode(ids).startswith("a\n\nb")  # alpaca without a template: plain text
