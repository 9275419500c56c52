"""`samebox train` across two machines, as torchrun's rendezvous runs it: two torchrun agents (one per "node", one
process each) meeting at a c10d rendezvous endpoint, here both on localhost with gloo. The losses must be the
one-process run's (the same check as tests/trainer/test_distributed.py, over nodes instead of local ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.loop.recipe import LoRAFinetuneRecipe

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_train_like_one_process(make_config, tmp_path):
    overrides = ("train.max_steps=3", "train.samples_per_step=8", "train.micro_batch_tokens=256",
                 "output.save_every_steps=1000")
    cfg = make_config(overrides=overrides, name="two-nodes")
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    agents = []
    for node in (0, 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                "--rdzv_id", "samebox-two-nodes", "-m", "builder", "train", str(config_file), "--no-preflight"]
        agents.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "2 processes, 8 samples per step in all" in outs[0] + outs[1]

    rows = [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    reference = LoRAFinetuneRecipe(make_config(overrides=overrides, name="one-process"))
    reference.setup()
    reference.model.train()
    expected = [reference._train_one() for _ in range(3)]
    reference.cleanup()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=0)
