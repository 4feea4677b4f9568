"""Prompt sets: prompts with labels (memorized or not, and the kind of memorization where known) and, where a source
knows it, ground truth (:class:`Truth`: the training image each prompt copies and the copied region).

Prompt sources (``loader`` in a prompt config) are registered in :data:`benchmark.registry.PROMPT_SOURCES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from benchmark.registry import PROMPT_SOURCES


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    memorized: bool
    kind: str = "none"  # global / local for memorized prompts where known, "memorized" where not, else none
    source: str = ""
    # 0-based position in the whole set its source loaded (a union: in the union), kept when select_ids, limit or
    # shard narrow the set: official seeding's prompt index. None until a PromptSet numbers it.
    position: int | None = None


@dataclass
class Truth:
    """What a prompt copies: its training image (3, H, W) in [0, 1], and the copied region for local copies."""

    image: np.ndarray
    mask: np.ndarray | None = None  # (H, W) bool; None = the whole image (global memorization)


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt] = field(default_factory=list)
    truth: dict[str, Truth] = field(default_factory=dict)  # prompt id -> ground truth, where known
    skipped: int = 0  # malformed records left out (only when a loader is told to skip them)

    def __post_init__(self):
        """Numbers a source's prompts by their order (``Prompt.position``); a subset's keep theirs. Raises
        ValueError for an empty set, a duplicate id, or prompts of which only some have a position."""
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} is empty")
        seen = set()
        for p in self.prompts:
            if p.id in seen:
                raise ValueError(f"prompt set {self.name!r}: duplicate prompt id {p.id!r}")
            seen.add(p.id)
        numbered = [p.position is not None for p in self.prompts]
        if not any(numbered):
            self.prompts = [replace(p, position=i) for i, p in enumerate(self.prompts)]
        elif not all(numbered):
            raise ValueError(f"prompt set {self.name!r}: {numbered.count(False)} prompts without a position among "
                             "numbered ones (a subset keeps its prompts' positions; a new set numbers them all)")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)


@PROMPT_SOURCES.register("inline", label="written out in the config")
def inline_prompt_set(name: str, entries: list[dict], **_) -> PromptSet:
    """A set written out in a config: entries with ``text`` and optional ``id``, ``memorized``, ``kind``. Raises
    ValueError for an entry without text, or with an empty or blank one (it would be sampled as the unconditional
    prompt), as the file loader does for a blank line. (Wen's random captions may be empty: k = randrange(77)
    tokens can be 0, so only the sets a user writes refuse it.)"""
    prompts = []
    for i, entry in enumerate(entries):
        if "text" not in entry:
            raise ValueError(f"prompt set {name!r}: entry {i} has no 'text'")
        if not isinstance(entry["text"], str) or not entry["text"].strip():
            raise ValueError(f"prompt set {name!r}: entry {i} has no text ({entry['text']!r})")
        kind = entry.get("kind", "memorized" if entry.get("memorized") else "none")
        memorized = bool(entry.get("memorized", kind != "none"))
        prompts.append(Prompt(str(entry.get("id", i)), entry["text"], memorized, kind, name))
    return PromptSet(name, prompts)


def shard(prompt_set: PromptSet, spec: str) -> PromptSet:
    """Shard ``i/n``: every n-th prompt from position i. Shards are disjoint, cover the set, and depend only on
    the set's order, so they are the same in every run."""
    try:
        i, n = (int(x) for x in str(spec).split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise ValueError(f"prompt shard {spec!r} is not i/n with 0 <= i < n") from None
    return subset(prompt_set, prompt_set.prompts[i::n])


def subset(prompt_set: PromptSet, kept: list[Prompt], name: str | None = None) -> PromptSet:
    """The prompts ``kept`` of ``prompt_set`` (with their truth), each keeping its position in the whole set."""
    return PromptSet(name or prompt_set.name, kept, {p.id: prompt_set.truth[p.id] for p in kept
                                                     if p.id in prompt_set.truth})


def select_ids(prompt_set: PromptSet, path: str | Path) -> PromptSet:
    """Keep the prompts whose ids a file lists (one a line): e.g. the memorization-prone subset."""
    # utf-8-sig: a byte-order mark is not part of the first id
    wanted = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    known = {p.id for p in prompt_set}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} ids not in prompt set {prompt_set.name!r}, first {unknown[0]!r}")
    keep = set(wanted)
    return subset(prompt_set, [p for p in prompt_set if p.id in keep])


