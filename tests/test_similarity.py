import numpy as np
import pytest
import torch

from benchmark.measures.similarity import SSCD, CLIPScore, pixel_LS, pixel_S


def test_S_is_minus_rms_distance_on_the_0_255_scale():
    a = np.zeros((3, 8, 8))
    assert pixel_S(a, a) == 0
    assert pixel_S(a, a + 0.2) == pytest.approx(-51.0)
    b = a.copy()
    b[:, :4] = 1.0  # half the image differs by 1
    assert pixel_S(a, b) == pytest.approx(-255 / np.sqrt(2))


def test_LS_with_a_binary_mask_is_S_inside_it():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(3, 8, 8)), rng.uniform(size=(3, 8, 8))
    b[:, :4, :4] = a[:, :4, :4]  # the copied corner
    mask = np.zeros((8, 8))
    mask[:4, :4] = 1
    assert pixel_LS(a, b, mask) == 0
    outside = ((a - b) ** 2).mean(0)[mask == 0]
    assert pixel_LS(a, b, 1 - mask) == pytest.approx(-255 * np.sqrt(outside.mean()))
    assert pixel_LS(a, b, np.ones((8, 8))) == pytest.approx(pixel_S(a, b))
    # a low-resolution mask is upsampled: a 2x2 mask bright in one quadrant still favours that corner
    assert pixel_LS(a, b, np.array([[1.0, 0], [0, 0]])) > pixel_S(a, b)
    with pytest.raises(ValueError, match="positive weight"):
        pixel_LS(a, b, np.zeros((8, 8)))


def test_sscd_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="SSCD: file not found: .*nope.pt"):
        SSCD(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="SSCD: no file configured"):
        SSCD(None)


def test_sscd_preprocessing_and_cosine_with_a_scripted_stand_in(tmp_path):
    class Descriptor(torch.nn.Module):  # stands in for the real network: any scripted module works the same way
        def forward(self, x):
            assert x.shape[-2:] == (224, 224)
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    path = tmp_path / "sscd.pt"
    torch.jit.script(Descriptor()).save(str(path))
    sscd = SSCD(path)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 3, 32, 48)).astype(np.float32)
    same = sscd.similarity(x, x)
    assert same == pytest.approx([1.0, 1.0], abs=1e-5)
    other = sscd.similarity(x, 1 - x[::-1] ** 3)
    assert (other < 0.999).all() and (other >= -1).all()


def test_clip_score_without_weights_says_what_to_provide():
    with pytest.raises(FileNotFoundError, match="CLIP score: no file configured"):
        CLIPScore("ViT-H-14", None)


def test_table2_on_constructed_copies():
    from benchmark.localization.evaluation import Truth, similarity_f1, similarity_table

    rng = np.random.default_rng(0)
    train_g, train_l = rng.uniform(size=(3, 8, 8)), rng.uniform(size=(3, 8, 8))
    region = np.zeros((8, 8), bool)
    region[:4] = True
    truth = {"g": Truth(train_g), "l": Truth(train_l, region)}
    images, ids, kinds = [], [], []
    for _ in range(3):
        copy = np.clip(train_g + rng.normal(0, 0.02, train_g.shape), 0, 1)
        local = rng.uniform(size=(3, 8, 8))
        local[:, region] = train_l[:, region]
        for image, prompt_id, kind in [(copy, "g", "global"), (local, "l", "local"),
                                       (rng.uniform(size=(3, 8, 8)), "n", "none")]:
            images.append(image)
            ids.append(prompt_id)
            kinds.append(kind)
    bright_top = np.zeros((len(images), 4, 4))
    bright_top[:, :2] = 1.0  # a BE mask bright over the top half: the planted region
    table = similarity_table(images, {"layer": bright_top}, ids, kinds, truth, ["layer"])
    assert len(table) == 3 + 3 + 3 * 2
    local = table[table.kind == "local"]
    assert (local.LS > -50).all() and (local.S < -50).all()  # the mask finds the copy S misses
    f1 = similarity_f1(table).set_index(["metric", "kind"])
    assert f1.loc[("S", "global"), "f1"] == 1.0 and f1.loc[("LS", "local"), "f1"] == 1.0
    assert f1.loc[("S", "local"), "f1"] < 1.0


def test_clip_score_pipeline_with_a_stand_in_open_clip(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    class Model(torch.nn.Module):  # image embedding = mean colour; text embedding = a colour named in the prompt
        visual = SimpleNamespace(image_size=(16, 16), image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))

        def encode_image(self, x):
            assert x.shape[-2:] == (16, 16)
            return x.mean(dim=(2, 3))

        def encode_text(self, tokens):
            return tokens.float()

    colours = {"red": [1.0, 0, 0], "green": [0, 1.0, 0]}
    fake = SimpleNamespace(create_model=lambda arch, pretrained, device: Model(),
                           get_tokenizer=lambda arch: lambda prompts: torch.tensor([colours[p] for p in prompts]))
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    clip = CLIPScore("ViT-test", weights)
    red = np.zeros((1, 3, 24, 32), np.float32)
    red[:, 0] = 1.0
    assert clip.score(red, ["red"]) == pytest.approx([100.0])
    assert clip.score(red, ["green"]) == pytest.approx([0.0], abs=1e-5)
