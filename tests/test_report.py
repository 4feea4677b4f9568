"""The report from real (tiny) job folders: values match the jobs, the first screen names the headline numbers,
one row per configuration, no empty section, LaTeX compiles, Markdown/CSV are reproducible, the page works in
Chromium (sort, filter, no console error)."""
import copy
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.testbed.train import train
from reports.headline import detection_findings
from reports.jobs import finished_jobs
from reports.labels import detector_label, grid_detectors
from reports.latex import escape
from reports.leaderboard import collect, write_report
from reports.tables import fmt, fmt_ci
from runners.ddpm import run as run_ddpm
from runners.detect import run
from runners.mitigate import run as run_mitigation


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, compose_at, tiny_testbed_spec):
    root = tmp_path_factory.mktemp("sweep")
    for steps in (5, 6):
        run(compose_at(root, "detect", "debug=default", f"sampler.steps={steps}"), root / "outputs" / f"steps={steps}")
    # a mitigation job on a testbed trained in seconds (it has ground truth and captions)
    testbed = train(tiny_testbed_spec, root / "testbed", progress=False)
    run_mitigation(compose_at(root, "mitigate", f"model.source={testbed}", "model.build=null",
                              "sampler.steps=4", "mitigation.n_images=1", "mitigation.target_losses=[0.1,1]"),
                   root / "outputs" / "mitigation")
    run_ddpm(compose_at(root, "ddpm", "ddpm_model=tiny", "sampler.n_images=4", "sampler.steps=3"),
             root / "outputs" / "ddpm")
    return root / "outputs"


def _metrics(folder: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((folder / "metrics.json").read_text())["metrics"]).fillna({"layers": ""})


def test_tables_hold_the_jobs_values(jobs, tmp_path):
    files = write_report([jobs], tmp_path)
    board = pd.read_csv(files["leaderboard.csv"], keep_default_na=False, na_values=[""])
    for job in ("steps=5", "steps=6"):
        metrics = _metrics(jobs / job)
        steps = int(job.split("=")[1])
        for _, m in metrics.iterrows():  # every metric row of the job is a leaderboard row with the same values
            got = board[(board.steps == steps) & (board.level == m.level) & (board.subset == m.subset)
                        & (board.detector == m.detector) & (board.layers.fillna("") == m.layers)
                        & (board["T"] == m["T"])]
            assert len(got) == 1 and got.auc.iloc[0] == pytest.approx(m.auc, abs=1e-4)
    t1 = pd.read_csv(files["table1.csv"])
    ours = t1[t1.ours.notna()]
    assert len(ours) == 2 * 2 * 2 * 2 * 3  # 2 jobs x {D, LD} x {global, local} x T x {AUC, F1, TPR}
    for row in ours.itertuples():
        metrics = _metrics(jobs / f"steps={5 if '5 steps' in row.job else 6}")
        m = metrics[(metrics.level == "prompt") & (metrics.detector == row.detector) & (metrics.layers == (
            "" if row.detector == "D" else "all")) & (metrics.subset == row.memorization_type)
                    & (metrics["T"] == row.T)]
        assert row.ours == pytest.approx(m[row.metric].iloc[0], abs=1e-4)
    # the paper's 36 cells beside each job's, and the difference is ours - paper where both exist
    assert t1.published.notna().sum() == 2 * 36
    both = t1.dropna(subset=["ours", "published"])
    assert len(both) == 2 * 2 * 2 * 3  # T=1 only: the tiny jobs' T are 1 and 5, the paper's 1, 10 and 50
    assert (both.difference - (both.ours - both.published)).abs().max() < 1e-3
    page = files["leaderboard.html"].read_text()
    # 2 x (by-T plot, ROC, a heat map per layer x T detector) + intensity boxes + trade-off + DDPM copies (no
    # ground-truth masks: no gallery)
    heat_maps = len(grid_detectors(_metrics(jobs / "steps=5").detector.unique()))
    assert heat_maps >= 1 and page.count("data:image/png;base64,") == 2 * (2 + heat_maps) + 1 + 1 + 1
    points = pd.read_csv(files["mitigation.csv"])
    curves = pd.DataFrame(json.loads((jobs / "mitigation" / "metrics.json").read_text())["curves"])
    assert len(points) == len(curves) == 2 * (1 + 2 * 2)  # kinds x (baseline + methods x targets)
    pd.testing.assert_series_equal(points.train_rmse, curves.train_rmse, check_exact=False)
    ddpm = pd.read_csv(files["ddpm.csv"])
    job = json.loads((jobs / "ddpm" / "metrics.json").read_text())
    assert len(ddpm) == 1 and ddpm.n_train[0] == 20 and ddpm.copy_rate[0] == pytest.approx(job["copy_rate"])