def load_truth(path: str | Path, prompt_set: PromptSet) -> dict[str, Truth]:
    """Ground truth from a data file, for any prompt source: a CSV or JSONL with ``id`` (a prompt id of the set),
    ``image`` (the training image it copies) and optionally ``mask`` (white = the copied region; none or empty =
    the whole image), image paths relative to the file. Images are read as RGB in [0, 1], (3, H, W)."""
    import pandas as pd
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    table = (pd.read_json(path, lines=True, dtype=False) if path.suffix == ".jsonl"
             else pd.read_csv(path, dtype=str, keep_default_na=False))
    missing = {"id", "image"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: no column {', '.join(sorted(missing))} (has {', '.join(table.columns)})")
    known = {p.id for p in prompt_set}
    truth = {}
    for line, row in enumerate(table.to_dict(orient="records"), 2 if path.suffix != ".jsonl" else 1):
        pid = str(row["id"])
        if pid not in known:
            raise ValueError(f"{path}:{line}: prompt id {pid!r} is not in prompt set {prompt_set.name!r}")
        image = np.asarray(Image.open(path.parent / row["image"]).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
        mask = None
        if row.get("mask"):
            mask = np.asarray(Image.open(path.parent / row["mask"]).convert("L")) > 127
            if mask.shape != image.shape[1:]:
                raise ValueError(f"{path}:{line}: mask {mask.shape} and image {image.shape[1:]} differ in size")
        truth[pid] = Truth(image, mask)
    return truth


def load_prompt_set(spec: dict) -> PromptSet:
    """A prompt set from its config: ``loader`` names the source, the other keys are its arguments; ``truth_file``
    adds ground truth (:func:`load_truth`); then ``select_ids``, ``limit`` and ``shard`` narrow it, in that order."""
    spec = dict(spec)
    loader = spec.pop("loader")
    source = PROMPT_SOURCES.get(loader)
    if source is None:
        raise ValueError(f"unknown prompt loader {loader!r} (one of {', '.join(PROMPT_SOURCES)})")
    prompt_set = source(**spec)
    if spec.get("truth_file"):
        prompt_set.truth |= load_truth(spec["truth_file"], prompt_set)
    if spec.get("select_ids"):
        prompt_set = select_ids(prompt_set, spec["select_ids"])
    if spec.get("limit"):
        prompt_set = subset(prompt_set, prompt_set.prompts[:spec["limit"]])
    if spec.get("shard"):
        prompt_set = shard(prompt_set, spec["shard"])
    return prompt_set


@PROMPT_SOURCES.register("union", label="several prompt sets as one")
def union_prompt_set(name: str, parts: dict | list, **_) -> PromptSet:
    """The ``union`` loader: ``parts`` are prompt-set configs (a list, or a dict whose values are used)."""
    return union(name, [load_prompt_set(part) for part in (parts.values() if isinstance(parts, dict) else parts)])


def union(name: str, parts: list[PromptSet]) -> PromptSet:
    """Several sets as one; ids are prefixed with their part's name so they stay unique. The union is a new whole
    set: its prompts are numbered in its order (``Prompt.position``), not by their parts."""
    prompts, truth = [], {}
    for part in parts:
        for p in part:
            prompts.append(Prompt(f"{part.name}/{p.id}", p.text, p.memorized, p.kind, p.source or part.name))
        truth |= {f"{part.name}/{k}": v for k, v in part.truth.items()}
    return PromptSet(name, prompts, truth)

