"""SAIL, anisotropy and curvature maps on the planted-memorization testbed, beside D, LD and BE on the same images.

For a subset of the testbed's prompts (default: the 60-prompt evaluation of docs/testbed.md, 8 global, 12 local,
40 held-out), each prompt's seeds are sampled once with capture (D, LD, BE intensity, the score-difference map),
then each Jacobian method runs its own pass; one plain generation per prompt times them side by side. Writes
``scores.csv`` (per generation), ``detection.csv`` (AUC, memorized kind vs held-out, per generation and per prompt),
``localization.csv`` (IoU / pixel AUROC against the planted masks, with the held-out control) and ``costs.json``
to ``--out`` and prints the tables.

    python -m runners.jacobian_testbed --model artifacts/testbed/pipeline --out outputs/jacobian/testbed
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from benchmark import jacobian_scores as J
from benchmark import scores as S
from benchmark.capture import SamplerSettings, sample_with_capture
from benchmark.localization import localization_table
from benchmark.models import get_model
from benchmark.prompts import testbed_prompt_set

# the BE layer sets of conf/layers/testbed.yaml, spelled as prefixes so that the pseudo-layers below stay apart
BE_SETS = {"BE all": ["down_blocks", "mid_block", "up_blocks"], "BE low8": ["down_blocks.2", "mid_block", "up_blocks.0"]}


def pick(prompt_set, n_global: int, n_local: int, n_heldout: int):
    wanted = {"global": n_global, "local": n_local, "none": n_heldout}
    kept, counts = [], dict.fromkeys(wanted, 0)
    for p in prompt_set:
        if counts[p.kind] < wanted[p.kind]:
            kept.append(p)
            counts[p.kind] += 1
    return kept


def auc_table(scores: pd.DataFrame, detectors: list[str]) -> pd.DataFrame:
    rows = []
    for level in ("generation", "prompt"):
        table = scores if level == "generation" else scores.groupby(["prompt", "kind"], as_index=False)[detectors].mean()
        for kind in ("global", "local"):
            part = table[table.kind.isin([kind, "none"])]
            labels = (part.kind == kind).to_numpy()
            for d in detectors:
                rows.append({"level": level, "subset": kind, "detector": d,
                             "auc": roc_auc_score(labels, part[d].to_numpy()), "n_pos": int(labels.sum()),
                             "n_neg": int((~labels).sum())})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="artifacts/testbed/pipeline")
    parser.add_argument("--out", default="outputs/jacobian/testbed")
    parser.add_argument("--global-prompts", type=int, default=8)
    parser.add_argument("--local-prompts", type=int, default=12)
    parser.add_argument("--heldout-prompts", type=int, default=40)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)  # conf/sampler/testbed.yaml
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sail-k", type=int, default=J.SAIL_STEPS)
    parser.add_argument("--probes", type=int, default=J.CURVATURE_PROBES)
    parser.add_argument("--curvature-step", type=int, default=J.CURVATURE_STEP)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"output folder {out} is not empty: choose another --out")

    model = get_model(args.model, build="testbed")
    prompt_set = testbed_prompt_set(args.model)
    prompts = pick(prompt_set, args.global_prompts, args.local_prompts, args.heldout_prompts)
    settings = SamplerSettings(args.steps, args.guidance, 32, 32)
    seeds = list(range(args.images))
    rows, maps, cost = [], {"curvature": [], "score_diff": []}, dict.fromkeys(["plain", "sail", "anisotropy",
                                                                                "curvature"], 0.0)
    end_maps: dict[str, list[np.ndarray]] = {}
    image_ids = []
    for i, p in enumerate(prompts):
        start = time.perf_counter()
        sample_with_capture(model, p.text, seeds, settings, record=False)
        cost["plain"] += time.perf_counter() - start
        batch = sample_with_capture(model, p.text, seeds, settings, decode=False)
        delta_sq = batch.delta_sq.numpy()
        ends = {k: v.numpy() for k, v in batch.end_maps.items()}
        for k, v in ends.items():
            end_maps.setdefault(k, []).append(v)
        start = time.perf_counter()
        sail = J.sail(model, p.text, seeds, settings, k=args.sail_k)
        cost["sail"] += time.perf_counter() - start
        start = time.perf_counter()
        aniso = J.anisotropy(model, p.text, seeds, settings)
        cost["anisotropy"] += time.perf_counter() - start
        start = time.perf_counter()
        curv = J.curvature_map(model, p.text, seeds, settings, step=args.curvature_step, probes=args.probes)
        cost["curvature"] += time.perf_counter() - start
        sdiff = J.score_difference_map(delta_sq, args.curvature_step)
        maps["curvature"].append(curv)
        maps["score_diff"].append(sdiff)
        be = S.be_mask(ends, BE_SETS["BE all"], delta_sq.shape[-2:])
        for j, s in enumerate(seeds):
            rows.append({"prompt": p.id, "kind": p.kind, "seed": s,
                         "D_1": S.magnitude_D(delta_sq, 1)[j], "LD_1[all]": S.localized_LD(delta_sq, be, 1)[j],
                         "BE_intensity[all]": S.be_intensity(be)[j], "SAIL": sail[j],
                         "anisotropy": aniso["anisotropy"][j], "guidance_norm": aniso["guidance_norm"][j],
                         "alignment": aniso["alignment"][j], "curvature_mean": J.curvature_score(curv)[j],
                         "score_diff_mean": sdiff[j].mean()})
            image_ids.append(p.id)
        print(f"[{i + 1}/{len(prompts)}] {p.id}", flush=True)

    scores = pd.DataFrame(rows)
    detectors = [c for c in scores.columns if c not in ("prompt", "kind", "seed")]
    detection = auc_table(scores, detectors)
    stacked = {k: np.concatenate(v) for k, v in end_maps.items()} | {k: np.concatenate(v) for k, v in maps.items()}
    sets = BE_SETS | {"curvature": ["curvature"], "score_diff": ["score_diff"]}
    localization = localization_table(stacked, image_ids, prompt_set.truth, sets)
    costs = {f"{k}_cost_ratio": cost[k] / cost["plain"] for k in ("sail", "anisotropy", "curvature")}
    costs |= {"plain_seconds_per_prompt": cost["plain"] / len(prompts), "images_per_prompt": len(seeds),
              "steps": args.steps, "probes": args.probes, "sail_k": args.sail_k, "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    detection.to_csv(out / "detection.csv", index=False)
    localization.to_csv(out / "localization.csv", index=False)
    (out / "costs.json").write_text(json.dumps(costs, indent=1) + "\n")
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.precision", 3):
        print(detection.pivot_table(index="detector", columns=["level", "subset"], values="auc"))
        print(localization)
        print(json.dumps(costs, indent=1))


if __name__ == "__main__":
    main()
