"""Sweeps: in-process multirun, kill -9 and resume, submitit's local executor, device per job, W&B offline."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from benchmark.core.devices import pick_device
from runners.callbacks import sweep_status

ROOT = Path(__file__).resolve().parents[1]
GRID = ["debug=default", "sampler.steps=5,6", "sampler.n_images=1,2"]


def sweep_cmd(root, *extra):
    return [sys.executable, "-m", "runners.detect", "-m", *GRID, f"paths.root={root}", *extra]


def job_metrics(root):
    out = {}
    for path in sorted((Path(root) / "outputs/multirun/detect/default").glob("*/metrics.json")):
        result = json.loads(path.read_text())
        out[path.parent.name] = result["metrics"]
    return out


def test_in_process_multirun_2x2(tmp_path, monkeypatch):
    from runners import detect

    monkeypatch.setattr(sys, "argv", ["detect", "-m", *GRID, f"paths.root={tmp_path}"])
    GlobalHydra.instance().clear()
    try:
        detect.main()
    finally:
        GlobalHydra.instance().clear()
    sweep = tmp_path / "outputs/multirun/detect/default"
    status = sweep_status(sweep)
    assert len(status["done"]) == 4 and not status["failed"]
    for job in status["done"]:  # what the aggregator reads
        for name in ("metrics.json", "generations.csv", ".hydra/config.yaml", "report.md"):
            assert (sweep / job / name).exists(), (job, name)
    assert json.loads((sweep / "sweep_summary.json").read_text())["done"] == status["done"]


def run_main(main, monkeypatch, *args):
    """A runner's Hydra main in this process, as ``python -m`` runs it with ``args``."""
    monkeypatch.setattr(sys, "argv", ["runner", *args])
    GlobalHydra.instance().clear()
    try:
        main()
    finally:
        GlobalHydra.instance().clear()


