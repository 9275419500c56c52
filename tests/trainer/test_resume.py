"""Nothing lost: SIGTERM saves at the next step boundary and exits 0; --resume auto continues with the same losses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder.core.errors import SameboxError
from trainer.loop.recipe import LoRAFinetuneRecipe

REPO = Path(__file__).resolve().parents[2]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _losses(recipe: LoRAFinetuneRecipe, steps: int) -> list[float]:
    recipe.model.train()
    return [recipe._train_one()["loss"] for _ in range(steps)]


@pytest.mark.slow
def test_sigterm_then_resume_auto_gives_identical_losses(make_config, tmp_path):
    overrides = ("train.max_steps=100000", "lora.dropout=0.1", "output.save_every_steps=1000", "output.keep_last=2",
                 "train.micro_batch_tokens=512", "train.samples_per_step=4")
    cfg = make_config(overrides=overrides, name="interrupted")
    run_dir = Path(cfg.output.dir)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "builder", "train", str(config_file), "--no-preflight"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(_rows(run_dir)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    stopped_at = len(_rows(run_dir))
    assert stopped_at >= 3
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{stopped_at:08d}"]

    reference = LoRAFinetuneRecipe(make_config(overrides=overrides, name="reference"))
    reference.setup()
    expected = _losses(reference, stopped_at + 4)
    reference.cleanup()
    assert [r["loss"] for r in _rows(run_dir)] == pytest.approx(expected[:stopped_at], rel=1e-6)

    resumed = LoRAFinetuneRecipe(cfg, resume="auto")
    resumed.setup()
    assert resumed.step == stopped_at
    assert _losses(resumed, 4) == pytest.approx(expected[stopped_at:], rel=1e-6, abs=0)
    resumed.cleanup()


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_path_fails(make_config, tmp_path):
    cfg = make_config(overrides=("train.max_steps=1",))
    recipe = LoRAFinetuneRecipe(cfg, resume="auto")
    recipe.setup()
    assert recipe.step == 0 and recipe.resumed_from is None
    assert recipe.train() == 0
    recipe.cleanup()
    done = LoRAFinetuneRecipe(cfg, resume="auto")
    done.setup()
    assert done.step == 1 and done.train() == 0  # finished: nothing to do
    done.cleanup()
    with pytest.raises(SameboxError, match="not a checkpoint directory"):
        LoRAFinetuneRecipe(cfg, resume=str(tmp_path)).setup()


def test_resume_refuses_a_different_data_order(make_config):
    make_recipe = LoRAFinetuneRecipe(make_config(overrides=("train.max_steps=1",)))
    make_recipe.setup()
    make_recipe.train()
    make_recipe.cleanup()
    changed = make_config(overrides=("train.max_steps=1", "train.seed=7"))
    with pytest.raises(SameboxError, match="data order would differ"):
        LoRAFinetuneRecipe(changed, resume="auto").setup()
