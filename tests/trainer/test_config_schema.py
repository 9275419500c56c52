"""Every config field, through the real command: a value of the wrong type and one out of range exit 2 with the
field's name and what it takes, never a traceback. The table must cover the whole schema (trainer/config.py)."""

from __future__ import annotations

import pytest

from builder.cli import main as cli_main
from builder.core.errors import SameboxError
from trainer.config import load_config, schema

# field -> (a value of the wrong type, a value of the right type out of its range; None: the type has no range).
# Values are written as on the command line (parsed as YAML scalars).
BAD = {
    "model.name": ("[a, b]", "''"),
    "model.source": ("[hub]", "github"),
    "model.revision": ("{a: 1}", "''"),
    "model.quantization": ("4", "int8"),
    "model.dtype": ("16", "fp8"),
    "model.attention": ("[sdpa]", "flash_attention_3"),
    "model.gradient_checkpointing": ("1.5", "sometimes"),
    "model.trust_remote_code": ("maybe", None),
    "lora.r": ("abc", "0"),
    "lora.alpha": ("[1]", "-4"),
    "lora.dropout": ("abc", "1.0"),
    "lora.targets": ("7", "[]"),
    "data.path": ("{a: 1}", "''"),
    "data.format": ("1", "csv"),
    "data.max_length": ("long", "1"),
    "data.train_on_prompt": ("maybe", None),
    "data.packing": ("0.5", "always"),
    "data.shuffle": ("maybe", None),
    "data.cache_dir": ("[x]", "''"),
    "train.epochs": ("one", "0"),
    "train.max_steps": ("2.5", "0"),
    "train.samples_per_step": ("abc", "-1"),
    "train.micro_batch_tokens": ("100.5", "0"),
    "train.lr": ("fast", "0"),
    "train.weight_decay": ("abc", "-0.1"),
    "train.warmup_ratio": ("abc", "1.5"),
    "train.min_lr_ratio": ("abc", "2"),
    "train.max_grad_norm": ("abc", "0"),
    "train.seed": ("abc", "-1"),
    "train.loss_chunk_tokens": ("many", "0"),
    "train.fused": ("2", "maybe"),
    "train.offload_activations": ("2", "cpu"),
    "train.shard": ("[fsdp]", "zero3"),
    "output.dir": ("[a]", "''"),
    "output.save_every_steps": ("often", "0"),
    "output.save_every_minutes": ("abc", "-5"),
    "output.keep_last": ("all", "0"),
    "output.log_every_steps": ("abc", "0"),
    "output.tensorboard": ("3", "maybe"),
    "output.tensorboard_dir": ("[x]", "''"),
    "output.wandb_project": ("{a: b}", "''"),
}
CASES = [(f, which, value) for f, pair in BAD.items() for which, value in zip(("type", "range"), pair, strict=True)
         if value is not None]


def test_the_table_covers_every_field_and_only_booleans_lack_a_range():
    fields = schema()
    assert sorted(BAD) == sorted(fields)
    assert {f for f, (_, out) in BAD.items() if out is None} == {f for f, (r, _) in fields.items() if r.kind == "bool"}


@pytest.mark.parametrize(("field", "which", "value"), CASES, ids=[f"{f}-{w}" for f, w, _ in CASES])
def test_a_bad_value_exits_2_naming_the_field_and_what_works(tmp_path, capsys, field, which, value):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: m\ndata:\n  path: d.jsonl\n")
    assert cli_main(["train", str(config), "--no-preflight", f"{field}={value}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if field in x)
    rule = schema()[field][0]
    assert rule.describe() in line, line  # what the field takes, in the field's own line


def test_the_fields_the_issue_named_and_the_values_that_do_work():
    with pytest.raises(SameboxError) as e:
        load_config(None, ["model.name=m", "data.path=d", "lora.dropout=abc", "train.warmup_ratio=abc",
                           "train.max_grad_norm=abc", "data.shuffle=maybe", "train.micro_batch_tokens=100.5"])
    assert len(e.value.problems) == 5
    cfg = load_config(None, ["model.name=m", "data.path=d", "train.micro_batch_tokens=auto", "train.fused=false",
                             "train.offload_activations=true", "train.lr=2e-4", "model.revision=1234",
                             "train.max_steps=null", "output.tensorboard=true", "lora.dropout=0"])
    t = cfg.train
    assert (t.micro_batch_tokens, t.fused, t.offload_activations, t.lr) == ("auto", "false", "true", 2e-4)
    assert (cfg.model.revision, cfg.output.tensorboard, cfg.lora.dropout) == ("1234", "true", 0.0)
    assert load_config(None, ["model.name=m", "data.path=d"]).train.micro_batch_tokens == 16384
