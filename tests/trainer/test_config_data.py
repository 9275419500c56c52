"""Config loading/validation, shipped configs, data formats, EOS in the labels, malformed rows, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from tests.trainer.conftest import alpaca_rows, write_jsonl
from trainer.config import DataConfig, load_config
from trainer.data.dataset import IGNORE, load_dataset, read_rows, tokenize_row

REPO = Path(__file__).resolve().parents[2]


def test_unknown_keys_are_errors_naming_the_valid_ones(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: x\n  quantisation: nf4\ntrian:\n  lr: 1\n")
    with pytest.raises(SameboxError) as e:
        load_config(cfg)
    text = str(e.value)
    assert "unknown key model.quantisation" in text and "quantization" in text
    assert "unknown section 'trian'" in text and "train" in text


def test_every_problem_is_reported_and_overrides_apply(tmp_path):
    with pytest.raises(SameboxError) as e:
        load_config(None, ["model.name=m", "data.path=d", "model.dtype=fp8", "train.lr=-1", "data.packing=maybe"])
    assert len(e.value.problems) == 3
    cfg = load_config(None, ["model.name=m", "data.path=d", "train.lr=2e-4", "data.packing=true",
                             "lora.targets=q_proj,v_proj"])
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.data.packing == "true"
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    with pytest.raises(SameboxError, match="section.key=value"):
        load_config(None, ["lr=1"])


def test_overrides_may_follow_the_flags():
    from builder.cli import build_parser

    args = build_parser().parse_args(["train", "c.yaml", "a.b=1", "--resume", "auto", "c.d=2", "--no-preflight"])
    assert (args.config, args.overrides, args.resume, args.no_preflight) == ("c.yaml", ["a.b=1", "c.d=2"], "auto",
                                                                              True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "c.yaml", "--resume", "auto", "--bogus"])


def test_every_shipped_config_loads_and_says_how_to_run_it():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        first = path.read_text().splitlines()[0]
        cfg = load_config(path)
        # A sharded config needs its processes: its command is the launcher's.
        launcher = "# torchrun --nproc_per_node 2 -m builder" if cfg.train.shard == "fsdp" else "# samebox"
        assert first.startswith(f"{launcher} train configs/{path.name}"), path
        assert cfg.model.name and cfg.data.path


def test_formats_train_completion_and_eos(tokenizer):
    cfg = DataConfig(path="x", max_length=512)
    eos = tokenizer.eos_token_id
    for fmt, row in [("alpaca", {"instruction": "reverse: cat dog", "output": "dog cat"}),
                     ("prompt_completion", {"prompt": "reverse: cat dog\n", "completion": "dog cat"}),
                     ("messages", {"messages": [{"role": "user", "content": "reverse: cat dog"},
                                                {"role": "assistant", "content": "dog cat"}]})]:
        ids, targets, truncated = tokenize_row(tokenizer, fmt, row, cfg, "t")
        assert ids[-1] == eos and targets[-2] == eos and targets[-1] == IGNORE, fmt
        assert not truncated and len(ids) == len(targets)
        trained = [t for t in targets if t != IGNORE]
        assert tokenizer.decode(trained[:-1]).strip() == "dog cat", fmt  # the prompt is not trained
    cfg_all = DataConfig(path="x", max_length=4, train_on_prompt=True)
    ids, targets, truncated = tokenize_row(tokenizer, "alpaca", {"instruction": "a b c d e f", "output": "g"},
                                           cfg_all, "t")
    assert truncated and len(ids) == 4 and targets[:3] == ids[1:]


def test_multi_turn_messages_train_only_assistant_turns(tokenizer):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                        {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
                        {"role": "assistant", "content": "four"}]}
    ids, targets, _ = tokenize_row(tokenizer, "messages", row, DataConfig(path="x"), "t")
    text = tokenizer.decode([t for t in targets if t != IGNORE])
    assert "two" in text and "four" in text and "one" not in text and "three" not in text


def test_malformed_rows_fail_with_file_and_line(tmp_path):
    rows = alpaca_rows(2) + ['{"instruction": "x"', {"instruction": 3, "output": "y"}, {"prompt": "p"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SameboxError) as e:
        read_rows(path, "auto")
    problems = e.value.problems
    assert problems[0].startswith(f"{path}:3: not valid JSON")
    assert problems[1] == f"{path}:4: expected keys instruction (str), output (str) and optional input (str)"
    assert problems[2].startswith(f"{path}:5: expected")
    with pytest.raises(SameboxError, match="unknown row shape"):
        read_rows(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}]), "auto")


def test_tokenization_is_cached_by_content(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(10))
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    first, cached1 = load_dataset(cfg, tokenizer)
    second, cached2 = load_dataset(cfg, tokenizer)
    assert (cached1, cached2) == (False, True)
    assert first.input_ids == second.input_ids and first.targets == second.targets
    write_jsonl(path, alpaca_rows(11))
    third, cached3 = load_dataset(cfg, tokenizer)
    assert not cached3 and len(third) == 11
