"""Catalog parsing, validation (every problem, naming entry and field) and the resolver's answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.cli import main
from builder.core.errors import SameboxError
from builder.core.spec import load_catalog, resolve_spec

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(REPO)


def test_catalog_has_required_images(catalog) -> None:
    ids = {s.id for s in catalog}
    assert {"torch2.1-cu121-py310", "torch2.3-cu121-py312", "torch2.5-cu124-py312", "torch2.8-cu128-py312",
            "torch2.11-cu130-py312"} <= ids


def test_resolve_torch_only(catalog) -> None:
    spec = resolve_spec("2.3", catalog=catalog)
    assert spec.id == "torch2.3-cu121-py312"
    assert spec.torch_full.endswith("+cu121")
    assert spec.python == "3.12" and spec.cuda == "12.1"
    assert spec.conda_installer.startswith("Miniconda3-py312")


@pytest.mark.parametrize("cuda", ["12.1", "cu121", "121"])
def test_resolve_cuda_spellings(catalog, cuda: str) -> None:
    assert resolve_spec("2.3", cuda, catalog=catalog).id == "torch2.3-cu121-py312"


def test_unknown_torch_lists_choices(catalog) -> None:
    with pytest.raises(SameboxError) as e:
        resolve_spec("2.4", catalog=catalog)
    assert "2.3" in e.value.hint and "2.11" in e.value.hint


def test_incompatible_cuda_names_what_works(catalog) -> None:
    with pytest.raises(SameboxError) as e:
        resolve_spec("2.3", "11.3", catalog=catalog)
    assert "torch 2.3 has no CUDA 11.3 build; choose 11.8 or 12.1" in str(e.value)


def test_incompatible_python(catalog) -> None:
    with pytest.raises(SameboxError) as e:
        resolve_spec("2.1", python="3.12", catalog=catalog)
    assert "no Python 3.12" in str(e.value)


def test_valid_but_uncatalogued_combination(catalog) -> None:
    with pytest.raises(SameboxError) as e:
        resolve_spec("2.3", "11.8", catalog=catalog)
    assert "torch2.3-cu121-py312" in e.value.hint


def test_ambiguous_request_lists_candidates(catalog) -> None:
    import dataclasses

    twin = dataclasses.replace(catalog[1], id="torch2.3-cu121-py312-twin")
    with pytest.raises(SameboxError) as e:
        resolve_spec("2.3", catalog=[*catalog, twin])
    assert "ambiguous" in str(e.value) and "twin" in e.value.hint


def _write_catalog(tmp_path: Path, text: str) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "matrix.toml").write_text(text)
    return tmp_path


def test_malformed_matrix_names_entry_and_field(tmp_path: Path) -> None:
    good = (REPO / "images" / "matrix.toml").read_text()
    broken = good.replace('python_provider = "conda"', 'python_provider = "brew"', 1)
    broken = broken.replace('cuda = "12.4"', 'cuda = "11.3"', 1)
    root = _write_catalog(tmp_path, broken)
    with pytest.raises(SameboxError) as e:
        load_catalog(root)
    problems = "\n".join(e.value.problems)
    assert "image 'torch2.1-cu121-py310': field 'python_provider' is 'brew'" in problems
    assert "image 'torch2.5-cu124-py312': torch 2.5 has no CUDA 11.3 build" in problems


def test_missing_field_and_bad_toml(tmp_path: Path) -> None:
    root = _write_catalog(tmp_path, '[[image]]\nid = "x"\n')
    with pytest.raises(SameboxError) as e:
        load_catalog(root)
    assert any("field 'torch' is missing" in p for p in e.value.problems)
    (root / "images" / "matrix.toml").write_text("[[image]\n")
    with pytest.raises(SameboxError, match="not valid TOML"):
        load_catalog(root)


def test_cli_user_error_exits_2(capsys) -> None:
    assert main(["render", "--torch", "9.9", "--print"]) == 2
    err = capsys.readouterr().err
    assert "no catalog image has torch 9.9" in err and "choose one of" in err


def test_images_json(capsys) -> None:
    import json

    assert main(["images", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in rows} >= {"torch2.3-cu121-py312"}
