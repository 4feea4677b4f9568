"""A stored result is reused only when everything that made it is the same (issue #15, section 1; docs/reuse.md)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from benchmark.store import job_folder as jobfolder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the job-folder module

def _config(tmp_path, prompt_file):
    return {"task": "detect", "model": {"name": "tiny", "source": "tiny"}, "sampler": {"steps": 5, "n_images": 2},
            "prompts": {"name": "mem", "loader": "file", "path": str(prompt_file)},
            "paths": {"root": str(tmp_path)}, "logger": {"wandb": False}}


def _finish(folder, config, headline=0.5):
    jobfolder.write_results(folder, "detect", config, config["sampler"], config["sampler"]["n_images"],
                            {"headline": headline, "metrics": []})


def test_results_carry_the_schema_and_read_back(tmp_path):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("a prompt\n")
    config = _config(tmp_path, prompts)
    _finish(tmp_path / "job", config)
    job = jobfolder.read_job(tmp_path / "job")
    assert job.task == "detect" and job.config == config and job.n_images == 2
    assert job.sampler == {"steps": 5, "n_images": 2}
    assert set(job.fingerprints) == {"prompts.path"}  # paths.* say where, not what: not fingerprinted
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert {"schema", "task", "config", "sampler_settings", "n_images", "fingerprints", "headline"} <= set(metrics)
    assert (tmp_path / "job" / "config.yaml").exists()


def test_a_changed_prompt_file_under_the_same_name_is_not_reused(tmp_path):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("first prompt\n")
    config = _config(tmp_path, prompts)
    _finish(tmp_path / "job", config)
    folder, done = jobfolder.open_job(tmp_path / "job", config)
    assert done is not None and folder == tmp_path / "job"  # same inputs: reused
    prompts.write_text("another prompt\n")  # same path, same set name, other content
    folder, done = jobfolder.open_job(tmp_path / "job", config)
    assert done is None and folder == tmp_path / "job-2"
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["headline"] == 0.5  # left untouched


def test_a_folder_held_by_a_live_job_is_not_shared(tmp_path):
    config = _config(tmp_path, tmp_path / "none.txt")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "job").mkdir()
        claim = {"pid": other.pid, "host": socket.gethostname(), "since": time.time()}
        (tmp_path / "job" / jobfolder.CLAIM).write_text(json.dumps(claim))
        folder, done = jobfolder.open_job(tmp_path / "job", config)
        assert done is None and folder == tmp_path / "job-2"
        assert json.loads((folder / jobfolder.CLAIM).read_text())["pid"] == os.getpid()
    finally:
        other.kill()
        other.wait()
    # a claim whose pid now belongs to a process started after it is stale too (pid reuse)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / jobfolder.CLAIM).write_text(json.dumps({**claim, "pid": os.getppid(), "since": time.time()}))
    assert jobfolder.open_job(tmp_path / "old", config)[0] == tmp_path / "old-2"  # parent: started before, alive
    (tmp_path / "old" / jobfolder.CLAIM).write_text(json.dumps({**claim, "pid": os.getppid(), "since": 0}))
    assert jobfolder.open_job(tmp_path / "old", config)[0] == tmp_path / "old"
    # its process gone, the claim is stale: the folder is taken over (a killed job resumes in its folder)
    folder, done = jobfolder.open_job(tmp_path / "job", config)
    assert folder == tmp_path / "job" and done is None


def test_fingerprints_follow_content_in_files_and_folders(tmp_path):
    weights = tmp_path / "model" / "unet"
    weights.mkdir(parents=True)
    (weights / "w.safetensors").write_bytes(b"\0" * 100)
    before = jobfolder.fingerprints({"model": {"source": str(tmp_path / "model")}})
    (weights / "w.safetensors").write_bytes(b"\0" * 99 + b"\1")
    after = jobfolder.fingerprints({"model": {"source": str(tmp_path / "model")}})
    assert set(before) == {"model.source"} and before != after
    assert jobfolder.fingerprints({"model": {"source": "CompVis/stable-diffusion-v1-4"}}) == {}


# ----------------------------------------------------------------------------------- through the runners

def _main(monkeypatch, argv):
    from runners import detect

    calls = []

    def fake_run(cfg, folder, device=None):  # the job's contract, without sampling
        calls.append(folder)
        config = OmegaConf.to_container(cfg, resolve=True)
        jobfolder.write_results(folder, "detect", config, dict(config["sampler"]), cfg.sampler.n_images,
                                {"headline": float(len(calls))})
        return float(len(calls))

    monkeypatch.setattr(detect, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["detect", *argv])
    GlobalHydra.instance().clear()
    try:
        detect.main()
    finally:
        GlobalHydra.instance().clear()
    return calls


def _data_dir(root, first_prompt):
    folder = root / "prompts" / "MemAttn"
    folder.mkdir(parents=True)
    (folder / "sd1_mem345.txt").write_text(f"{first_prompt}\nsecond prompt\n")
    return root


def test_a_sweep_rerun_on_other_data_does_not_reuse_the_first_results(tmp_path, monkeypatch):
    """The issue's case: BE_BENCH_DATA pointed at another file of the same set name; the rerun sweep skipped."""
    grid = ["-m", "model=tiny", "prompts=ren_mem345", "score.T=[1,5]", "sampler.n_images=1,2",
            f"paths.root={tmp_path}"]
    monkeypatch.setenv("BE_BENCH_DATA", str(_data_dir(tmp_path / "data1", "first")))
    assert len(_main(monkeypatch, grid)) == 2
    assert _main(monkeypatch, grid) == []  # same inputs: both jobs reused
    monkeypatch.setenv("BE_BENCH_DATA", str(_data_dir(tmp_path / "data2", "other")))
    rerun = _main(monkeypatch, grid)
    assert len(rerun) == 2 and all(folder.name.endswith("-2") for folder in rerun)
    for folder in rerun:  # the first results are still there, and each folder says which data it read
        first = jobfolder.read_job(folder.with_name(folder.name.removesuffix("-2")))
        assert first.config["prompts"]["path"].startswith(str(tmp_path / "data1"))
        assert jobfolder.read_job(folder).config["prompts"]["path"].startswith(str(tmp_path / "data2"))
    assert _main(monkeypatch, grid) == []  # and the second sweep is reused in turn


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    """Single runs are named by the second they start; a second run there with other settings must not share it."""
    same = f"hydra.run.dir={tmp_path}/outputs/detect/tiny/tiny/2026-01-01_00-00-00"
    first = _main(monkeypatch, ["debug=default", f"paths.root={tmp_path}", same])
    second = _main(monkeypatch, ["debug=default", f"paths.root={tmp_path}", same, "score.n_boot=10"])
    assert len(first) == len(second) == 1 and first[0] != second[0]
    assert jobfolder.read_job(first[0]).config["score"]["n_boot"] == 0
    assert jobfolder.read_job(second[0]).config["score"]["n_boot"] == 10
    assert _main(monkeypatch, ["debug=default", f"paths.root={tmp_path}", same]) == []  # the first, reused


