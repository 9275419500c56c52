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


STARTUP_ORDER = ("command", "data", "imports", "preflight", "weights", "ready", "step_1", "checkpoint")


@pytest.mark.slow
def test_smoke_start_up_is_measured_from_each_arm_process_start(smoke):
    from peer_report import startup_columns

    result, stdout = smoke
    rows = {r["mix"]: r for r in result["rows"]}
    first, second = rows["short"], rows["chat"]  # the peers' process trains short first: its step 1 is short's
    for name in ("samebox", "hf_padding_free", "recipe"):
        arm = first["arms"][name]
        startup = arm["startup"]
        marks, stages = startup["seconds_to"], startup["stage_seconds"]
        reached = [m for m in STARTUP_ORDER if m in marks]
        assert {"imports", "weights", "step_1", "checkpoint"} <= set(reached), (name, marks)
        assert [marks[m] for m in reached] == sorted(marks[m] for m in reached), (name, marks)
        assert 0 < marks["imports"] < marks["weights"] < marks["step_1"] <= marks["checkpoint"], (name, marks)
        assert set(stages) == set(marks)
        assert sum(v for k, v in stages.items() if k != "checkpoint") == pytest.approx(marks["step_1"], abs=0.05)
        assert marks["checkpoint"] == pytest.approx(marks["step_1"] + stages["checkpoint"], abs=0.011)
        assert startup["checkpoint_holds"]
        # From the process's start, not from some later point: within the process's wall time as the parent saw it
        # (samebox's end_to_end_s, the peers' process_s), and torch plus transformers take a while to import.
        assert marks["checkpoint"] <= arm.get("process_s", arm["end_to_end_s"]), (name, marks)
        assert marks["imports"] > 0.3
        c = startup_columns(startup)
        assert c["imports"] + (c["preflight"] or 0) + c["load"] + c["first_step"] == pytest.approx(c["step_1"],
                                                                                                   abs=0.05)
        line = f"| smoke | short | {name} | {c['step_1']:.2f} | {c['imports']:.2f} | - | {c['load']:.2f} |"
        assert line in stdout, (line, stdout[-2000:])
    to_step_1 = {n: a["startup"]["seconds_to"]["step_1"] for n, a in first["arms"].items() if a.get("startup")}
    assert first["startup_vs_hf_padding_free"]["step_1"] == pytest.approx(to_step_1["samebox"]
                                                                          / to_step_1["hf_padding_free"])
    assert first["startup_vs_unsloth"] == {"step_1": None, "checkpoint": None}  # no unsloth on CPU
    assert "start-up smoke/short: samebox's seconds to step 1" in stdout
    # samebox starts a process per mix; a peer's second mix has no start of its own.
    assert "step_1" in second["arms"]["samebox"]["startup"]["seconds_to"]
    assert "startup" not in second["arms"]["hf_padding_free"]
    assert result["settings"]["startup_preflight"] is False


def test_startup_table_columns_and_ratios_against_the_peers():
    from peer_report import compare_row, markdown_table, startup_columns

    samebox = {"seconds_to": {"command": 0.5, "data": 1.0, "imports": 6.0, "preflight": 9.0, "weights": 14.0,
                              "ready": 14.5, "step_1": 16.0, "checkpoint": 17.0}}
    unsloth = {"seconds_to": {"imports": 12.0, "weights": 30.0, "step_1": 32.0, "checkpoint": 34.0}}
    hf = {"seconds_to": {"imports": 8.0, "weights": 20.0, "step_1": 20.0, "checkpoint": 20.5}}
    assert startup_columns(samebox) == {"step_1": 16.0, "imports": 6.0, "preflight": 3.0, "load": 5.5,
                                        "first_step": 1.5, "save": 1.0, "checkpoint": 17.0}
    assert startup_columns(unsloth)["preflight"] is None and startup_columns(unsloth)["load"] == 18.0
    assert startup_columns(None)["step_1"] is None
    row = {"model": "7b", "mix": "chat", "errors": [], "label_tokens_expected": [],
           "arms": {"samebox": {"startup": samebox}, "unsloth": {"startup": unsloth},
                    "hf_padding_free": {"startup": hf}}}
    compare_row(row)
    assert row["startup_vs_unsloth"] == {"step_1": 0.5, "checkpoint": 0.5}
    assert row["startup_vs_hf_padding_free"] == {"step_1": 0.8, "checkpoint": pytest.approx(17.0 / 20.5)}
    table = markdown_table({"rows": [row]})
    assert "| 7b | chat | samebox | 16.00 | 6.00 | 3.00 | 5.50 | 1.50 | 1.00 | 17.00 |" in table
    assert "| 7b | chat | unsloth | 32.00 | 12.00 | - | 18.00 | 2.00 | 2.00 | 34.00 |" in table
    assert ("samebox's seconds to step 1 0.50x unsloth's, 0.80x HF padding-free's; to the first checkpoint 0.50x, "
            "0.83x") in table
    row["arms"] = {name: {} for name in row["arms"]}
    assert "to step 1 s" not in markdown_table({"rows": [row]})  # no start-up measured: no start-up table


def test_samebox_checkpoint_seconds_are_the_ones_its_trainer_timed():
    from trainer_peers import samebox_startup

    summary = {"startup": {"seconds_to": {"imports": 5.0, "step_1": 9.0}, "first_save_s": 2.5,
                           "stage_seconds": {"imports": 5.0, "step_1": 4.0}}}
    startup = samebox_startup(summary)
    assert startup["seconds_to"] == {"imports": 5.0, "step_1": 9.0, "checkpoint": 11.5}
    assert startup["stage_seconds"]["checkpoint"] == 2.5 and "optimizer" in startup["checkpoint_holds"]
    assert "checkpoint" not in summary["startup"]["seconds_to"]  # the summary read is left as it was
    del summary["startup"]["first_save_s"]
    startup = samebox_startup(summary)
    assert "checkpoint" not in startup["seconds_to"] and startup["checkpoint_note"]
    assert samebox_startup({}) is None


def test_startup_preflight_runs_samebox_as_a_user_does(tmp_path):
    import trainer_peers

    def argv(*extra: str) -> tuple[list[str], dict]:
        opts = trainer_peers.parse_args(["--smoke", "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json"),
                                         *extra])
        bench = trainer_peers.Bench(opts, ["smoke"], ["short"], ["samebox"])
        return bench.samebox_argv("smoke", "short", tmp_path / "run"), bench.result["settings"]

    plain, settings = argv()
    assert plain[-1] == "--no-preflight" and settings["startup_preflight"] is False
    with_preflight, settings = argv("--startup-preflight")
    assert "--no-preflight" not in with_preflight and settings["startup_preflight"] is True
    assert with_preflight == plain[:-1]


def test_startup_stages_follow_the_order_given():
    from peer_arms import PEER_STAGES

    from trainer.loop.startup import Startup

    startup = Startup(PEER_STAGES)
    startup.marks.update({"step_1": 9.0, "imports": 4.0, "checkpoint": 9.5, "weights": 7.0})
    assert list(startup.stages().items()) == [("imports", 4.0), ("weights", 3.0), ("step_1", 2.0),
                                              ("checkpoint", 0.5)]
    assert "LoRA adapter saved 0.5 s" in startup.line()
    assert list(Startup().stages()) == []  # samebox train's own stages, none reached yet
