"""The leaderboard from real (tiny) job folders: values match the jobs, Markdown/CSV are reproducible, the page opens."""
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from benchmark.testbed.train import train
from reports.leaderboard import collect, write_report
from runners.ddpm import run as run_ddpm
from runners.detect import run
from runners.mitigate import run as run_mitigation


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, compose_at, tiny_testbed_spec):
    root = tmp_path_factory.mktemp("sweep")
    for steps in (5, 6):
        folder = root / "outputs" / f"steps={steps}"
        run(compose_at(root, "detect", "debug=default", f"sampler.steps={steps}"), folder)
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "config.yaml").write_text(f"sampler:\n  steps: {steps}\n  n_images: 2\n")
    # a mitigation job on a testbed trained in seconds (it has ground truth and captions)
    testbed = train(tiny_testbed_spec, root / "testbed", progress=False)
    run_mitigation(compose_at(root, "mitigate", f"model.source={testbed}", "model.build=null", "sampler.steps=4",
                              "mitigation.n_images=1", "mitigation.target_losses=[0.1,1]"),
                   root / "outputs" / "mitigation")
    ddpm = compose_at(root, "ddpm", "ddpm_model=tiny", "sampler.n_images=4", "sampler.steps=3")
    run_ddpm(ddpm, root / "outputs" / "ddpm")
    return root / "outputs"


def test_tables_hold_the_jobs_values(jobs, tmp_path):
    files = write_report([jobs], tmp_path)
    board = pd.read_csv(files["leaderboard.csv"])
    for job in ("steps=5", "steps=6"):
        metrics = pd.DataFrame(json.loads((jobs / job / "metrics.json").read_text())["metrics"])
        expected = metrics[(metrics.level == "prompt") & (metrics.subset == "all") & (metrics.detector == "D")
                           & (metrics["T"] == 5)].auc.iloc[0]
        steps = int(job.split("=")[1])
        got = board[(board.steps == steps) & (board.method == "Wen (D)") & (board["T"] == 5)].auc.iloc[0]
        assert got == pytest.approx(expected, abs=1e-4)
    t1 = pd.read_csv(files["table1.csv"])
    assert t1.source.str.startswith("published").sum() == 12  # the paper's rows, marked as quoted
    assert t1.source.str.startswith("ours").sum() == 2 * 2 * 2 * 2  # 2 jobs x {D, LD} x {global, local} x T
    assert "\\begin{tabular}" in files["table1.tex"].read_text()
    assert files["leaderboard.html"].read_text().count("data:image/png;base64,") == 4 + 1 + 1  # + trade-off, DDPM
    points = pd.read_csv(files["mitigation.csv"])
    curves = pd.DataFrame(json.loads((jobs / "mitigation" / "metrics.json").read_text())["curves"])
    assert len(points) == len(curves) == 2 * (1 + 2 * 2)  # kinds x (baseline + methods x targets)
    pd.testing.assert_series_equal(points.train_rmse, curves.train_rmse, check_exact=False)
    assert pd.read_csv(files["table2.csv"]).source.str.startswith("published").sum() == 3
    ddpm = pd.read_csv(files["ddpm.csv"])
    job = json.loads((jobs / "ddpm" / "metrics.json").read_text())
    assert len(ddpm) == 1 and ddpm.n_train[0] == 20 and ddpm.copy_rate[0] == pytest.approx(job["copy_rate"])


def test_markdown_and_csv_are_byte_identical_on_rerun(jobs, tmp_path):
    a, b = write_report([jobs], tmp_path / "a"), write_report([jobs], tmp_path / "b")
    for name in ("leaderboard.md", "leaderboard.csv", "table1.md", "table1.csv", "table2.csv", "mitigation.csv",
                 "intensity.csv", "localization.csv", "ddpm.csv"):
        assert a[name].read_bytes() == b[name].read_bytes(), name


def test_report_from_wandb_runs_equals_the_report_from_folders(jobs, tmp_path):
    from types import SimpleNamespace

    from reports.leaderboard import fetch_wandb

    class FakeRun:  # what wandb.Api().runs() yields: id, config, files(), file(name).download(root, replace)
        def __init__(self, folder):
            self.id, self.config, self.folder = folder.name, {"sampler": {"steps": 5, "n_images": 2}}, folder

        def files(self):
            return [SimpleNamespace(name=p.name) for p in self.folder.iterdir() if p.is_file()]

        def file(self, name):
            def download(root, replace):
                Path(root).mkdir(parents=True, exist_ok=True)
                shutil.copy(self.folder / name, Path(root) / name)
            return SimpleNamespace(download=download)

    api = SimpleNamespace(runs=lambda project: [FakeRun(jobs / "steps=5")])
    fetched = fetch_wandb("me/be-bench", tmp_path / "w", api=api)
    from_wandb = pd.read_csv(write_report([fetched], tmp_path / "a")["leaderboard.csv"])
    direct = pd.read_csv(write_report([jobs / "steps=5"], tmp_path / "b")["leaderboard.csv"])
    pd.testing.assert_frame_equal(from_wandb, direct)


def test_no_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished job"):
        collect([tmp_path])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_html_page_opens_in_headless_chromium_without_errors(jobs, tmp_path):
    page = write_report([jobs], tmp_path)["leaderboard.html"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    done = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,900",
                           "--enable-logging=stderr", "--v=0", page.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    assert "Uncaught" not in done.stderr and "CONSOLE" not in done.stderr.replace("CONSOLE(0)", "")
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5  # not blank
