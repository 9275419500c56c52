"""Training data: JSONL rows (the formats of trainer/data/formats.py) -> token ids and next-token targets, cached.

A sample is ``(input_ids, targets)``: ``targets[i]`` is the token that position ``i`` must predict, or -100. Targets
are shifted here, per sample, so packing samples end to end never trains a sample's first token on the previous
sample's last one. The completion (and the EOS appended to it) is trained; the prompt only with train_on_prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.core import settings
from builder.core.errors import SameboxError
from builder.core.fsutil import atomic_path, ensure_writable_dir, sha256_file
from builder.core.progress import Progress
from trainer.config import DataConfig
from trainer.data.formats import FORMATS, DataFormat, detect_format

IGNORE = -100
# Bump when tokenization changes so old caches are not reused.
CACHE_VERSION = "1"
MAX_REPORTED = 20


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    targets: list[list[int]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def label_count(self, i: int) -> int:
        return sum(1 for t in self.targets[i] if t != IGNORE)

    @property
    def unlabeled(self) -> int:
        """Samples with no trained token (truncation cut them before their completion)."""
        return sum(1 for t in self.targets if all(x == IGNORE for x in t))


def _row_problem(row: Any, fmt: DataFormat) -> str | None:
    if not isinstance(row, dict):
        return "a JSON object"
    return None if fmt.valid(row) else fmt.expects


def missing_data(path: Path) -> SameboxError:
    """data.path names no file: say where it was looked for (a relative path is taken from the working directory)."""
    if path.is_absolute():
        return SameboxError(f"data file not found: {path}", hint="set data.path to a JSONL file")
    return SameboxError(f"data file not found: {path} (looked for {path.absolute()})",
                        hint=f"set data.path to a JSONL file; a relative path is taken from the directory samebox runs "
                             f"in ({Path.cwd()})")


def json_problem(text: str, e: json.JSONDecodeError) -> str:
    """What is wrong with one line of JSON, at the position it goes wrong: a line that ends before its object does
    (cut off mid-write, or a row split over lines) is said to be so."""
    cut = "cut short, or one row split over lines (JSONL takes one whole object per line)"
    if e.msg.startswith("Unterminated string"):
        return f"the line ends inside the string that starts at character {e.pos + 1} of {len(text)}: {cut}"
    if e.pos >= len(text.rstrip()):
        return f"the line ends after {len(text)} characters, before its JSON does ({e.msg}): {cut}"
    start = max(0, e.pos - 20)
    near = ("..." if start else "") + text[start: e.pos + 20]
    return f"{e.msg} at character {e.pos + 1} of {len(text)}, near {json.dumps(near, ensure_ascii=False)}"


def read_rows(path: Path, fmt: str) -> tuple[str, list[dict[str, Any]]]:
    """Parse and check every row; all malformed rows are reported together as file:line with what was expected."""
    if not path.is_file():
        raise missing_data(path)
    shape = None if fmt == "auto" else FORMATS[fmt]
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    with open(path, "rb") as fh, Progress(f"reading {path.name}", path.stat().st_size, "bytes") as progress:
        done = 0
        for lineno, raw in enumerate(fh, 1):
            done += len(raw)
            progress.update(done)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason}); "
                                "save the file as UTF-8 (iconv -f GBK -t UTF-8 converts GBK)")
                continue
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid JSON: {json_problem(text, e)}")
                continue
            if shape is None and isinstance(row, dict):
                shape = detect_format(row)
                if shape is None:
                    problems.append(f"{path}:{lineno}: unknown row shape with keys {sorted(row)}; expected "
                                    + "; or ".join(f"{f.name}: {f.expects}" for f in FORMATS.values()))
                    break
            expected = _row_problem(row, shape) if shape is not None else "a JSON object"
            if expected:
                problems.append(f"{path}:{lineno}: expected {expected}")
            else:
                rows.append(row)
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise SameboxError(f"malformed training data in {path}{more}", problems=shown,
                           hint="fix the rows above or set data.format to the format the file uses")
    if not rows or shape is None:
        raise SameboxError(f"{path} has no rows", hint="one JSON object per line")
    return shape.name, rows


def tokenize_row(tokenizer: Any, fmt: str, row: dict[str, Any], cfg: DataConfig, where: str) -> tuple[
        list[int], list[int], bool]:
    """One row -> (input_ids, shifted targets, truncated?). EOS closes every sample and is trained."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SameboxError("the tokenizer has no EOS token", hint="set tokenizer.eos_token in the model directory")
    ids, trained = FORMATS[fmt].tokens(tokenizer, row, where)
    if not ids or ids[-1] != eos:
        ids, trained = ids + [eos], trained + [True]
    if cfg.train_on_prompt:
        trained = [True] * len(ids)
    truncated = len(ids) > cfg.max_length
    ids, trained = ids[: cfg.max_length], trained[: cfg.max_length]
    targets = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return ids, targets, truncated


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text += repr((tokenizer.chat_template, tokenizer.eos_token_id, type(tokenizer).__name__))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(path: Path, tokenizer: Any, cfg: DataConfig) -> str:
    parts = [CACHE_VERSION, sha256_file(path), tokenizer_fingerprint(tokenizer), cfg.format,
             str(cfg.max_length), str(cfg.train_on_prompt)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return settings.tokenized_cache()


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def check_labels(data: TokenizedData, cfg: DataConfig, path: Path) -> None:
    """A run whose samples have no token left to train (prompts longer than data.max_length) would train on a
    loss of 0.0: stop and say what would work."""
    if data.unlabeled < len(data):
        return
    raise SameboxError(
        f"data.max_length={cfg.max_length} leaves no token to train in any of the {len(data)} samples of {path}: "
        "every sample is cut before its completion starts",
        hint="raise data.max_length (longer than the prompts), shorten the prompts, or set data.train_on_prompt=true")


def load_dataset(cfg: DataConfig, tokenizer: Any) -> tuple[TokenizedData, bool]:
    """Tokenized samples, from the cache when the file, tokenizer and data settings are unchanged."""
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise missing_data(path)
    cache = cache_dir(cfg)
    cache_file = cache / f"{cache_key(path, tokenizer, cfg)}.pt"
    if cache_file.is_file():
        blob = torch.load(cache_file, weights_only=True)
        lengths = blob["lengths"].tolist()
        ids, targets = blob["input_ids"].split(lengths), blob["targets"].split(lengths)
        data = TokenizedData([t.tolist() for t in ids], [t.tolist() for t in targets], blob["truncated"])
        check_labels(data, cfg, path)
        return data, True
    ensure_writable_dir(cache, "data.cache_dir")  # before the tokenizing, not after it
    fmt, rows = read_rows(path, cfg.format)
    data = TokenizedData([], [])
    with Progress(f"tokenizing {path.name}", len(rows), "rows") as progress:
        for i, row in enumerate(rows):
            ids, targets, truncated = tokenize_row(tokenizer, fmt, row, cfg, f"{path} row {i + 1}")
            data.input_ids.append(ids)
            data.targets.append(targets)
            data.truncated += truncated
            progress.update(i + 1)
    check_labels(data, cfg, path)
    with atomic_path(cache_file) as tmp:
        torch.save({"input_ids": torch.tensor([t for s in data.input_ids for t in s], dtype=torch.int32),
                    "targets": torch.tensor([t for s in data.targets for t in s], dtype=torch.int32),
                    "lengths": torch.tensor([len(s) for s in data.input_ids]), "truncated": data.truncated}, tmp)
    return data, False
