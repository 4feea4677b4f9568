import json

import pytest

from benchmark.data.prompt_files import PromptFileError, file_prompt_set, random_prompt_set
from benchmark.data.prompts import inline_prompt_set, load_prompt_set, shard


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_with_ids_and_a_malformed_line_named(tmp_path):
    good = write(tmp_path / "a.jsonl", '{"caption": "x", "index": 7}\n{"caption": "y", "index": 9}\n')
    ps = file_prompt_set("a", good, memorized=True, id_field="index")
    assert [(p.id, p.text, p.memorized, p.kind) for p in ps] == [("7", "x", True, "memorized"),
                                                                 ("9", "y", True, "memorized")]
    bad = write(tmp_path / "b.jsonl", '{"caption": "x"}\n{"caption": "y"\n{"caption": "z"}\n')
    with pytest.raises(PromptFileError, match=r"b\.jsonl:2: not JSON"):
        file_prompt_set("b", bad)
    skipped = file_prompt_set("b", bad, on_error="skip")
    assert len(skipped) == 2 and skipped.skipped == 1


def test_csv_with_separator_kind_map_and_missing_column(tmp_path):
    path = write(tmp_path / "n.csv", ";Caption;type;Index\n0;a cat;VM;11\n1;a dog;TM;12\n")
    ps = file_prompt_set("n", path, sep=";", text_field="Caption", id_field="Index", kind_field="type",
                         kind_map={"VM": "global", "TM": "local"})
    assert [(p.id, p.kind, p.memorized) for p in ps] == [("11", "global", True), ("12", "local", True)]
    with pytest.raises(PromptFileError, match=r"n\.csv:2: no column 'caption'"):
        file_prompt_set("n", path, sep=";")
    ragged = write(tmp_path / "r.csv", "caption,x\nok,1\nbad,1,2\n")
    with pytest.raises(PromptFileError, match=r"r\.csv:3: 3 fields, header has 2"):
        file_prompt_set("r", ragged)


def test_txt_empty_set_duplicates_and_missing_file(tmp_path):
    ps = file_prompt_set("t", write(tmp_path / "t.txt", "one\ntwo"), memorized=False)
    assert [p.text for p in ps] == ["one", "two"] and ps.prompts[0].kind == "none"
    with pytest.raises(PromptFileError, match=r"e\.txt:2: empty prompt"):
        file_prompt_set("e", write(tmp_path / "e.txt", "one\n\nthree\n"))
    with pytest.raises(ValueError, match="prompt set 'z' is empty"):
        file_prompt_set("z", write(tmp_path / "z.txt", ""))
    with pytest.raises(ValueError, match="duplicate prompt id '1'"):
        file_prompt_set("d", write(tmp_path / "d.jsonl", '{"caption":"a","i":1}\n{"caption":"b","i":1}\n'),
                        id_field="i")
    with pytest.raises(PromptFileError, match="prompt file not found"):
        file_prompt_set("m", str(tmp_path / "missing.txt"))


def test_shards_partition_the_set_stably():
    ps = inline_prompt_set("s", [{"id": str(i), "text": f"p{i}"} for i in range(23)])
    shards = [shard(ps, f"{i}/4") for i in range(4)]
    ids = [p.id for s in shards for p in s]
    assert sorted(ids, key=int) == [p.id for p in ps] and len(set(ids)) == 23
    assert [p.id for p in shard(ps, "1/4")] == [p.id for p in shards[1]]
    with pytest.raises(ValueError, match="not i/n"):
        shard(ps, "4/4")


def test_random_captions_are_seeded_and_varied():
    a, b = random_prompt_set("r", 20, seed=1), random_prompt_set("r", 20, seed=1)
    assert [p.text for p in a] == [p.text for p in b]
    assert len({p.text for p in a}) > 15 and not any(p.memorized for p in a)


def test_hub_only_set_fails_offline_naming_the_local_alternative():
    spec = {"loader": "hf", "name": "lexica", "dataset": "Gustavosta/Stable-Diffusion-Prompts", "split": "test",
            "field": "Prompt", "local_alternative": "prompts=ren_nomem500"}
    with pytest.raises(RuntimeError, match="lexica.*prompts=ren_nomem500"):
        load_prompt_set(spec)


def test_select_ids_file(tmp_path):
    ps = {"loader": "inline", "name": "s", "entries": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]}
    ids = write(tmp_path / "ids.txt", "b\n")
    assert [p.id for p in load_prompt_set({**ps, "select_ids": ids})] == ["b"]
    with pytest.raises(ValueError, match="1 ids not in prompt set 's', first 'c'"):
        load_prompt_set({**ps, "select_ids": write(tmp_path / "bad.txt", "c\n")})


SHARED = {  # config name -> (count, memorized, kinds)
    "wen500": (500, 500, {"memorized"}),
    "nemo_memorized": (500, 500, {"global", "local"}),
    "laion_nonmem": (500, 0, {"none"}),
    "coco2014": (500, 0, {"none"}),
    "ren_mem345": (345, 345, {"memorized"}),
    "ren_nomem500": (500, 0, {"none"}),
    "ren_sd2_mem219": (219, 219, {"memorized"}),
    "membench": (3000, 3000, {"memorized"}),
    "be_prss": (4, 4, {"memorized"}),
}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_every_shared_file_loads_with_its_count_and_labels(name, shared_data, compose):
    from omegaconf import OmegaConf

    cfg = compose("detect", f"prompts={name}", f"paths.data_dir={shared_data}")
    ps = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
    count, memorized, kinds = SHARED[name]
    assert (len(ps), sum(p.memorized for p in ps), {p.kind for p in ps}) == (count, memorized, kinds)
    if name == "nemo_memorized":
        assert sum(p.kind == "global" for p in ps) == 112  # NeMo's VM rows


def test_ren345_are_wens_first_345(shared_data):
    wen = [json.loads(line)["caption"] for line in
           (shared_data / "prompts/diffusion_memorization/sdv1_500_memorized.jsonl").read_text().splitlines()]
    ren = file_prompt_set("r", str(shared_data / "prompts/MemAttn/sd1_mem345.txt"))
    assert [p.text for p in ren] == wen[:345]


def test_prone_rule_takes_the_top_k_memorized_by_prompt_mean(tmp_path):
    import pandas as pd

    from benchmark.detectors.detection import prone_ids

    rows = [("a", True, 0, 1.0), ("a", True, 1, 3.0), ("b", True, 0, 5.0), ("c", True, 0, 0.5), ("n", False, 0, 9.0)]
    table = pd.DataFrame([{"prompt_id": p, "kind": "memorized" if m else "none", "memorized": m, "seed": s,
                           "detector": "D", "layers": "", "T": 1, "score": v} for p, m, s, v in rows])
    path = tmp_path / "generations.csv"
    table.to_csv(path, index=False)
    assert prone_ids(path, 2) == ["b", "a"]
    with pytest.raises(ValueError, match="no memorized rows for LD"):
        prone_ids(path, 2, detector="LD")


def test_ground_truth_comes_from_a_data_file_for_any_source(tmp_path):
    """A prompt set with training images and masks needs a file, not code: ``truth_file`` beside any loader."""
    import numpy as np
    from PIL import Image

    image = np.zeros((8, 8, 3), np.uint8)
    image[:4] = 255
    Image.fromarray(image).save(tmp_path / "train0.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "mask0.png")
    (tmp_path / "truth.csv").write_text("id,image,mask\nm0,train0.png,mask0.png\nm1,train0.png,\n")
    (tmp_path / "p.jsonl").write_text("".join(f'{{"caption": "c{i}", "id": "m{i}"}}\n' for i in range(3)))
    spec = {"loader": "file", "name": "f", "path": str(tmp_path / "p.jsonl"), "id_field": "id",
            "truth_file": str(tmp_path / "truth.csv")}
    ps = load_prompt_set(spec)
    assert set(ps.truth) == {"m0", "m1"} and ps.truth["m1"].mask is None
    assert ps.truth["m0"].image.shape == (3, 8, 8) and ps.truth["m0"].image[:, 0].min() == 1.0
    assert ps.truth["m0"].mask.sum() == 16
    assert set(load_prompt_set({**spec, "limit": 1}).truth) == {"m0"}  # narrowing keeps the truth of what is kept
    (tmp_path / "bad.csv").write_text("id,image\nzz,train0.png\n")
    with pytest.raises(ValueError, match="bad.csv:2: prompt id 'zz' is not in prompt set 'f'"):
        load_prompt_set({**spec, "truth_file": str(tmp_path / "bad.csv")})