# ------------------------------------------------------------------------------------------ store keys

def test_mitigated_generations_are_keyed_by_their_mask_layers(tmp_path):
    """The issue's case: mask_layers=all, then mask_layers=down (method be) resampled nothing."""
    from hydra import compose, initialize_config_dir

    from runners.common import CONF
    from runners.mitigate import run

    def job(name, layers):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("mitigate", overrides=["debug=default", f"paths.root={tmp_path}", "mitigation.methods=[be]",
                                                 "mitigation.target_losses=[0.1]", "mitigation.max_iters=1",
                                                 "sampler.steps=2", "mitigation.kinds=[global]",
                                                 "headline.method=be", f"mitigation.mask_layers={layers}"])
        run(cfg, tmp_path / name)
        return json.loads((tmp_path / name / "metrics.json").read_text())["sampled_now"]

    assert job("all", "all") == 2  # 1 memorized prompt: baseline and mitigated
    assert job("down", "down") == 1  # another mask: mitigated again, the baseline reused
    assert job("all-again", "all") == 0
    # wen ignores the mask: its key does not depend on it
    from benchmark.mitigation.embedding import MitigationSettings
    from benchmark.mitigation.tradeoff import mitigated_key
    from benchmark.store.traces import TraceKey

    key = TraceKey("m", "s", "p", "0", "text")
    wen = MitigationSettings("wen", 0.1)
    assert mitigated_key(key, wen, ["a"]) == mitigated_key(key, wen, ["b"])
    be = MitigationSettings("be", 0.1)
    assert mitigated_key(key, be, ["a", "b"]) == mitigated_key(key, be, ["b", "a"]) != mitigated_key(key, be, ["a"])


@pytest.mark.parametrize("setting", ["steps", "guidance", "height", "width", "eta"])
def test_every_sampler_setting_is_in_the_trace_key(setting):
    from dataclasses import replace

    from benchmark.detectors.detection import sampler_key
    from benchmark.sampling.capture import SamplerSettings

    base = SamplerSettings(steps=5, guidance=7.5, height=32, width=32, eta=0.0)
    changed = replace(base, **{setting: getattr(base, setting) * 2 + 1})
    assert sampler_key(base, "float32") != sampler_key(changed, "float32")
    assert sampler_key(base, "float32") != sampler_key(base, "float16")
