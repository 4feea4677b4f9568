"""What a newcomer reads and runs: --help, the debug presets, the experiments and sweep presets (issue 26)."""
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import runners.common  # noqa: F401  (registers the help_text resolver)
from benchmark.data.prompts import load_prompt_set
from benchmark.early.stopping import rule_from_job
from benchmark.jobs.config import ConfigError, check_job
from benchmark.store import job_folder as jobfolder
from runners import detect, mitigate
from runners import help as runner_help
from tests.test_sweeps import run_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RUNNERS = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = yaml.safe_load((CONF / "hydra/help/be_bench.yaml").read_text())["groups"]
# groups a user does not choose from: the shared Hydra block and paths, and every subgroup: a runner's own part of
# a choice (debug/detect, model/detect) and Hydra's own groups (the launcher, a user choice, is described)
INTERNAL = ["hydra", "paths", "*/*"]


def config(task, *overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(task, overrides=list(overrides), return_hydra_config=hydra)


def page(runner, *overrides):
    """The help text as the runner builds it (inside Hydra, which lists plug-in options such as launchers)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(runner, overrides=list(overrides), return_hydra_config=True)
        return runner_help.help_text(runner, cfg.hydra.runtime.choices, GROUPS)


@pytest.mark.parametrize("runner", RUNNERS)
def test_help_lists_the_runners_own_groups_and_experiments_only(runner):
    choices = config(runner, hydra=True).hydra.runtime.choices
    described = [g for g in choices if g in GROUPS]
    internal = [g for g in choices if g not in GROUPS]
    assert all(any(fnmatch(g, p) for p in INTERNAL) for g in internal), internal  # a new user group needs its line
    text = page(runner)
    for group in described:
        assert f"\n  {group:<18}{GROUPS[group].split()[0]}" in text
    for group in internal:
        assert f"\n  {group} " not in text
    assert all(len(line) <= runner_help.WIDTH for line in text.splitlines())
    mine = runner_help.experiments(runner)
    for name, path in ((p.stem, p) for p in (CONF / "experiment").glob("*.yaml")):
        own = yaml.safe_load(path.read_text())["task"] == runner and "experiment" in choices
        assert (f"\n  {name:<18}" in text) == own, name
        if own:
            assert f"needs: {mine[name][1].split()[0]}" in text


def test_help_is_what_the_runner_prints():
    out = subprocess.run([sys.executable, "-m", "runners.mitigate", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == page("mitigate").strip()
    assert "fig6_fig7" in out.stdout and "table1" not in out.stdout  # a detection experiment is not mitigate's


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_its_runner_and_says_what_it_reproduces_and_needs(name, tmp_path):
    task = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())["task"]
    what, needs, sweep = runner_help.experiments(task)[name]
    assert what and needs
    cfg = config(task, f"experiment={name}", f"paths.root={tmp_path}", hydra=True)
    assert bool(cfg.hydra.sweeper.params) == sweep
    check_job(OmegaConf.to_container(config(task, f"experiment={name}", f"paths.root={tmp_path}"), resolve=True))
    if sweep:  # every point of the grid is a valid job too
        for key, values in cfg.hydra.sweeper.params.items():
            for value in str(values).split(","):
                point = OmegaConf.to_container(config(task, f"experiment={name}", f"paths.root={tmp_path}",
                                                      f"{key}={value}"), resolve=True)
                check_job(point)


def test_the_paper_figures_and_tables_have_an_experiment():
    """BE Table 1 + Fig. 5 (detection), Fig. 6/7 (mitigation), Jeon et al.'s Table 1 (SAIL)."""
    said = {name: what for task in ("detect", "mitigate") for name, (what, _, _) in
            runner_help.experiments(task).items()}
    for figure in ("Table 1 and Fig. 5", "Fig. 6 (local) and Fig. 7 (global)", "Jeon et al. (ICML 2025) Table 1"):
        assert any(figure in what for what in said.values()), figure


def test_prompt_sets_sweeps_sets_with_both_labels(shared_data, tmp_path):
    """experiment=prompt_sets used to sweep ren_mem345 alone, all memorized: detection needs both labels."""
    grid = config("detect", "experiment=prompt_sets", hydra=True).hydra.sweeper.params.prompts.split(",")
    for prompts in grid:
        cfg = config("detect", "experiment=prompt_sets", f"prompts={prompts}", f"paths.data_dir={shared_data}",
                     "prompts.limit=null")
        prompt_set = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
        assert {p.memorized for p in prompt_set} == {True, False}, prompts


@pytest.mark.parametrize("main, args, line", [
    (detect.main, ["experiment=testbed_sweep"],
     "config error: experiment=testbed_sweep is a sweep over sampler.steps, sampler.guidance: run it with -m"),
    (detect.main, ["experiment=fig6_fig7"],
     "config error: task='mitigate': experiment=fig6_fig7 is for runners.mitigate, not runners.detect"),
    (mitigate.main, ["experiment=table1"],
     "config error: task='detect': experiment=table1 is for runners.detect, not runners.mitigate"),
])
def test_a_sweep_without_m_or_another_runners_experiment_is_refused_in_one_line(main, args, line, tmp_path,
                                                                                monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(main, monkeypatch, *args, f"paths.root={tmp_path}")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    # refused before the job folder is written (Hydra's own .hydra/ aside)
    assert not [p for p in tmp_path.rglob("config.yaml") if p.parent.name != ".hydra"]


def test_each_runners_debug_preset_holds_only_what_that_runner_reads():
    detection = config("detect", "debug=default")
    assert (detection.model.name, detection.sampler.steps, list(detection.score.T)) == ("tiny", 5, [1, 5])
    assert detection.score.n_boot == 0
    for task in ("mitigate", "guard"):
        cfg = config(task, "debug=default")
        assert cfg.model.name == "tiny" and cfg.sampler.steps == 5 and "score" not in cfg, task
    # each runner's own part is named after a runner that selects it
    for folder in (CONF / "debug").iterdir():
        if folder.is_dir():
            assert f"debug/{folder.name}: ${{debug}}" in (CONF / f"{folder.name}.yaml").read_text()


@pytest.mark.parametrize("override, line", [
    ("capture.extra=[sail]", "capture.extra is now extra.passes: set extra.passes=[sail] instead"),
    ("+model.extra=[sail,anisotropy]", "model.extra is now extra.passes: set extra.passes=[sail,anisotropy] instead"),
])
def test_an_old_key_is_refused_with_the_one_that_replaced_it(override, line, tmp_path):
    with pytest.raises(ConfigError) as error:
        check_job(OmegaConf.to_container(config("detect", override, f"paths.root={tmp_path}"), resolve=True))
    assert str(error.value) == line


def test_extra_passes_is_the_one_key_of_the_extra_passes(tmp_path):
    """The testbed turns on sail and anisotropy for detection only; the command line and debug still decide."""
    root = f"paths.root={tmp_path}"
    assert list(config("detect", root).extra.passes) == ["sail", "anisotropy"]
    assert list(config("detect", root, "extra.passes=[curvature]").extra.passes) == ["curvature"]
    assert list(config("detect", root, "debug=default").extra.passes) == []
    assert list(config("detect", root, "experiment=sail_table1").extra.passes) == ["sail"]
    for task in ("mitigate", "guard"):
        assert "extra" not in config(task, root) and "extra" not in config(task, root).model


def test_every_step_so_far_is_the_default_stopping_window(tmp_path):
    """early.signal.T: null, resolved to the run's steps: min(T, k + 1) = k + 1 at every step k."""
    assert config("detect", f"paths.root={tmp_path}").early.signal.T is None
    (tmp_path / "metrics.json").write_text("{}")
    rows = [{"step": 9, "fpr_target": 0.05, "threshold": 1.5}]
    signal = {"detector": "LD", "layers": "all", "T": None}
    job = jobfolder.Job(tmp_path, "detect", {"early": {"signal": signal}, "sampler": {"steps": 30},
                                             "layers": {"sets": {"all": ["*"]}}}, {"early_stopping": rows})
    rule = rule_from_job(job, 9, 0.05)
    assert (rule.T, rule.window) == (30, 10)
    signal["T"] = 4
    assert rule_from_job(job, 9, 0.05).window == 4


def _on_a_terminal(*command: str, cwd: Path) -> str:
    """What ``command`` prints on a terminal (a pseudo-terminal: progress bars are drawn), stdout and stderr."""
    import fcntl
    import os
    import struct
    import termios

    leader, follower = os.openpty()
    # a terminal of 40 rows x 120 columns (a new pseudo-terminal has 0 x 0, where tqdm draws nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, cwd=cwd)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the command ended and closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert process.wait(timeout=600) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace").replace("\r\n", "\n")


def test_make_runs_steps_print_a_summary_that_fits_one_screen(tmp_path):
    """`make run`'s three steps on the debug presets, on a terminal: under 60 lines with the progress bars, the
    answers with their intervals, where the folders and the report are; the tables stay in the files."""
    root = f"paths.root={tmp_path}"
    python = sys.executable
    out = "".join(_on_a_terminal(*step, cwd=ROOT) for step in [
        (python, "-m", "runners.detect", "debug=default", root),
        (python, "-m", "runners.mitigate", "debug=default", root),
        (python, "-m", "reports.leaderboard", str(tmp_path / "outputs/detect"), str(tmp_path / "outputs/mitigate"),
         "--out", str(tmp_path / "report"))])
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert sum("prompts:" in line for line in lines) >= 2  # the bars were drawn (one per sampling loop)
    assert any(line.startswith("  local: BE (LD) - Wen (D)") and "[" in line for line in lines), out  # an interval
    folders = [tmp_path / "outputs" / task / "tiny/tiny" for task in ("detect", "mitigate")]
    for folder in folders:
        (job,) = folder.iterdir()
        assert f"folder: {job} (tables: report.md)" in out and (job / "report.md").exists()
    assert f"report: {tmp_path / 'report/leaderboard.html'}" in out
    shown = [line.split("\r")[-1] for line in lines]  # what stays on the screen of each line (bars redraw in place)
    assert not [line for line in shown if line.startswith("|")]  # no Markdown table on the terminal
    assert all(len(line) <= 120 for line in shown if str(tmp_path) not in line)  # no line wraps on 120 columns
