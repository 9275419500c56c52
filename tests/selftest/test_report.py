"""The report: JSON schema (documented in docs/selftest.md), table and summary, and the command's exit codes."""

from __future__ import annotations

import json
import re

from builder.cli import main
from builder.selftest import JSON_SCHEMA, report_from_readings
from builder.selftest.report import schema_problems
from tests.conftest import REPO
from tests.selftest.conftest import load_readings


def test_reports_match_the_schema() -> None:
    for name in ("healthy_quick", "healthy_full", "cpu_only"):
        d = report_from_readings(load_readings(name)).to_dict()
        assert schema_problems(d) == [], name
        assert json.loads(json.dumps(d)) == d


def test_schema_catches_broken_reports() -> None:
    d = report_from_readings(load_readings("healthy_quick")).to_dict()
    d["findings"][0]["severity"] = "great"
    del d["summary"]
    d["failed"] = "no"
    problems = schema_problems(d)
    assert "$: missing 'summary'" in problems
    assert "$.failed: expected boolean, got str" in problems
    assert any(p.startswith("$.findings[0].severity: 'great'") for p in problems)


def test_docs_carry_the_schema() -> None:
    doc = (REPO / "docs" / "selftest.md").read_text()
    block = re.search(r"<!-- schema -->\n```json\n(.*?)```", doc, re.S)
    assert block, "docs/selftest.md must hold the JSON schema between <!-- schema --> and a ```json block"
    assert json.loads(block.group(1)) == JSON_SCHEMA


def test_table_and_summary() -> None:
    report = report_from_readings(load_readings("cpu_only"))
    text = report.format()
    assert text.splitlines()[0].split() == ["result", "check", "finding"]
    assert "what to do:" in text and "[fail] nvidia_driver:" in text
    assert text.splitlines()[-1].startswith("selftest quick FAILED")
    assert report.counts()["fail"] == 1 and report.failed


def test_the_report_says_where_the_time_went() -> None:
    text = report_from_readings(load_readings("healthy_quick")).format()
    assert text.splitlines()[-2] == "slowest probes: lora_smoke 17.3 s, bitsandbytes 16.7 s, torch 4.0 s, load 3.0 s"


def test_command_on_this_machine_without_gpu(capsys, tmp_path) -> None:
    """The real command on CI (no GPU): exit 1, a JSON report that names the missing driver."""
    rc = main(["selftest", "--quick", "--json", "--data-dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert schema_problems(out) == []
    fails = [f for f in out["findings"] if f["severity"] == "fail"]
    if out["machine"]["gpus"]:  # on the GPU machine the same test passes through the healthy path
        assert rc == (1 if fails else 0)
        return
    assert rc == 1 and out["failed"] is True
    assert [f["check"] for f in fails] == ["nvidia_driver"]
    data = next(f for f in out["findings"] if f["check"] == "data_dir")
    assert data["severity"] == "ok" and str(tmp_path) in data["message"]


def test_command_rejects_a_bad_model_path(capsys, tmp_path) -> None:
    assert main(["selftest", "--model", str(tmp_path / "missing")]) == 2
    assert "no config.json there" in capsys.readouterr().err
