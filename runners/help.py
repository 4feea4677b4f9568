"""The text of ``python -m runners.<runner> --help``: the groups a user chooses from, one line each, and the
experiments the runner runs, with what each reproduces and needs.

Built from what exists, so it cannot fall behind the files: the runner's own defaults (Hydra's
``hydra.runtime.choices``: the groups this runner composes), the one-line descriptions of
conf/hydra/help/be_bench.yaml (a group it does not describe is internal and not listed), each group's options as
Hydra finds them (plug-in launchers included), and each experiment file's ``task`` and header comment: the lines
after ``# @package`` say what it reproduces, the line starting ``# needs:`` what it needs (weights, data, GPU).
Registered as the ``help_text`` resolver by :mod:`runners.common`.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import yaml
from hydra.core.global_hydra import GlobalHydra

CONF = Path(__file__).resolve().parents[1] / "conf"
WIDTH = 118
NAME = 18  # the name column


def help_text(runner: str, choices, groups) -> str:
    """The whole help page of ``runner`` (``detect``, ``mitigate``...): ``choices`` is that runner's
    ``hydra.runtime.choices`` (group -> option), ``groups`` the described groups (group -> one line)."""
    lines = [*textwrap.wrap(f"runners.{runner}: {_summary(CONF / f'{runner}.yaml')}", WIDTH), "",
             f"Usage: python -m runners.{runner} [group=option ...] [key=value ...]   (-m: a sweep over comma lists)",
             "", "Groups (group=option, the default first):"]
    for group, line in groups.items():
        if group not in choices:
            continue
        chosen = choices[group]
        found = list(experiments(runner)) if group == "experiment" else _options(group)
        options = [o for o in found if o != chosen]
        shown = ", ".join([f"{chosen} (default)" if chosen else "null (default)", *options])
        lines += _entry(group, f"{line}: {shown}")
    if "experiment" in choices:
        lines += ["", "Experiments (experiment=<name>; a sweep runs with -m):"]
        for name, (what, needs, sweep) in experiments(runner).items():
            lines += _entry(name, ("sweep: " if sweep else "") + what)
            lines += _entry("", f"needs: {needs}")
    lines += ["", *textwrap.wrap(f"Any setting of the composed config (python -m runners.{runner} --cfg job) is "
                                 "key=value; a bad one ends the run with one line naming it. Docs: README.md, docs/.",
                                 WIDTH)]
    return "\n".join(lines).replace("$", "$$") + "\n"  # Hydra substitutes $NAMES in the template afterwards


def experiments(runner: str) -> dict[str, tuple[str, str, bool]]:
    """name -> (what it reproduces, what it needs, whether it is a sweep) of every conf/experiment/ file whose
    ``task`` is ``runner``. Raises ValueError naming a file that lacks its ``task`` or its header lines."""
    out = {}
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        header = _comments(path)
        needs = [line for line in header if line.startswith("needs:")]
        if "task" not in config or not needs or header.index(needs[0]) == 0:
            raise ValueError(f"{path}: an experiment states its task and, in its header comment, what it reproduces "
                             "and a line 'needs: ...'")
        if config["task"] != runner:
            continue
        at = header.index(needs[0])
        what = " ".join(header[:at]).removeprefix("Sweep (-m): ")
        sweep = bool(((config.get("hydra") or {}).get("sweeper") or {}).get("params"))
        out[path.stem] = (what, " ".join(header[at:]).removeprefix("needs:").strip(), sweep)
    return out


def _comments(path: Path) -> list[str]:
    """The header comment of a config file (its leading ``#`` lines, ``# @package`` left out)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return lines


def _summary(path: Path) -> str:
    """The first sentence of a primary config's header comment (before its usage line)."""
    text = " ".join(line for line in _comments(path) if not line.startswith("python -m"))
    return text.split(". ")[0].rstrip(".") + "."


def _options(group: str) -> list[str]:
    """The options of ``group`` as Hydra's config search path has them (plug-ins too), else conf/'s files."""
    if GlobalHydra.instance().is_initialized():
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _entry(name: str, text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"  {name:<{NAME}}", subsequent_indent=" " * (NAME + 2))
