"""Prompt sets from files and other sources: JSONL, CSV (any separator), one prompt a line, Parquet (Webster's
ground truth), Hugging Face datasets (online only), Wen et al.'s random captions, and unions of these.

Every loader returns a :class:`PromptSet`; a malformed record raises an error naming the file and line, unless
``on_error: skip`` is set, in which case the number of skipped records is reported on the set.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Literal

from benchmark.core.config_types import Kind, Name, PositiveInt, Seed
from benchmark.data.prompts import Prompt, PromptSet
from benchmark.registry import PROMPT_SOURCES

csv.field_size_limit(10_000_000)
# Files as people save them: a leading byte-order mark (Excel, Notepad) is not part of the first field or prompt.
# Windows line endings need nothing more: splitlines() and the csv module (newline="") take \r\n as one break.
ENCODING = "utf-8-sig"


class PromptFileError(ValueError):
    """A prompt file that cannot be read as configured; the message names the file and line."""


def _kind(record: dict, memorized: bool, kind: str | None, kind_field: str | None, kind_map: dict | None,
          where: str) -> tuple[bool, str]:
    if kind_field:
        raw = record.get(kind_field)
        if raw in (None, ""):
            raise PromptFileError(f"{where}: empty '{kind_field}'")
        value = (kind_map or {}).get(str(raw), str(raw))
        return value != "none", value
    if kind:
        return kind != "none", kind
    return memorized, "memorized" if memorized else "none"


def read_records(path: Path, fmt: str, sep: str) -> list[tuple[int, dict | str]]:
    """(line number, record) pairs; a record is a dict for tables, a string for text files."""
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    if fmt == "txt":
        return [(i, line) for i, line in enumerate(path.read_text(encoding=ENCODING).splitlines(), 1)]
    if fmt == "jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding=ENCODING).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                out.append((i, PromptFileError(f"{path}:{i}: not JSON ({err.msg})")))
                continue
            out.append((i, record if isinstance(record, dict) else PromptFileError(f"{path}:{i}: not an object")))
        return out
    if fmt == "csv":
        with open(path, newline="", encoding=ENCODING) as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, None)
            if header is None:
                raise PromptFileError(f"{path}: empty file")
            out = []
            for row in reader:
                line = reader.line_num
                if len(row) != len(header):
                    out.append((line, PromptFileError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")))
                else:
                    out.append((line, dict(zip(header, row))))
            return out
    if fmt == "parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise PromptFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
        return [(i + 2, record) for i, record in enumerate(frame.to_dict(orient="records"))]
    raise PromptFileError(f"{path}: unknown format {fmt!r} (txt, jsonl, csv, parquet)")


@PROMPT_SOURCES.register("file", label="a prompt file (txt, jsonl, csv, parquet)")
def file_prompt_set(name: str, path: Name, memorized: bool = False,
                    format: Literal["txt", "jsonl", "csv", "parquet"] | None = None, sep: Name = ",",
                    text_field: Name = "caption", id_field: Name | None = None, kind: Kind | None = None,
                    kind_field: Name | None = None, kind_map: dict[str, Kind] | None = None,
                    on_error: Literal["raise", "skip"] = "raise", **_) -> PromptSet:
    """A labelled prompt set from one file. Ids come from ``id_field`` or else the record's position."""
    path_ = Path(path).expanduser()
    fmt = format or {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(path_.suffix)
    if fmt is None:
        raise PromptFileError(f"{path}: cannot tell the format from the name; set format")
    prompts, skipped = [], 0
    for position, (line, record) in enumerate(read_records(path_, fmt, sep)):
        try:
            if isinstance(record, Exception):
                raise record
            where = f"{path_}:{line}"
            if fmt == "txt":
                text, pid, fields = record, str(position), {}
            else:
                if text_field not in record:
                    raise PromptFileError(f"{where}: no column '{text_field}' (has {', '.join(map(str, record))})")
                text = record[text_field]
                pid = str(record[id_field]) if id_field else str(position)
                fields = record
            if not isinstance(text, str) or not text.strip():
                raise PromptFileError(f"{where}: empty prompt")
            is_memorized, value = _kind(fields, memorized, kind, kind_field, kind_map, where)
            prompts.append(Prompt(pid, text, is_memorized, value, name))
        except PromptFileError:
            if on_error != "skip":
                raise
            skipped += 1
    return PromptSet(name, prompts, skipped=skipped)


@PROMPT_SOURCES.register("random", label="Wen et al.'s random captions")
def random_prompt_set(name: str, n: PositiveInt, seed: Seed = 0, **_) -> PromptSet:
    """Wen et al.'s random captions: k = randrange(77) distinct random token ids of SD's tokenizer, decoded."""
    from benchmark.models.text_to_image import clip_tokenizer

    tokenizer = clip_tokenizer()
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    vocab = [i for i in range(tokenizer.vocab_size) if i not in specials]
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        ids = rng.sample(vocab, rng.randrange(77))
        prompts.append(Prompt(f"random-{i:04d}", tokenizer.decode(ids), False, "none", name))
    return PromptSet(name, prompts)


@PROMPT_SOURCES.register("hf", label="a Hugging Face dataset (online)")
def hf_prompt_set(name: str, dataset: Name, split: Name, field: Name, limit: PositiveInt = 500,
                  local_alternative: str = "", **_) -> PromptSet:
    """A set that only exists on the Hugging Face hub (Lexica, COCO 2017), for users who are online."""
    hint = f"; offline, use a local file instead: {local_alternative}" if local_alternative else ""
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(f"prompt set {name!r} loads {dataset} from the hub and needs `pip install datasets`"
                           f"{hint}") from err
    try:
        rows = datasets.load_dataset(dataset, split=split, streaming=True)
        texts = [row[field] for _, row in zip(range(limit), rows)]
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"cannot load {dataset} ({split}) for prompt set {name!r}: {first}{hint}") from err
    return PromptSet(name, [Prompt(f"{name}-{i:04d}", t, False, "none", name) for i, t in enumerate(texts)])