def test_chdir_jobs_share_the_launch_directory_store(tmp_path, monkeypatch, capsys):
    from runners import detect

    monkeypatch.delenv("BE_BENCH_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # paths.root is the default '.': the launch directory
    for run in ("a", "b"):
        run_main(detect.main, monkeypatch, "hydra.job.chdir=true", "debug=default", f"hydra.run.dir=outputs/{run}")
    first, second = capsys.readouterr().out.split("detect: ")[1:]  # each job's summary starts with its task
    assert "(8 sampled now)" in first and f"folder: {tmp_path}/outputs/a " in first  # the first run sampled
    assert "(0 sampled now)" in second and f"folder: {tmp_path}/outputs/b " in second  # the second reused its store
    traces = list(tmp_path.rglob("*.safetensors"))
    assert traces and all(p.is_relative_to(tmp_path / "artifacts/traces") for p in traces)
    assert json.loads((tmp_path / "outputs/b/metrics.json").read_text())["sampled_now"] == 0


def test_a_path_valued_sweep_keeps_its_jobs_inside_the_sweep_folder(tmp_path, monkeypatch, capsys):
    from runners import detect

    (tmp_path / "ids.txt").write_text("m0\nm1\nn0\n")
    (tmp_path / "a/b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a/b")
    run_main(detect.main, monkeypatch, "-m", "debug=default", "prompts.select_ids=../../ids.txt", "sampler.steps=5,6",
             f"paths.root={tmp_path}")
    sweep = tmp_path / "outputs/multirun/detect/default"
    jobs = sorted(p.parent for p in tmp_path.rglob("metrics.json"))
    assert [p.parent for p in jobs] == [sweep, sweep]  # each job one folder right inside the sweep folder
    assert jobs[0].name == "debug=default,prompts.select_ids=..%2F..%2Fids.txt,sampler.steps=5"
    assert "2 jobs finished, 0 failed" in capsys.readouterr().out


def test_the_summary_lists_this_multiruns_jobs_only(tmp_path, monkeypatch, capsys):
    from runners import detect

    sweep = tmp_path / "outputs/multirun/detect/default"
    grids = {"failing": ["score.T=[1,9]"], "ok": ["sampler.n_images=1,2"]}
    for name in ("failing", "ok", "ok"):  # the second "ok" reuses both finished jobs: they are its jobs too
        capsys.readouterr()
        run_main(detect.main, monkeypatch, "-m", "debug=default", *grids[name], f"paths.root={tmp_path}")
        out = capsys.readouterr().out
        summary = json.loads((sweep / "sweep_summary.json").read_text())
        if name == "failing":
            line = "ConfigError: score.T=[1, 9]: windows [9] are not within 1..sampler.steps=5"
            assert summary == {"done": [], "failed": [["debug=default,score.T=[1,9]", line]]}
        else:
            assert summary == {"done": ["debug=default,sampler.n_images=1", "debug=default,sampler.n_images=2"],
                               "failed": []}
            assert "2 jobs finished, 0 failed" in out and "FAILED" not in out
    assert out.count("finished already with the same inputs, skipped") == 2
    assert len(sweep_status(sweep)["done"]) == 2 and len(sweep_status(sweep)["failed"]) == 1  # all folders


def test_job_folder_names():
    from benchmark.store.job_folder import MAX_NAME_BYTES, folder_name

    simple = "debug=default,sampler.steps=5,score.T=[1,9],model=tiny"
    assert folder_name(simple) == simple  # the names sweeps have always had
    assert folder_name("ids=../x/y.txt") == "ids=..%2Fx%2Fy.txt" and folder_name("..") == "%2E%2E"
    assert folder_name("a=%2F") != folder_name("a=/")  # distinct texts, distinct names
    long = [folder_name("ids=" + "x" * 300 + tail) for tail in "ab"]
    assert long[0] != long[1] and all(len(n.encode()) <= MAX_NAME_BYTES for n in long)
    assert folder_name("") == ""


def test_kill_and_resume_equals_a_clean_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = subprocess.run(sweep_cmd(tmp_path / "clean"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed_root = tmp_path / "killed"
    proc = subprocess.Popen(sweep_cmd(killed_root), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    store = killed_root / "artifacts/traces"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(store.rglob("*.safetensors"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*.safetensors")}
    assert 5 <= len(before) < 12  # killed mid-way: 4 + 8 + 4 + 8 = 24 traces in all, some not yet there
    rerun = subprocess.run(sweep_cmd(killed_root), cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing finished was sampled again
    assert not list(killed_root.rglob("*.tmp"))
    assert job_metrics(killed_root) == job_metrics(tmp_path / "clean") and len(job_metrics(killed_root)) == 4
    again = subprocess.run(sweep_cmd(killed_root), cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.stdout.count("finished already with the same inputs, skipped") == 4


def test_submitit_local_executor_runs_the_sweep(tmp_path):
    cmd = [sys.executable, "-m", "runners.detect", "-m", "debug=default", "sampler.n_images=1,2",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", f"paths.root={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    status = sweep_status(tmp_path / "outputs/multirun/detect/default")
    assert len(status["done"]) == 2 and not status["failed"]
    assert list((tmp_path / "outputs/multirun/detect/default/.submitit").glob("*/*_result.pkl"))


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("detect", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.max_num_timeout == 3 and launcher.array_parallelism == 32
    assert launcher.additional_parameters.requeue is True


@pytest.mark.parametrize("requested, job, gpus, expected", [
    ("auto", 0, 4, "cuda:0"), ("auto", 5, 4, "cuda:1"), ("auto", 3, 0, "cpu"), ("auto", 7, 1, "cuda:0"),
    ("cuda:2", 5, 4, "cuda:2"), ("cpu", 1, 8, "cpu"),
])
def test_one_gpu_per_job(requested, job, gpus, expected):
    assert pick_device(requested, job, gpus) == expected


def test_wandb_offline_run_holds_the_jobs_metrics(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "runners.detect", "debug=default", "logger=wandb", f"paths.root={tmp_path}",
           f"hydra.run.dir={tmp_path}/job"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "job/metrics.json").read_text())
    runs = list((tmp_path / "job").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    summary = offline_summary(runs[0])
    assert summary["headline"] == pytest.approx(result["headline"])
    assert summary["n_generations"] == result["n_generations"]
    assert summary["metrics/_type"] == "table-file"  # the metrics table
    assert summary["generations/_type"] == "table-file"  # the per-generation table
    attached = runs[0].parent / "files" / "metrics.json"  # the job file the report can fetch back
    assert json.loads(attached.read_text()) == result


def test_wandb_failure_only_warns(tmp_path, monkeypatch):
    from benchmark.store.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: an outage
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    with pytest.warns(UserWarning, match="W&B disabled"):
        tracker = Tracker(True, "be-bench", {}, tmp_path, mode="online")
    tracker.log({"a": 1.0})
    tracker.finish()


def offline_summary(path: Path) -> dict:
    """The summary of an offline W&B run, read from its .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte
    record headers: crc32, length, type) of protobuf records, after a 7-byte file header. wandb >= 0.2x has no
    Python reader of its own any more."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, summary = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary
