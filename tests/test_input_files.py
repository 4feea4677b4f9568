"""Input files as people write them (issue #15, section 2) and every documented prompt option on every set
(section 5): BOM and Windows line endings in every format, Webster's Parquet schema, ``limit`` everywhere."""
import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmark.data.prompt_files import file_prompt_set
from benchmark.data.prompts import inline_prompt_set, load_prompt_set, select_ids
from benchmark.detectors.detection import prone_ids

CONF = str(Path(__file__).resolve().parents[1] / "conf")
BOM = "\ufeff"


def write(path: Path, text: str, bom: bool, crlf: bool) -> str:
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes(((BOM if bom else "") + text).encode("utf-8"))
    return str(path)


STYLES = pytest.mark.parametrize("bom, crlf", [(True, False), (False, True), (True, True)],
                                 ids=["bom", "crlf", "bom+crlf"])


@STYLES
def test_csv(tmp_path, bom, crlf):
    """The issue's case: a CSV saved with a BOM was refused (no column 'caption' (has \\ufeffcaption, kind))."""
    path = write(tmp_path / "p.csv", "caption,kind\na cat,global\n\"two\nlines\",none\n", bom, crlf)
    ps = file_prompt_set("p", path, kind_field="kind")
    assert [(p.text, p.kind) for p in ps] == [("a cat", "global"), ("two\r\nlines" if crlf else "two\nlines", "none")]


@STYLES
def test_semicolon_csv_with_ids(tmp_path, bom, crlf):
    path = write(tmp_path / "p.csv", "Index;Caption\n7;a cat\n9;a dog\n", bom, crlf)
    ps = file_prompt_set("p", path, sep=";", text_field="Caption", id_field="Index")
    assert [(p.id, p.text) for p in ps] == [("7", "a cat"), ("9", "a dog")]


@STYLES
def test_txt(tmp_path, bom, crlf):
    """The issue's case: a TXT with a BOM was read, but the mark became part of the first prompt."""
    ps = file_prompt_set("t", write(tmp_path / "t.txt", "first prompt\nsecond prompt\n", bom, crlf))
    assert [p.text for p in ps] == ["first prompt", "second prompt"]


@STYLES
def test_jsonl(tmp_path, bom, crlf):
    path = write(tmp_path / "j.jsonl", '{"caption": "x", "index": 7}\n{"caption": "y", "index": 9}\n', bom, crlf)
    ps = file_prompt_set("j", path, id_field="index")
    assert [(p.id, p.text) for p in ps] == [("7", "x"), ("9", "y")]


@STYLES
def test_id_list(tmp_path, bom, crlf):
    ps = inline_prompt_set("s", [{"id": i, "text": f"p{i}"} for i in ("a", "b", "c")])
    kept = select_ids(ps, write(tmp_path / "ids.txt", "a\nc\n", bom, crlf))
    assert [p.id for p in kept] == ["a", "c"]


@STYLES
def test_generations_table_for_prone_ids(tmp_path, bom, crlf):
    rows = "detector,layers,T,prompt_id,kind,memorized,seed,score\n" + "".join(
        f"D,,1,{pid},global,True,0,{score}\n" for pid, score in (("p0", 1.0), ("p1", 3.0), ("p2", 2.0)))
    assert prone_ids(write(tmp_path / "g.csv", rows, bom, crlf), 2) == ["p1", "p2"]


def test_webster_parquet_of_the_published_schema(tmp_path):
    """Webster's ground truth as onestep-extraction's README publishes it: caption, url, overfit_type in
    MV / TV / RV / N, no id column; loaded through the shipped `webster` config with the documented kinds."""
    path = tmp_path / "sdv1_bb_edge_groundtruth.parquet"
    pd.DataFrame({"caption": ["a", "b", "c", "d"], "url": [f"https://x/{i}.jpg" for i in range(4)],
                  "overfit_type": ["MV", "TV", "RV", "N"]}).to_parquet(path)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("detect", overrides=["prompts=webster", f"paths.root={tmp_path}"])
    spec = OmegaConf.to_container(cfg.prompts, resolve=True) | {"path": str(path)}
    ps = load_prompt_set(spec)
    assert [(p.id, p.text, p.kind, p.memorized) for p in ps] == [
        ("0", "a", "global", True), ("1", "b", "local", True), ("2", "c", "local", True), ("3", "d", "none", False)]


def _sets():
    return sorted(p.stem for p in (Path(CONF) / "prompts").glob("*.yaml"))


@pytest.mark.parametrize("name", _sets())
def test_every_set_takes_every_documented_option(name, tmp_path):
    """docs/prompts.md: limit, select_ids and shard on every set, and for file sets on_error: all composable
    (`prompts.limit=2` was refused with "Key 'limit' is not in struct" on all but the tiny set)."""
    overrides = [f"prompts={name}", f"paths.root={tmp_path}", "prompts.limit=2", "prompts.shard=0/2",
                 f"prompts.select_ids={tmp_path}/ids.txt"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("detect", overrides=overrides)
        assert cfg.prompts.limit == 2 and cfg.prompts.shard == "0/2"
        if cfg.prompts.loader == "file":
            cfg = compose("detect", overrides=[*overrides, "prompts.on_error=skip"])
            assert cfg.prompts.on_error == "skip"


def test_limit_narrows_a_file_set(tmp_path):
    data = tmp_path / "data" / "prompts" / "MemAttn"
    data.mkdir(parents=True)
    (data / "sd1_mem345.txt").write_text("".join(f"prompt {i}\n" for i in range(5)))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("detect", overrides=["prompts=ren_mem345", f"paths.data_dir={tmp_path}/data", "prompts.limit=2"])
    ps = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
    assert [p.text for p in ps] == ["prompt 0", "prompt 1"]
    assert json.dumps(OmegaConf.to_container(cfg.prompts, resolve=True))  # plain data, storable in a job folder
