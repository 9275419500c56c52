"""What a new user hit in the builder's commands, each kept fixed: `samebox wheel --dry-run` says why a GPU arch
gets another build and prints text or JSON (never Python reprs); `samebox diff` prints readable values; `samebox
check-gpu` recommends only images whose base a user can rent. (The trainer's: tests/trainer/test_first_run_defects.py)
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from builder.cli import main
from builder.core.catalog import Catalog, check_gpu
from builder.core.output import format_fields
from tests.fingerprint.test_drift import BASE

PYTHON_REPR = re.compile(r"\{'|\['|: (True|False|None)\b|'\]|'\}")


def test_wheel_dry_run_says_why_an_arch_gets_another_build_in_plain_text(tmp_path, capsys):
    argv = ["wheel", "flash-attn", "--image", "torch2.5-cu124-py312", "--dry-run", "--arch", "8.9",
            "--cache", str(tmp_path / "cache"), "--offline"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not PYTHON_REPR.search(out), out
    assert "key.archs: 8.0\n" in out and "key.cxx11abi: no\n" in out and "build.env.FLASH_ATTN_CUDA_ARCHS: 80\n" in out
    assert ("arch_notes: --arch 8.9 gets the sm_80 build: flash-attn compiles SASS for sm_80, sm_90, sm_100, sm_120 "
            "only, and code built for 8.0 runs on every 8.x GPU from 8.0 up (sm_89 included)") in out
    assert not (tmp_path / "cache").exists()

    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["key"]["archs"] == ["8.0"] and plan["arch_notes"][0].startswith("--arch 8.9 gets the sm_80 build")
    assert main([a if a != "8.9" else "9.0" for a in argv] + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch_notes"] == []  # 9.0 is its own build: nothing to explain


def test_format_fields_never_prints_a_python_repr():
    text = format_fields({"a": {"b": None, "c": [1, "x"], "d": False, "e": {}}, "f": [{"g": 1}],
                          "h": "one\ntwo"})
    assert text == 'a.b: -\na.c: 1, x\na.d: no\na.e: {}\nf: [{"g": 1}]\nh:\n  one\n  two'


def test_diff_prints_values_as_text(tmp_path, capsys):
    other = copy.deepcopy(BASE)
    other["machine"]["gpus"] = [{"compute_capability": "9.0", "memory_mib": 97871, "name": "NVIDIA H20"}]
    other["torch"]["cxx11abi"] = True
    other["torch"]["arch_list"] = ["sm_80", "sm_90"]
    del other["packages"]["peft"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(BASE))
    b.write_text(json.dumps(other))
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert not PYTHON_REPR.search(out), out
    assert "  torch.cxx11abi: no -> yes\n" in out and "  torch.arch_list: sm_80 -> sm_80, sm_90\n" in out
    assert "  peft: 0.11.1 -> (absent)\n" in out
    assert '  machine.gpus: [{"compute_capability": "8.9", "memory_mib": 24564, "name": "NVIDIA GeForce RTX 4090"}]' \
           ' -> [{"compute_capability": "9.0"' in out
    assert main(["diff", str(a), str(b), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["groups"]["torch/cuda"]


def _catalog_with_test_machine_only_for(tmp_path: Path, image: str) -> Path:
    """The shipped catalog, with ``image``'s platform turned into the GPU test machine's."""
    root = Path(__file__).resolve().parents[1]
    matrix = (root / "images" / "matrix.toml").read_text()
    block = matrix.index(f'id = "{image}"')
    start = matrix.index("platforms = [", block)
    end = matrix.index("\n", start)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "matrix.toml").write_text(
        matrix[:start] + 'platforms = ["GPU test machine: a box of ours"]' + matrix[end:])
    (tmp_path / "lockfiles").symlink_to(root / "lockfiles")
    return tmp_path


def test_check_gpu_recommends_only_images_a_user_can_rent(tmp_path, capsys):
    report = check_gpu("RTX 4090", Catalog.load())
    rentable = {v["image"]: bool(v["rent"]) for v in report["images"]}
    assert rentable["torch2.11-cu130-py312"] is False and rentable["torch2.8-cu128-py312"] is True
    assert report["best"] == "torch2.8-cu128-py312" and report["rent"].startswith("AutoDL: ")

    root = _catalog_with_test_machine_only_for(tmp_path, "torch2.8-cu128-py312")
    assert main(["check-gpu", "--gpu", "RTX 4090", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "best image: torch2.5-cu124-py312 (rent the base image: AutoDL: PyTorch 2.5.1" in out
    assert re.search(r"torch2\.8-cu128-py312 +2\.8\.0\+cu128 +runs +no ", out), out
