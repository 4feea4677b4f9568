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


def load_prompt_set(spec: dict) -> PromptSet:
    """A prompt set from its config: ``loader`` names the format, the other keys are the loader's arguments."""
    spec = dict(spec)
    loader = spec.pop("loader")
    loaders = {"inline": lambda name, entries, **_: inline_prompt_set(name, list(entries)),
               "testbed": lambda name, model_folder, **_: testbed_prompt_set(model_folder, name)}
    if loader not in loaders:
        raise ValueError(f"unknown prompt loader {loader!r} (one of {', '.join(loaders)})")
    prompt_set = loaders[loader](**spec)
    limit = spec.get("limit")
    if limit:
        kept = prompt_set.prompts[:limit]
        prompt_set = PromptSet(prompt_set.name, kept, {p.id: prompt_set.truth[p.id] for p in kept
                                                       if p.id in prompt_set.truth})
    return prompt_set
