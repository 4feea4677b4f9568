"""Ties in every ranking or selection keep the order of what is ranked (the prompt set's, the generations', the
training set's), never the string order of ids or an unstable sort's."""
import sys

import numpy as np
import pandas as pd
from omegaconf import OmegaConf, open_dict

from benchmark.detectors.detection import prone_ids
from benchmark.localization import copying
from runners import select_prompts
from runners.detect import run

# a LAION-style duplicate caption under two ids whose string order ("10" < "9") is not the set's
DUP = {"name": "dup", "loader": "inline", "limit": None, "shard": None, "select_ids": None, "entries": [
    {"id": "9", "text": "The No Limits Business Woman Podcast", "kind": "global"},
    {"id": "10", "text": "The No Limits Business Woman Podcast", "kind": "global"},
    {"id": "n0", "text": "a photo of a cat on a red sofa"},
    {"id": "n1", "text": "an astronaut riding a horse, oil painting"}]}


def test_select_prompts_breaks_ties_by_the_sets_order(tmp_path, compose, monkeypatch):
    cfg = compose("detect", "debug=default")
    with open_dict(cfg):
        cfg.prompts = OmegaConf.create(DUP)
    run(cfg, tmp_path / "job")
    gens = pd.read_csv(tmp_path / "job" / "generations.csv", dtype={"prompt_id": str})
    d = gens[(gens.detector == "D") & (gens["T"] == 1)].groupby("prompt_id").score.mean()
    assert d["9"] == d["10"]  # the same caption and seeds: exactly tied
    out = tmp_path / "prone1.txt"
    monkeypatch.setattr(sys, "argv", ["select_prompts", str(tmp_path / "job" / "generations.csv"), "--k", "1",
                                      "--out", str(out)])
    select_prompts.main()
    assert out.read_text().split() == ["9"]
    assert prone_ids(tmp_path / "job" / "generations.csv", 2) == ["9", "10"]


def test_prone_ids_ranks_by_score_then_set_order(tmp_path):
    # set order b, 10, 9, a; scores 10 = 9 = 2 > a = b = 1
    rows = [("b", 1.0), ("10", 2.0), ("9", 2.0), ("a", 1.0), ("n", 9.0)]
    table = pd.DataFrame([{"prompt_id": p, "kind": "none" if p == "n" else "global", "memorized": p != "n",
                           "seed": 0, "detector": "D", "layers": "", "T": 1, "score": v} for p, v in rows])
    table.to_csv(tmp_path / "g.csv", index=False)
    assert prone_ids(tmp_path / "g.csv", 4) == ["10", "9", "b", "a"]


def test_copy_gallery_and_nearest_neighbour_keep_the_given_order_on_ties():
    rng = np.random.default_rng(0)
    training = rng.random((3, 3, 8, 8)).astype(np.float32)
    training[2] = training[0]  # two equally near training images: the first is the nearest
    index, _, _ = copying.nn_ratio(copying.pairwise_rms(training[:1], training))
    assert index[0] == 0
    # 20 generations with three Carlini scores: introsort (numpy's default) reorders equal ones here
    carlini = np.array([2, 1, 1, 0, 0, 0, 0, 0, 0, 2, 1, 2, 1, 1, 2, 2, 1, 1, 1, 2], float)
    images = rng.random((20, 3, 8, 8)).astype(np.float32)
    table = pd.DataFrame({"carlini": carlini, "nearest": [0] * 20})
    gallery = copying.copy_gallery(images, training, table, [np.zeros((8, 8))] * 20, n=8, scale=1)
    shown = [next(i for i in range(20) if np.allclose(gallery[8 * r:8 * r + 8, :8], images[i].transpose(1, 2, 0)))
             for r in range(8)]
    assert shown == [3, 4, 5, 6, 7, 8, 1, 2]