def _first_screen(page: str) -> str:
    return re.search(r"<section id='answer'>(.*?)</section>", page, re.DOTALL).group(1)


def test_first_screen_names_the_headline_numbers(jobs, tmp_path):
    page = write_report([jobs], tmp_path)["leaderboard.html"].read_text()
    answer = _first_screen(page)
    assert page.index("id='answer'") < page.index("id='table1'") < page.index("id='leaderboard'")
    metrics = _metrics(jobs / "steps=6")
    prompt = metrics[(metrics.level == "prompt") & (metrics["T"] == 1)]
    for kind in ("local", "global"):
        d = prompt[(prompt.detector == "D") & (prompt.subset == kind)].iloc[0]
        # LD on the configured headline layer set (the tiny preset's: all), not the best of the job's sets
        ld = prompt[(prompt.detector == "LD") & (prompt.subset == kind) & (prompt.layers == "all")].iloc[0]
        assert f"On {kind} memorization at T=1, {detector_label('LD')} [all, the headline layer set]" in answer
        assert fmt_ci(d.auc, d.get("auc_lo"), d.get("auc_hi")) in answer
        assert fmt_ci(ld.auc, ld.get("auc_lo"), ld.get("auc_hi")) in answer
        assert f"{ld.auc - d.auc:+.3f}" in answer
        published = {"local": (0.918, 0.943), "global": (0.979, 0.981)}[kind]  # Chen et al. Table 1, T=1
        assert f"{detector_label('LD')} {fmt(published[1])} vs {detector_label('D')} {fmt(published[0])}" in answer
    local = prompt[prompt.subset == "local"]
    glob = prompt[prompt.subset == "global"]
    gap_d = glob[glob.detector == "D"].auc.iloc[0] - local[local.detector == "D"].auc.iloc[0]
    assert f"local-global AUC gap from {gap_d:.3f}" in answer
    assert "from 0.061 to 0.038" in answer  # the paper's: 0.979 - 0.918 and 0.981 - 0.943
    # the job is named by its short label and linked to its folder, never by an override string
    assert "tiny · tiny (4 prompts) · 6 steps · n=2/prompt" in answer.replace("&#x27;", "'")
    assert "sampler.steps=" not in answer
    assert "mitigate: " in answer  # the mitigation job's finding has its own label


def test_headline_reads_the_configured_layer_set_and_labels_the_best_as_selected(jobs):
    job = copy.deepcopy(next(j for j in finished_jobs([jobs]) if j.folder.name == "steps=6"))
    job.config["score"]["headline"]["layers"] = "down"
    for row in job.result.metrics:  # make another set the best on the evaluation data
        if row["detector"] == "LD" and row["layers"] == "up" and row["T"] == 1 and row["level"] == "prompt":
            row |= {"auc": 0.999, "auc_lo": 0.99, "auc_hi": 1.0}
    metrics = _metrics(job.folder)
    for finding in detection_findings(job)[:2]:
        kind = "local" if "local memorization" in finding.sentence else "global"
        down = metrics[(metrics.detector == "LD") & (metrics.layers == "down") & (metrics["T"] == 1)
                       & (metrics.level == "prompt") & (metrics.subset == kind)].iloc[0]
        assert f"{detector_label('LD')} [down, the headline layer set]" in finding.sentence
        assert fmt_ci(down.auc, down.get("auc_lo"), down.get("auc_hi")) in finding.sentence
        assert finding.values[f"{kind}_LD_auc"] == down.auc and finding.values[f"{kind}_LD_best_auc"] == 0.999
        assert "the best of 4 layer sets, selected on the evaluation data: " \
               f"{detector_label('LD')} [up] 0.999" in finding.sentence
        assert any("selected on the evaluation data" in r["figure"] for r in finding.rows)
    job.result.metrics = [r for r in job.result.metrics if r["layers"] != "down"]
    assert detection_findings(job) == []  # no row on the configured set: no detection headline, never another set


@pytest.mark.parametrize("overrides, layers", [([], "all"), (["debug=default"], "all"), (["layers=sd"], "be_paper"),
                                               (["model=sd-v1-4"], "be_paper"), (["layers=sd_each"], "be_paper"),
                                               (["layers=sd", "score.headline.layers=res64"], "res64")])
