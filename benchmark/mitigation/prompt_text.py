"""Somepalli et al.'s inference-time mitigations (NeurIPS 2023, "Understanding and Mitigating Copying in Diffusion
Models"): random caption and embedding perturbations, no optimisation, no detection.

As the official code runs them (github.com/somepago/DCR, ``sd_mitigation.py``; README "Mitigation strategy"):

- ``rna`` (``--rand_augs rand_numb_add``): ``repeats`` times, a random number in 0..99999 inserted into the caption;
- ``rta`` (``--rand_augs rand_word_add``): ``repeats`` times, a random vocabulary token (id drawn uniformly below
  49400 on SD's CLIP tokenizer, decoded to text) inserted;
- ``cwr`` (``--rand_augs rand_word_repeat``): ``repeats`` times, a word of the caption (drawn from its words as
  written, before any insertion) inserted again;
- ``gni`` (``--rand_noise_lam 0.1``): Gaussian noise ``lam * N(0, 1)`` added to the text embeddings; their pipeline
  adds it to what ``_encode_prompt`` returns, the CFG batch of unconditional and conditional embeddings, so both
  are perturbed, as here.

Every insertion is at a uniform position among the caption's space-separated words, ends included (``datasets.py``
``insert_rand_word``). ``repeats`` defaults to the script's ``--rand_aug_repeats`` 4 (Wen et al.'s
``inference_mem.py`` runs the same augmentations with ``--repeat_num`` 1). The official script draws from the
global generators, one stream for the whole run; here each generation draws from its own generator, seeded by the
caption, the image's seed and its prompt index, so a generation's perturbation depends on it alone.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from benchmark.core.config_types import NonNegative, PositiveInt
from benchmark.mitigation.interface import Intervention
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import SamplingSetup

NUMBER_RANGE = 100_000  # np.random.choice(100000) in sd_mitigation.py prompt_augmentation
TOKEN_RANGE = 49_400  # np.random.randint(49400): SD's CLIP vocabulary (49408) below its last ids, specials excluded
PROMPT_TAG = 0x9E47_7E47  # mixed into each generation's seed: its stream is no image's noise


def generation_rng(prompt: str, seed: int, prompt_index: int | None, what: str) -> np.random.Generator:
    """A generator of one generation's own: seeded by its caption, image seed, prompt index (-1 when none) and
    ``what`` draws it (a method's name), through numpy's SeedSequence."""
    digest = hashlib.sha1(f"{what}\0{prompt}".encode()).digest()
    entropy = [PROMPT_TAG, int.from_bytes(digest[:8], "little"), int(seed) % 2**64,
               (-1 if prompt_index is None else int(prompt_index)) % 2**64]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def insert_word(caption: str, word: str, rng: np.random.Generator) -> str:
    """``word`` inserted among ``caption``'s space-separated words at a uniform position in 0..len(words)
    (both ends included), joined by single spaces, as DCR's ``insert_rand_word``."""
    words = caption.split(" ")
    words.insert(int(rng.integers(0, len(words) + 1)), word)
    return " ".join(words)


def augment(caption: str, style: str, repeats: int, rng: np.random.Generator, tokenizer=None) -> str:
    """DCR's ``prompt_augmentation``: ``repeats`` insertions of ``style`` ``rna`` (a number), ``rta`` (a decoded
    random token; ``tokenizer`` needed) or ``cwr`` (a word of the caption). Raises ValueError for another style."""
    words = caption.split(" ")
    for _ in range(repeats):
        if style == "rna":
            word = str(int(rng.integers(0, NUMBER_RANGE)))
        elif style == "rta":
            word = random_token(tokenizer, rng)
        elif style == "cwr":
            word = words[int(rng.integers(0, len(words)))]
        else:
            raise ValueError(f"unknown caption augmentation {style!r} (rna, rta, cwr)")
        caption = insert_word(caption, word, rng)
    return caption


def random_token(tokenizer, rng: np.random.Generator) -> str:
    """A vocabulary token drawn uniformly, decoded: ids below ``TOKEN_RANGE`` (the official bound) or the
    tokenizer's size if smaller; a special token (padding, start, end...) is drawn again, which on SD's tokenizer
    never happens (its specials lie above the bound)."""
    bound = min(TOKEN_RANGE, len(tokenizer))
    special = set(tokenizer.all_special_ids)
    if len(special) >= bound:
        raise ValueError(f"random token addition: the tokenizer has no ordinary token below id {bound}")
    while True:
        token_id = int(rng.integers(0, bound))
        if token_id not in special:
            return tokenizer.decode([token_id]).strip()


def per_image(prompt_index: int | Sequence[int] | None, n: int) -> list[int | None]:
    """The prompt index of each of n images (one for all, one per image, or None)."""
    return [prompt_index] * n if prompt_index is None or isinstance(prompt_index, int) else list(prompt_index)


def _caption_method(style: str, repeats: int) -> Intervention:
    if repeats < 1:
        raise ValueError(f"{style}: repeats must be >= 1, got {repeats}")

    def prompts(model, captions: list[str], seeds: list[int], prompt_index) -> list[str]:
        tokenizer = getattr(model, "tokenizer", None)
        return [augment(c, style, repeats, generation_rng(c, s, i, style), tokenizer)
                for c, s, i in zip(captions, seeds, per_image(prompt_index, len(seeds)))]

    return Intervention(prompts=prompts)


_CAPTION = {"acts_on": "prompt", "needs_mask": False, "strength": "repeats", "stronger": "higher",
            "strengths": (1, 2, 4)}


@MITIGATIONS.register("rna", label="RNA (random numbers, Somepalli)", **_CAPTION)
def random_number_addition(repeats: PositiveInt) -> Intervention:
    """Random number addition: ``repeats`` numbers in 0..99999 inserted at random positions."""
    return _caption_method("rna", repeats)


@MITIGATIONS.register("rta", label="RTA (random tokens, Somepalli)", requires=("tokenizer",), **_CAPTION)
def random_token_addition(repeats: PositiveInt) -> Intervention:
    """Random token addition: ``repeats`` random vocabulary tokens of the model's tokenizer inserted at random
    positions."""
    return _caption_method("rta", repeats)


@MITIGATIONS.register("cwr", label="CWR (caption word repetition, Somepalli)", **_CAPTION)
def caption_word_repetition(repeats: PositiveInt) -> Intervention:
    """Caption word repetition: ``repeats`` words of the caption inserted again at random positions."""
    return _caption_method("cwr", repeats)


@MITIGATIONS.register("gni", label="GNI (embedding noise, Somepalli)", acts_on="embedding", needs_mask=False,
                      strength="lam", stronger="higher", strengths=(0.05, 0.1, 0.2))
def gaussian_noise_injection(lam: NonNegative) -> Intervention:
    """Gaussian noise ``lam * N(0, 1)`` added to the conditional and the unconditional embedding of every image
    (its own generator per generation, float32, then the model's dtype)."""

    def embedding(setup: SamplingSetup) -> torch.Tensor:
        noise_c, noise_u = [], []
        for prompt, seed, index in zip(setup.prompts, setup.seeds, per_image(setup.prompt_index, setup.n)):
            rng = generation_rng(prompt, seed, index, "gni")
            shape = (2, *setup.cond.shape[1:])
            both = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
            noise_u.append(both[0])
            noise_c.append(both[1])
        device = setup.cond.device
        # both halves of the CFG batch, as the official pipeline's _encode_prompt output
        setup.uncond = (setup.uncond.float() + lam * torch.stack(noise_u).to(device)).to(setup.uncond.dtype)
        return setup.cond.float() + lam * torch.stack(noise_c).to(device)

    return Intervention(embedding=embedding)
