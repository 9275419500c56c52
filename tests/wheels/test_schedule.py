"""Build order: heaviest kernels first, checked against the measured slim sm_90 build's ninja log."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.wheels import schedule

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "tests" / "fixtures" / "flash_attn" / "setup_sources_2.8.3.py.txt"
NINJA_LOG = REPO / "bench" / "results" / "flash_attn_slim_ninja_log.txt"


def _kernels(text: str) -> list[str]:
    return [Path(line.strip().strip('",')).stem for line in text.splitlines() if schedule.kernel_cost(line)]


def test_reorder_lists_heaviest_first_and_keeps_every_line():
    text = SOURCES.read_text()
    ordered, moved = schedule.reorder_sources(text)
    assert sorted(ordered.splitlines()) == sorted(text.splitlines())
    kernels = _kernels(ordered)
    assert len(kernels) == 72 and moved > 60
    assert kernels[:4] == [f"flash_fwd_split_hdim256_{d}_sm80" for d in ("fp16", "bf16")] + [
        f"flash_fwd_split_hdim256_{d}_causal_sm80" for d in ("fp16", "bf16")]
    families = [k.split("_hdim")[0] for k in kernels]
    assert families == ["flash_fwd_split"] * 24 + ["flash_bwd"] * 24 + ["flash_fwd"] * 24
    assert ordered.index("flash_api.cpp") < ordered.index("flash_fwd_split_hdim256")  # non-kernel lines stay put
    assert schedule.reorder_sources(ordered) == (ordered, 0)  # idempotent: a resumed build keeps its order


def test_unknown_layout_is_left_alone():
    text = 'sources=["csrc/a.cu", "csrc/b.cu"]\n'
    assert schedule.reorder_sources(text) == (text, 0)


def test_simulation_reproduces_the_measured_build_and_the_new_order_is_shorter():
    entries = schedule.read_ninja_log(NINJA_LOG)
    seconds = {e.name: e.seconds for e in entries}
    report = schedule.summarise(entries)
    assert report["objects"] == 73
    # ninja ran the objects in setup.py's order on 16 jobs: the model gives the measured wall time back.
    as_built = schedule.simulate([e.seconds for e in entries], 16)
    assert as_built == pytest.approx(report["wall_s"], abs=1.0)
    ordered = _kernels(schedule.reorder_sources(SOURCES.read_text())[0])
    heaviest_first = schedule.simulate([seconds["flash_api"]] + [seconds[k] for k in ordered], 16)
    floor = report["cpu_s"] / 16
    assert floor < heaviest_first < as_built - 25  # measured durations: 519 s as built, 486 s heaviest first


def test_summary_and_cli(tmp_path, capsys):
    log = tmp_path / ".ninja_log"
    log.write_text("# ninja log v5\n0\t10000\t1\tx/a.o\th\n0\t4000\t1\tx/b.o\th\n4000\t9000\t1\tx/c.o\th\n")
    assert schedule.main([str(log)]) == 0
    out = capsys.readouterr().out
    assert "3 objects: 10.0 s wall, 19.0 CPU-s, 1.9 jobs on average" in out and out.index(" a") < out.index(" c")
    bad = tmp_path / "bad"
    bad.write_text("not a log\n")
    assert schedule.main([str(bad)]) == 2
    assert "not a ninja log" in capsys.readouterr().err


def test_nvcc_phase_seconds(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text(
        "source file name , phase name , phase input files , phase output file , arch , tool, metric , unit\n"
        "/s/a.cu , cicc , a.ii , a.ptx , compute_90 , cicc , 60000.5 , ms\n"
        "/s/b.cu , cicc , b.ii , b.ptx , compute_90 , cicc , 40000.0 , ms\n"
        "/s/a.cu , ptxas , a.ptx , a.cubin , sm_90 , ptxas , 5000 , ms\n"
    )
    assert schedule.nvcc_phase_seconds(table) == {"cicc": 100.0, "ptxas": 5.0}
