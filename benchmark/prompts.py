"""Prompt sets: prompts with labels (memorized or not, and the kind of memorization where known)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("global", "local", "none")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    memorized: bool
    kind: str = "none"  # global / local for memorized prompts where known, "memorized" where not, else none
    source: str = ""


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt] = field(default_factory=list)
    truth: dict = field(default_factory=dict)  # prompt id -> localization.Truth, where known
    skipped: int = 0  # malformed records left out (only when a loader is told to skip them)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} is empty")
        seen = set()
        for p in self.prompts:
            if p.id in seen:
                raise ValueError(f"prompt set {self.name!r}: duplicate prompt id {p.id!r}")
            seen.add(p.id)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)


def inline_prompt_set(name: str, entries: list[dict]) -> PromptSet:
    """A set written out in a config: entries with ``text`` and optional ``id``, ``memorized``, ``kind``."""
    prompts = []
    for i, entry in enumerate(entries):
        if "text" not in entry:
            raise ValueError(f"prompt set {name!r}: entry {i} has no 'text'")
        kind = entry.get("kind", "memorized" if entry.get("memorized") else "none")
        memorized = bool(entry.get("memorized", kind != "none"))
        prompts.append(Prompt(str(entry.get("id", i)), entry["text"], memorized, kind, name))
    return PromptSet(name, prompts)


def testbed_prompt_set(model_folder: str | Path, name: str = "testbed") -> PromptSet:
    """The testbed's memorized (global / local) and held-out captions, from the model folder's testbed.json."""
    path = Path(model_folder) / "testbed.json"
    if not path.exists():
        raise FileNotFoundError(f"not a testbed model folder (no testbed.json): {model_folder}")
    from .localization import Truth
    from .testbed.data import Recipe, ground_truth, make_dataset

    meta = json.loads(path.read_text())
    truth_by_caption = ground_truth(make_dataset(Recipe(**meta["recipe"])))
    counts: dict[str, int] = {}
    prompts, truth = [], {}
    for entry in meta["prompts"]:
        category = entry["category"]
        counts[category] = counts.get(category, 0) + 1
        kind = "none" if category == "heldout" else category
        prompt = Prompt(f"{category}-{counts[category] - 1:03d}", entry["caption"], kind != "none", kind, name)
        prompts.append(prompt)
        if entry["caption"] in truth_by_caption:
            truth[prompt.id] = Truth(*truth_by_caption[entry["caption"]])
    return PromptSet(name, prompts, truth)


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


def load_prompt_set(spec: dict) -> PromptSet:
    """A prompt set from its config: ``loader`` names the source, the other keys are its arguments; then
    ``select_ids``, ``limit`` and ``shard`` narrow it, in that order."""
    from . import prompt_files as files

    spec = dict(spec)
    loader = spec.pop("loader")
    loaders = {
        "inline": lambda name, entries, **_: inline_prompt_set(name, list(entries)),
        "testbed": lambda name, model_folder, **_: testbed_prompt_set(model_folder, name),
        "file": files.file_prompt_set,
        "random": files.random_prompt_set,
        "hf": files.hf_prompt_set,
        "union": lambda name, parts, **_: union(name, [load_prompt_set(part) for part in
                                                       (parts.values() if isinstance(parts, dict) else parts)]),
    }
    if loader not in loaders:
        raise ValueError(f"unknown prompt loader {loader!r} (one of {', '.join(loaders)})")
    prompt_set = loaders[loader](**spec)
    if spec.get("select_ids"):
        prompt_set = select_ids(prompt_set, spec["select_ids"])
    if spec.get("limit"):
        prompt_set = subset(prompt_set, prompt_set.prompts[:spec["limit"]])
    if spec.get("shard"):
        prompt_set = shard(prompt_set, spec["shard"])
    return prompt_set


def union(name: str, parts: list[PromptSet]) -> PromptSet:
    """Several sets as one; ids are prefixed with their part's name so they stay unique."""
    prompts, truth = [], {}
    for part in parts:
        for p in part:
            prompts.append(Prompt(f"{part.name}/{p.id}", p.text, p.memorized, p.kind, p.source or part.name))
        truth |= {f"{part.name}/{k}": v for k, v in part.truth.items()}
    return PromptSet(name, prompts, truth)


def prone_ids(generations_csv: str | Path, k: int, detector: str = "D", T: int = 1, layers: str = "") -> list[str]:
    """The memorization-prone rule (the seed paper gives none): the k memorized prompts with the highest
    prompt-level score (mean over generations) of one detector in a previous detection job."""
    import pandas as pd

    table = pd.read_csv(generations_csv, keep_default_na=False, dtype={"prompt_id": str})
    rows = table[(table.detector == detector) & (table["T"] == T) & (table.layers == layers) & table.memorized]
    if rows.empty:
        raise ValueError(f"{generations_csv}: no memorized rows for {detector}[{layers}] T={T}")
    ranked = rows.groupby("prompt_id")["score"].mean().sort_values(ascending=False, kind="mergesort")
    return list(ranked.index[:k])