def test_headline_layer_set_follows_the_layer_preset(compose, overrides, layers):
    assert compose("detect", *overrides).score.headline.layers == layers


def test_one_row_per_configuration_latest_run_wins(jobs, tmp_path):
    root = tmp_path / "outputs"
    shutil.copytree(jobs / "steps=5", root / "first")
    shutil.copytree(jobs / "steps=5", root / "second")  # `make run` twice: the same configuration again
    metrics = json.loads((root / "second" / "metrics.json").read_text())
    for row in metrics["metrics"]:
        row["auc"] = 0.123456  # so the two runs can be told apart
    (root / "second" / "metrics.json").write_text(json.dumps(metrics))
    later = time.time() + 10
    os.utime(root / "second" / "metrics.json", (later, later))
    files = write_report([root], tmp_path / "report")
    board = pd.read_csv(files["leaderboard.csv"])
    assert len(board) == len(metrics["metrics"]) and (board.auc == 0.1235).all()
    t1 = pd.read_csv(files["table1.csv"])
    assert t1.job.nunique() == 1 and not t1.duplicated(["detector", "memorization_type", "T", "metric"]).any()
    listed = pd.read_csv(files["jobs.csv"], keep_default_na=False)
    assert list(listed.status) == ["reported", "superseded"]  # the earlier run: listed, not reported
    assert listed.folder[0].endswith("second") and listed.folder[1].endswith("first")
    assert listed["replaced by"][1] == listed.job[0]
    # the same for mitigation: two runs of one configuration give one set of curves
    for name in ("mitigation-a", "mitigation-b"):
        shutil.copytree(jobs / "mitigation", root / name)
        (root / name / ".hydra").mkdir()
        (root / name / ".hydra" / "config.yaml").write_text("task: mitigate\nmitigation:\n  n_images: 1\n")
    points = pd.read_csv(write_report([root], tmp_path / "report2")["mitigation.csv"])
    assert points.job.nunique() == 1 and not points.duplicated(["kind", "method", "target_loss"]).any()


def test_failed_unfinished_and_superseded_jobs_are_counted_and_listed(jobs, tmp_path):
    sweep = tmp_path / "outputs/sweep"
    shutil.copytree(jobs / "steps=5", sweep / "a")
    shutil.copytree(jobs / "steps=6", sweep / "a-2")  # run into a-2 later, with other inputs: a is out of date
    later = time.time() + 10
    os.utime(sweep / "a-2" / "metrics.json", (later, later))
    (sweep / "a-2/wandb/run/files").mkdir(parents=True)  # a copy inside a job folder is not a job
    shutil.copy(jobs / "steps=5/metrics.json", sweep / "a-2/wandb/run/files/metrics.json")
    for name, source in (("failed", "steps=5"), ("killed", "steps=6")):
        (sweep / name).mkdir()
        shutil.copy(jobs / source / "config.yaml", sweep / name / "config.yaml")
    (sweep / "failed/error.txt").write_text("ValueError: step window T=9 outside 1..5\n\nTraceback ...\n")
    files = write_report([tmp_path / "outputs"], tmp_path / "report")
    listed = pd.read_csv(files["jobs.csv"], keep_default_na=False)
    label = listed.job[0]
    assert listed[["status", "error", "replaced by"]].values.tolist() == [
        ["reported", "", ""], ["failed", "ValueError: step window T=9 outside 1..5", ""],
        ["unfinished", "", label], ["superseded", "", label]]  # killed: a run of a-2's configuration
    assert [Path(f).name for f in listed.folder] == ["a-2", "failed", "killed", "a"]
    assert "6 steps" in label and pd.read_csv(files["leaderboard.csv"]).job.nunique() == 1
    lede = "not reported: 1 failed, 1 unfinished, 1 superseded job folder(s), listed in Jobs"
    for name in ("report.md", "leaderboard.html"):
        text = files[name].read_text()
        assert lede in text and "ValueError: step window T=9 outside 1..5" in text
    assert "| failed " in files["jobs.md"].read_text()
    page = files["leaderboard.html"].read_text()
    assert page.count("<tr class='failed'>") == 1 and page.count("<tr class='unfinished'>") == 1
    # no finished job at all: the error counts what there is
    shutil.rmtree(sweep / "a"), shutil.rmtree(sweep / "a-2")
    with pytest.raises(ValueError, match=r"no finished job \(metrics.json\) under .* \(1 failed, 1 unfinished\)"):
        write_report([tmp_path / "outputs"], tmp_path / "report")


