"""Build-time analysis from ninja's log, checked against the two measured sm_90 builds (slim and lean)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.wheels import schedule

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.mark.parametrize(("profile", "wall", "cpu"), [("slim", 518.8, 7307.2), ("lean", 383.3, 5589.9)])
def test_measured_builds(profile, wall, cpu):
    entries = schedule.read_ninja_log(RESULTS / f"flash_attn_{profile}_ninja_log.txt")
    report = schedule.summarise(entries)
    assert (report["objects"], report["wall_s"], report["cpu_s"], report["jobs"]) == (73, wall, cpu, 16)
    # ninja ran the objects in start order on 16 jobs, each taking the first free one: the model gives the
    # measured wall time back, so its longest-first figure is what that order would have taken.
    assert schedule.simulate([e.seconds for e in entries], 16) == pytest.approx(wall, abs=1.0)
    assert report["floor_s"] < report["longest_first_s"] < wall
    # setuptools sorts an extension's sources by name: the first 16 objects ninja started are the first 16 names.
    names = sorted(e.name for e in entries)
    assert {e.name for e in entries if e.start_ms < 100} == set(names[:16])


def test_lines_of_a_later_build_replace_the_earlier_one(tmp_path):
    log = tmp_path / ".ninja_log"
    log.write_text("# ninja log v7\n0\t50000\t1\ta.o\th\n0\t90000\t1\tb.o\th\n"  # killed build: a done, b done
                   "2\t30000\t1\tc.o\th\n")  # the resumed build compiled c
    assert [(e.name, e.seconds) for e in schedule.read_ninja_log(log)] == [("c", 29.998)]
    log.write_text("# ninja log v7\n0\t5000\t1\ta.o\th\n"  # killed early: a done
                   "0\t9000\t1\ta.o\th\n0\t12000\t1\tb.o\th\n")  # a full rebuild, ending later
    assert [e.name for e in schedule.read_ninja_log(log)] == ["a", "b"]
    log.write_text("# ninja log v7\n0\t0\t1\ta.o\th\n")  # restat-only entries take no time
    assert schedule.summarise(schedule.read_ninja_log(log))["floor_s"] == 0


def test_summary_and_cli(tmp_path, capsys):
    log = tmp_path / ".ninja_log"
    log.write_text("# ninja log v5\n0\t4000\t1\tx/b.o\th\n4000\t9000\t1\tx/c.o\th\n0\t10000\t1\tx/a.o\th\n")
    assert schedule.main([str(log)]) == 0
    out = capsys.readouterr().out
    assert "3 objects: 10.0 s wall, 19.0 CPU-s, 1.9 of 2 jobs on average; floor 9.5 s, longest first 10.0 s" in out
    assert out.index(" a") < out.index(" c") < out.index(" b")  # longest first
    assert schedule.main([str(log), "--jobs", "3", "--json"]) == 0
    assert '"floor_s": 6.3' in capsys.readouterr().out
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
