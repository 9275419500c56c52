"""Every measured number README.md shows comes from a file under bench/results/, and its tables are up to date."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from bench import results
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
ENGLISH, _, CHINESE = README.partition("## 中文说明")

# A number with a unit, or a range of two ("1.08-1.18x"); the unit must not run on into a word.
NUMBER = r"\d[\d,]*(?:\.\d+)?"
UNITS = r"tok/s|tokens/s|TFLOP/s|GB/s|GiB|MiB|GB|MB|ms|s|x|×|%|秒|倍"
MEASURE = re.compile(rf"(?<![\w.])({NUMBER})(?:\s*[-–]\s*({NUMBER}))?\s?({UNITS})(?![A-Za-z/])")

# Numbers in README.md with a unit that are settings, not measurements: each with why.
NOT_MEASURED = {
    "30 s": "the default of serve's --queue-timeout and --read-timeout",
    "8 MiB": "serve's request body limit",
    "2x": "serve's --max-queue default, twice --max-concurrent",
}

# How a number may be written in a results file for each unit: a share as 0.38 for 38%, seconds as milliseconds.
SCALES = {"%": (1, 100), "s": (1, 1000, 0.001), "ms": (1, 1000, 0.001), "秒": (1, 0.001)}


def _numbers(value: object) -> Iterator[float]:
    """Every number in a results file: its numeric values and the numbers written inside its strings."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, str):
        for found in re.findall(NUMBER, value):
            yield float(found.replace(",", ""))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


RESULTS = sorted({number for path in (REPO / "bench" / "results").glob("*.json")
                  for number in _numbers(json.loads(path.read_text()))})


def measurements(text: str) -> list[tuple[str, str, str]]:
    """(the text as written, a number, its unit) for every number with a unit outside the exempt settings."""
    found = []
    for match in MEASURE.finditer(text):
        first, second, unit = match.groups()
        if f"{first} {unit}" in NOT_MEASURED or f"{first}{unit}" in NOT_MEASURED:
            continue
        found += [(match.group(0), number, unit) for number in (first, second) if number]
    return found


def in_results(number: str, unit: str) -> bool:
    """Whether a results file holds this number, to the decimals it is written with."""
    plain = number.replace(",", "")
    decimals = len(plain.partition(".")[2])
    wanted, tolerance = float(plain), 0.5 * 10 ** -decimals + 1e-9
    return any(abs(value * scale - wanted) <= tolerance
               for scale in SCALES.get(unit, (1,)) for value in RESULTS)


def test_the_checker_finds_numbers_and_misses_made_up_ones() -> None:
    found = measurements("1.08-1.18× unsloth at 9,286 tok/s, 87 s, 0.26 s, 38.1%; torch 2.3, 30 s timeout")
    assert [(number, unit) for _, number, unit in found] == [
        ("1.08", "×"), ("1.18", "×"), ("9,286", "tok/s"), ("87", "s"), ("0.26", "s"), ("38.1", "%")]
    assert all(in_results(number, unit) for _, number, unit in found)
    assert not in_results("123.456", "s")
    assert not in_results("9,287", "tok/s")


def test_every_number_in_the_english_readme_is_in_a_results_file() -> None:
    missing = [text for text, number, unit in measurements(ENGLISH) if not in_results(number, unit)]
    assert measurements(ENGLISH), "the checker found no number in README.md: its pattern is broken"
    assert not missing, f"README.md numbers found in no bench/results/*.json: {missing}"


def test_every_number_in_the_chinese_readme_is_in_a_results_file() -> None:
    missing = [text for text, number, unit in measurements(CHINESE) if not in_results(number, unit)]
    assert not missing, f"README.md (中文) numbers found in no bench/results/*.json: {missing}"


def test_readme_tables_are_what_make_results_writes() -> None:
    for path in results.DOCUMENTS:
        text = path.read_text()
        assert "<!-- results:" in text, f"{path.name} has no generated table"
        assert results.render(text) == text, f"{path.name}'s tables are out of date: run `make results`"