def test_empty_sections_are_left_out(jobs, tmp_path):
    files = write_report([jobs / "steps=5"], tmp_path)
    page = files["leaderboard.html"].read_text()
    for title in ("Unconditional DDPMs", "Mitigation trade-off", "Table 2", "Localization"):
        assert title not in page and title not in files["report.md"].read_text()
    assert "ddpm.csv" not in files and not (tmp_path / "ddpm.csv").exists()
    write_report([jobs], tmp_path)  # a later report with a DDPM job writes it; a report without removes it again
    assert (tmp_path / "ddpm.csv").exists()
    write_report([jobs / "steps=5"], tmp_path)
    assert not (tmp_path / "ddpm.csv").exists()


def test_an_unknown_detector_appears_with_its_raw_name(jobs, tmp_path):
    folder = tmp_path / "outputs" / "new-detector"
    shutil.copytree(jobs / "steps=5", folder)
    result = json.loads((folder / "metrics.json").read_text())
    extra = [dict(r, detector="Zeta_new") for r in result["metrics"] if r["detector"] == "LD"]
    result["metrics"] += extra
    (folder / "metrics.json").write_text(json.dumps(result))
    gens = pd.read_csv(folder / "generations.csv", keep_default_na=False)
    pd.concat([gens, gens[gens.detector == "LD"].assign(detector="Zeta_new")]).to_csv(
        folder / "generations.csv", index=False)
    files = write_report([folder], tmp_path / "report")
    board = pd.read_csv(files["leaderboard.csv"])
    assert (board[board.detector == "Zeta_new"].method == "Zeta_new").all() and len(extra) > 0
    assert "Zeta_new" in files["leaderboard.html"].read_text()
    assert detector_label("Zeta_new") == "Zeta_new" and detector_label("LD") != "LD"


def test_markdown_and_csv_are_byte_identical_on_rerun(jobs, tmp_path):
    a, b = write_report([jobs], tmp_path / "a"), write_report([jobs], tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        if name.endswith((".md", ".csv", ".tex")):
            assert a[name].read_bytes() == b[name].read_bytes(), name


def test_latex_is_escaped():
    assert escape("tpr_at_1pct_fpr >=0.50 ren_mem345 5% & #1 · x") == \
        r"tpr\_at\_1pct\_fpr $\geq$0.50 ren\_mem345 5\% \& \#1, x"
    assert escape(">-50 a|b {c} ~ ^ \\") == r"$>$-50 a\textbar{}b \{c\} \textasciitilde{} \textasciicircum{} " \
                                              r"\textbackslash{}"


PDFLATEX = shutil.which("pdflatex")


@pytest.mark.skipif(PDFLATEX is None, reason="needs pdflatex (apt-get install texlive-latex-base "
                                             "texlive-latex-recommended)")
def test_latex_tables_compile(jobs, tmp_path):
    files = write_report([jobs], tmp_path)
    for name in ("table1.tex", "table2.tex"):
        if name not in files:
            continue
        doc = tmp_path / f"doc-{name}"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[margin=5mm,landscape]{geometry}"
                       "\\begin{document}\\tiny\n" + files[name].read_text() + "\\end{document}\n")
        done = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", doc.name], check=False,
                              cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:]
        assert (tmp_path / f"doc-{name}".replace(".tex", ".pdf")).exists()


def test_no_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished job"):
        collect([tmp_path])


