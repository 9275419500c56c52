"""The peer benchmark (bench/trainer_peers.py): the label conversion, the data mixes, the comparisons, and a CPU
smoke run of the recipe, HF padding-free and samebox arms on a tiny model, both mixes."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

IGNORE = -100


def test_hf_labels_pair_the_same_positions_and_tokens_as_samebox_targets():
    from peer_data import hf_labels

    ids = [5, 6, 7, 8, 9, 4]
    targets = [IGNORE, 7, 8, IGNORE, 4, IGNORE]  # position i predicts targets[i]
    labels = hf_labels(ids, targets)
    # HF shifts inside the loss: position j - 1 predicts labels[j].
    pairs_hf = [(j - 1, labels[j]) for j in range(1, len(ids)) if labels[j] != IGNORE]
    pairs_samebox = [(i, t) for i, t in enumerate(targets) if t != IGNORE]
    assert pairs_hf == pairs_samebox and labels[0] == IGNORE
    with pytest.raises(SystemExit):
        hf_labels(ids, [IGNORE, 9, IGNORE, IGNORE, IGNORE, IGNORE])  # 9 is not the next token


def test_chat_rows_are_multi_turn_within_the_cap_and_around_the_median():
    from peer_data import chat_rows

    rows = chat_rows(300, seed=3)
    rendered = []
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        core = roles[1:] if roles[0] == "system" else roles
        assert core == ["user", "assistant"] * (len(core) // 2) and 2 <= len(core) <= 6
        assert all(m["content"] for m in row["messages"])
        # ChatML: <|im_start|> role \n content <|im_end|> \n per turn, one token per letter, then EOS.
        rendered.append(sum(len(m["role"]) + len(m["content"]) + 4 for m in row["messages"]) + 1)
    assert max(rendered) <= 2048 and min(rendered) >= 100
    assert 1000 <= statistics.median(rendered) <= 1400


def test_curve_check_smooths_before_comparing_and_merge_keeps_other_arms():
    from peer_report import curve_check, merge_results

    a = [10.0 + (0.05 if i % 2 else -0.05) for i in range(50)]  # noisy, same trend
    assert curve_check(a, [10.0] * 50)["ok"] and curve_check(a, [10.0] * 50)["raw_max_abs_diff"] > 0.02
    assert not curve_check(a, [10.1] * 50)["ok"]
    arm = {"label_tokens_per_s": 100.0, "peak_allocated_gib": 2.0, "losses": [1.0], "label_tokens": [5]}
    base = {"rows": [{"model": "7b", "mix": "chat", "label_tokens_expected": [5], "errors": [],
                      "arms": {"unsloth": dict(arm, label_tokens_per_s=50.0, peak_allocated_gib=4.0)}}]}
    newer = {"rows": [{"model": "7b", "mix": "chat", "label_tokens_expected": [5], "errors": [],
                       "arms": {"samebox": arm}}]}
    row = merge_results(base, newer)["rows"][0]
    assert set(row["arms"]) == {"unsloth", "samebox"}
    assert row["ratio_vs_unsloth"] == 2.0 and row["memory_vs_unsloth"] == 0.5 and row["label_tokens_agree"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("peers")
    out = tmp / "peers.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "trainer_peers.py"), "--smoke",
                           "--workdir", str(tmp / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_smoke_run_writes_the_result_shape(smoke):
    result, stdout = smoke
    assert {"command", "machine", "versions", "rows"} <= set(result)
    assert {"torch", "transformers", "peft", "unsloth", "unsloth_zoo", "trl", "samebox_commit"} <= set(
        result["versions"])
    assert sorted((r["model"], r["mix"]) for r in result["rows"]) == [("smoke", "chat"), ("smoke", "short")]
    for row in result["rows"]:
        assert not row["errors"], row["errors"]
        for name in ("recipe", "hf_padding_free", "samebox"):
            arm = row["arms"][name]
            assert arm["label_tokens_per_s"] > 0 and arm["tokens_per_s"] > arm["label_tokens_per_s"]
            assert arm["steps"] == 3 and arm["end_to_end_s"] > 0 and len(arm["losses"]) == 3
        if importlib.util.find_spec("unsloth") is None:
            assert row["arms"]["unsloth"] == {"skipped": "needs a CUDA GPU"}
        assert {"ratio_vs_unsloth", "memory_vs_unsloth", "ratio_vs_hf_padding_free"} <= set(row)
        assert row["ratio_vs_hf_padding_free"] > 0
        assert f"| smoke | {row['mix']} | samebox |" in stdout


@pytest.mark.slow
def test_smoke_arms_see_the_same_label_tokens_and_agree_at_step_one(smoke):
    result, _ = smoke
    for row in result["rows"]:
        arms = {n: a for n, a in row["arms"].items() if "losses" in a}
        expected = row["label_tokens_expected"]
        assert len(expected) == 3 and all(n > 0 for n in expected)
        for name, arm in arms.items():
            assert arm["label_tokens"] == expected, name
        firsts = [a["losses"][0] for a in arms.values()]
        assert all(math.isfinite(x) for x in firsts)
        assert max(firsts) - min(firsts) <= 1e-3, firsts
        assert row["step1_loss"]["agree"] and row["label_tokens_agree"]
        # Seeded like samebox (same LoRA init), in fp32 on CPU: the same training, step after step.
        for name in ("hf_padding_free", "recipe"):
            assert all(abs(x - y) < 1e-4 for x, y in zip(arms[name]["losses"], arms["samebox"]["losses"],
                                                         strict=True)), (name, arms[name]["losses"])
        # Random weights: about ln(vocabulary), so the arms really ran the model.
        assert abs(firsts[0] - math.log(1024)) < 0.5
        # Chat rows train on assistant turns only, short rows on completions only: fewer labels than tokens.
        assert all(a["label_tokens"][0] < a["tokens"][0] for a in arms.values())


def test_only_picks_within_each_kind_and_rejects_unknown_names():
    import trainer_peers

    opts = trainer_peers.parse_args(["--only", "7b,chat,unsloth,samebox"])
    assert trainer_peers.selection(opts) == (["7b"], ["chat"], ["samebox", "unsloth"])
    assert trainer_peers.selection(trainer_peers.parse_args(["--only", "1.5b"]))[1:] == (
        ["short", "chat"], ["samebox", "unsloth", "hf_padding_free", "recipe"])
    assert trainer_peers.selection(trainer_peers.parse_args(["--curve"])) == (["7b"], ["chat"],
                                                                              ["samebox", "hf_padding_free"])
    with pytest.raises(SystemExit):
        trainer_peers.selection(trainer_peers.parse_args(["--only", "13b"]))
    assert Path(trainer_peers.CONFIGS["7b"]).suffix == ".yaml"
