"""End-token positions on SD v1-4's real tokenizer (CLIP BPE from the open_clip_torch wheel)."""
import json

import pytest

from benchmark.models.text_to_image import clip_tokenizer, tiny_text_to_image

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def model():
    return tiny_text_to_image()


def test_known_clip_ids():
    assert clip_tokenizer()("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]


@pytest.mark.parametrize("prompt, index", [
    ("a photo of a cat", 6),  # short: BOS + 5 words
    ("", 1),  # empty: BOS, EOS
    ("The No Limits Business Woman Podcast", 7),
])
def test_end_index_short(model, prompt, index):
    assert model.end_token_index([prompt]).tolist() == [index]


def test_end_index_points_at_the_first_end_token_not_the_padding(model):
    prompts = ["Mothers influence on her young hippo", "Living in the Light with Ann Graham Lotz"]
    padded = model.tokenizer(prompts, padding="max_length", max_length=77).input_ids
    for ids, index in zip(padded, model.end_token_index(prompts).tolist()):
        assert ids[index] == EOS and EOS not in ids[:index]
        assert all(i == EOS for i in ids[index:])  # SD pads with the end token


def test_end_index_long_and_truncated(model):
    long = "a very detailed painting of " + " ".join(["mountains"] * 60)  # 64 words: fits
    truncated = " ".join(["castle"] * 120)
    index_long, index_trunc = model.end_token_index([long, truncated]).tolist()
    assert index_long == 66  # BOS + 65 words
    assert index_trunc == 76  # capped at the last of 77 positions, where truncation puts the end token
    assert model.tokenizer([truncated], truncation=True, max_length=77).input_ids[0][76] == EOS


def test_end_index_on_real_memorized_prompts(model, shared_data):
    path = shared_data / "prompts" / "diffusion_memorization" / "sdv1_500_memorized.jsonl"
    prompts = [json.loads(line)["caption"] for line in path.read_text().splitlines()[:100]]
    ids = model.tokenizer(prompts, truncation=True, max_length=77).input_ids
    for prompt, tokens, index in zip(prompts, ids, model.end_token_index(prompts).tolist()):
        assert tokens[index] == EOS and tokens[0] == BOS and index == len(tokens) - 1, prompt