def test_jobs_get_short_distinct_labels(jobs):
    labels = [j.label for j in finished_jobs([jobs])]
    assert len(set(labels)) == len(labels)
    assert all("=" not in label.split(" · ")[0] for label in labels)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page:
    """A Chromium tab driven through the DevTools protocol (websocket-client): console messages and uncaught
    exceptions are collected from before the page loads."""

    def __init__(self, chromium: str, profile: Path):
        import websocket

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--window-size=1400,1000", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        active = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (active.exists() and len(active.read_text().split()) == 2):
            assert time.time() < deadline and self.process.poll() is None, "chromium did not start"
            time.sleep(0.2)
        port = active.read_text().split()[0]
        import urllib.request

        deadline = time.time() + 30
        while True:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
            pages = [t for t in targets if t["type"] == "page"]
            if pages or time.time() > deadline:
                break
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.next_id, self.events = 0, []
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("method") == method for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise AssertionError(f"no {method} within {timeout} s")

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def problems(self) -> list:
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "warning"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]

    def close(self):
        self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium_sorts_filters_and_shows_the_answer_first(jobs, tmp_path):
    pytest.importorskip("websocket", reason="needs websocket-client (pip install websocket-client)")
    page_file = write_report([jobs], tmp_path / "report")["leaderboard.html"]
    page = _Page(CHROMIUM, tmp_path / "profile")
    try:
        page.call("Page.navigate", url=page_file.as_uri())
        page.wait_for("Page.loadEventFired")
        # first screen: the answer, with the headline numbers of the jobs (as the HTML test above checks them)
        screen = page.js("document.getElementById('answer').innerText")
        metrics = _metrics(jobs / "steps=6")
        d = metrics[(metrics.level == "prompt") & (metrics["T"] == 1) & (metrics.detector == "D")
                    & (metrics.subset == "local")].iloc[0]
        assert "On local memorization at T=1" in screen and fmt_ci(d.auc, d.get("auc_lo"), d.get("auc_hi")) in screen
        top = page.js("document.getElementById('answer').getBoundingClientRect().top")
        assert top < 300  # visible without scrolling
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        import base64

        artifact = Path(os.environ.get("REPORT_SCREENSHOT_DIR", tmp_path)) / "first_screen.png"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(base64.b64decode(shot))
        # the leaderboard: default = prompt level, grouped by job
        board = pd.read_csv(page_file.parent / "leaderboard.csv")
        n_prompt = int((board.level == "prompt").sum())
        rows = "document.querySelectorAll('#lb-table tbody tr.row')"
        assert page.js(f"{rows}.length") == n_prompt
        assert page.js("document.querySelectorAll('#lb-table tbody tr.group').length") == board.job.nunique()
        # filter through the controls: subset = local, detector = D
        for name, value in (("subset", "local"), ("method", detector_label("D"))):
            page.js(f"const s{name} = document.getElementById('lb-filter-{name}'); s{name}.value = "
                    f"{json.dumps(value)}; s{name}.dispatchEvent(new Event('change'))")
        expected = board[(board.level == "prompt") & (board.subset == "local") & (board.detector == "D")]
        assert page.js(f"{rows}.length") == len(expected) > 0
        # sort through the header: no grouping, click AUC (descending first), then again (ascending)
        page.js("const g = document.getElementById('lb-group'); g.value = ''; g.dispatchEvent(new Event('change'))")
        column = page.js("[...document.querySelectorAll('#lb-table th')].map(t => t.dataset.col).indexOf('auc')")
        read = f"[...{rows}].map(r => parseFloat(r.children[{column}].textContent))"
        page.js("document.querySelector('#lb-table th[data-col=auc]').click()")
        descending = page.js(read)
        assert descending == sorted(descending, reverse=True)
        assert descending == pytest.approx(sorted(expected.auc, reverse=True), abs=1e-3)
        page.js("document.querySelector('#lb-table th[data-col=auc]').click()")
        assert page.js(read) == sorted(descending)
        assert page.problems() == []
    finally:
        page.close()
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(artifact).convert("L"), dtype=float)
    assert pixels.std() > 5  # not blank


def test_a_jobs_images_per_prompt_are_the_ones_it_recorded(tmp_path):
    from benchmark.jobs.results import MitigationResult
    from reports.jobs import Job

    # mitigation.n_images null means "the protocol's default": the job folder records the number it used
    result = MitigationResult(model="m", prompt_set="p", curves=[], n_images=4)
    recorded = Job(tmp_path, result, {"mitigation": {"n_images": None}})
    assert recorded.n_images == 4
    result = MitigationResult(model="m", prompt_set="p", curves=[])
    older = Job(tmp_path, result, {"mitigation": {"n_images": None}, "sampler": {"n_images": 2}})
    assert older.n_images == 2


def test_the_files_a_report_writes_are_its_sections(jobs, tmp_path):
    from reports.leaderboard import REPORT_FILES, SECTIONS, Inputs

    (tmp_path / "guard.csv").write_text("stale\n")  # a section this report leaves out: its file goes
    (tmp_path / "notes.txt").write_text("mine\n")  # no section's: kept
    files = write_report([jobs], tmp_path)
    sections = [build(Inputs(finished_jobs([jobs]), [], tmp_path, "auc")) for build in SECTIONS]
    shown = {name for s in sections if s.shown for name in s.file_names()}
    assert set(files) == shown | set(REPORT_FILES) and {"table1.tex", "ddpm.csv", "jobs.md"} <= set(files)
    assert not (tmp_path / "guard.csv").exists() and (tmp_path / "notes.txt").exists()
    page = files["leaderboard.html"].read_text()
    assert [s.anchor for s in sections if s.shown] == re.findall(r"<section id='([^']+)'>", page)
