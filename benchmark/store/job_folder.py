"""The job folder: what one job leaves behind, written and read through this module alone (docs/reuse.md).

    <folder>/config.yaml      the job's resolved configuration, written when the job starts
    <folder>/metrics.json     the results with the job's identity; written last, its presence means "finished"
    <folder>/<table>          the per-generation table of the task (``TABLES``)
    <folder>/.claim           held while a job runs in the folder (pid, host); never shared by two live jobs
    <folder>/.sweep_run       in a sweep: the id of the multirun that last ran (or reused) the job (``mark_sweep_run``)

``metrics.json`` always holds ``schema``, ``task``, ``config`` (resolved), ``sampler_settings``, ``n_images`` and
``fingerprints`` (content hashes of every local file or folder the configuration names), next to the task's own
results. A finished job is reused only when its identity (:func:`identity`) equals the one asked for now.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import psutil
import yaml

from benchmark.store.traces import atomic_write

SCHEMA = 1
CONFIG = "config.yaml"
METRICS = "metrics.json"
ERROR = "error.txt"
CLAIM = ".claim"
SWEEP_RUN = ".sweep_run"  # a sweep folder's: the id of its multirun going on; a job folder's: its latest multirun's
TABLES = {"detect": "generations.csv", "mitigate": "mitigation.csv", "ddpm": "copies.csv", "guard": "guarded.csv"}
# Config parts that say where things go or how they are watched, never what a result is: not part of identity.
NOT_IDENTITY = ("paths", "logger", "sweep_name", "hydra")
FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones (model weights) are sampled
SAMPLE_BLOCK = 1 << 20


# --------------------------------------------------------------------------------------------- fingerprints

# mtime_ns is read by the cache only: a file changed in place gets a new key, so it is hashed again
@lru_cache(maxsize=4096)
def _file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(SAMPLE_BLOCK), b""):
                digest.update(block)
        else:  # first, last and 14 evenly spaced MiB: catches another checkpoint of the same shape, stays fast
            for k in range(16):
                f.seek(min(size - SAMPLE_BLOCK, k * (size - SAMPLE_BLOCK) // 15))
                digest.update(f.read(SAMPLE_BLOCK))
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """A content hash of a file (16 hex digits): the whole file up to 64 MiB, else its size and 16 sampled MiB."""
    stat = Path(path).stat()
    return _file_fingerprint(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def path_fingerprint(path: str | Path) -> str:
    """A file's fingerprint, or a folder's: every file under it (hidden ones left out) with its relative name."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if not any(part.startswith(".") for part in rel.parts):
            digest.update(f"{rel.as_posix()}={file_fingerprint(file)}\n".encode())
    return digest.hexdigest()[:16]


def _local_paths(node, prefix: str = "") -> Iterator[tuple[str, Path]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if not prefix and key in NOT_IDENTITY:
                continue
            yield from _local_paths(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _local_paths(value, f"{prefix}{i}.")
    elif isinstance(node, str) and "/" in node and Path(node).expanduser().exists():
        yield prefix.rstrip("."), Path(node).expanduser()


def fingerprints(config: dict) -> dict[str, str]:
    """``{config key: fingerprint}`` for every value of a resolved config that names an existing local file or
    folder (prompt files, id lists, model and weight folders). Hub ids and built-in models have none."""
    return {key: path_fingerprint(path) for key, path in _local_paths(config)}


def identity(config: dict) -> dict:
    """What makes a job's results: its resolved config without ``NOT_IDENTITY`` parts, and the fingerprints of the
    files it names."""
    return {"config": {k: v for k, v in config.items() if k not in NOT_IDENTITY}, "fingerprints": fingerprints(config)}


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (missing on one side counts)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


# ----------------------------------------------------------------------------------------------- names

MAX_NAME_BYTES = 200  # file systems refuse names over 255 bytes; room left for "-2" and Hydra's siblings


def folder_name(text: str) -> str:
    """``text`` (a sweep job's overrides, ``a=1,b=x``) as the name of one folder inside the sweep folder: unchanged
    when it is one already; ``%`` and ``/`` quoted (``%25``, ``%2F``) so that a path value (``ids=../x.txt``) nests
    or climbs nowhere; a name of dots only quoted too; a name over ``MAX_NAME_BYTES`` cut, with a hash of the
    whole. Always the same name for the same text, distinct names for distinct texts."""
    name = text.replace("%", "%25").replace("/", "%2F")
    if name.strip(".") == "" and name:
        name = name.replace(".", "%2E")
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        name = name.encode()[:MAX_NAME_BYTES - 13].decode(errors="ignore") + "-" + digest
    return name


# ----------------------------------------------------------------------------------------------- the folder

@dataclass
class Job:
    """A job folder read back: its task, resolved config and results (``metrics``: the whole metrics.json)."""

    folder: Path
    task: str
    config: dict
    metrics: dict

    @property
    def finished(self) -> bool:
        return (self.folder / METRICS).exists()

    @property
    def sampler(self) -> dict:
        return self.metrics.get("sampler_settings") or self.config.get("sampler", {})

    @property
    def n_images(self) -> int | None:
        return self.metrics.get("n_images", self.sampler.get("n_images"))

    @property
    def fingerprints(self) -> dict[str, str]:
        return self.metrics.get("fingerprints", {})

    @property
    def identity(self) -> dict:
        return {"config": {k: v for k, v in self.config.items() if k not in NOT_IDENTITY},
                "fingerprints": self.fingerprints}

    def table(self) -> pd.DataFrame:
        """The task's per-generation table (``TABLES``)."""
        return pd.read_csv(self.folder / TABLES[self.task], keep_default_na=False, dtype={"prompt_id": str})


def read_job(folder: str | Path) -> Job:
    """A job folder's task, config and results. The config is the job's own ``config.yaml``; folders written
    before it existed fall back to Hydra's ``.hydra/config.yaml`` (unresolved there). Raises FileNotFoundError
    when the folder has neither results nor config."""
    folder = Path(folder)
    metrics = json.loads((folder / METRICS).read_text()) if (folder / METRICS).exists() else {}
    config = metrics.get("config")
    if config is None:
        for name in (CONFIG, ".hydra/config.yaml"):
            if (folder / name).exists():
                config = yaml.safe_load((folder / name).read_text()) or {}
                break
    if config is None and not metrics:
        raise FileNotFoundError(f"not a job folder (no {METRICS}, no {CONFIG}): {folder}")
    return Job(folder, metrics.get("task") or (config or {}).get("task", "detect"), config or {}, metrics)


def write_config(folder: Path, config: dict) -> Path:
    """The resolved config beside the results (``config.yaml``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))
    return path


def write_results(folder: Path, task: str, config: dict, sampler: dict, n_images: int, summary: dict,
                  tables: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write a finished job: its tables, ``config.yaml``, then ``metrics.json`` (last: its presence means done).

    ``summary`` holds the task's results; the schema fields (schema, task, config, sampler_settings, n_images,
    fingerprints) are added here, computed after the job read its files. Raises ValueError on an unknown task
    or a summary that contradicts a schema field."""
    if task not in TABLES:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TABLES)})")
    fields = {"schema": SCHEMA, "task": task, "config": config, "sampler_settings": sampler, "n_images": int(n_images),
              "fingerprints": fingerprints(config)}
    clash = [k for k in fields if k in summary and summary[k] != fields[k]]
    if clash:
        raise ValueError(f"job summary contradicts the job folder schema on {', '.join(clash)}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (tables or {}).items():
        atomic_write(folder / name, lambda tmp, t=table: t.to_csv(tmp, index=False))
    write_config(folder, config)
    payload = {**summary, **fields}
    atomic_write(folder / METRICS, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n"))
    return folder / METRICS


# ------------------------------------------------------------------------------------ claiming a folder

def _alive(claim: dict) -> bool:
    if claim.get("host") != socket.gethostname():
        return True  # another machine's job: it cannot be checked, so it is left alone
    pid = int(claim.get("pid", -1))
    if pid == os.getpid():
        return False  # this process's own earlier job, which ended without releasing (it cannot still run)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a pid reused by a process started after the claim is not the claiming job
        return psutil.Process(pid).create_time() <= float(claim.get("since", 0)) + 1
    except psutil.Error:
        return False


def claim(folder: Path) -> bool:
    """Take a folder for this process, exclusively (O_EXCL); a stale claim (its process gone) is taken over.
    False when another live job holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                held = {}
            if held and _alive(held):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        return True
    return False


def release(folder: Path) -> None:
    path = folder / CLAIM
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass


def start_sweep_run(sweep_dir: Path) -> str:
    """Give the multirun starting in ``sweep_dir`` a fresh id (written to ``<sweep_dir>/.sweep_run``) and return it:
    its jobs mark their folders with it (``mark_sweep_run``), which tells them from an earlier grid's in the same
    sweep folder. Two multiruns at once in one sweep folder share the later one's id."""
    run = uuid.uuid4().hex
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / SWEEP_RUN, lambda tmp: tmp.write_text(run))
    return run


def mark_sweep_run(folder: Path, sweep_dir: Path) -> None:
    """Mark job ``folder`` (the one the job runs in or reuses) as a job of the multirun going on in ``sweep_dir``;
    nothing when that sweep has no id (not started by ``start_sweep_run``)."""
    try:
        run = (sweep_dir / SWEEP_RUN).read_text()
    except FileNotFoundError:
        return
    atomic_write(folder / SWEEP_RUN, lambda tmp: tmp.write_text(run))


def in_sweep_run(folder: Path, run: str) -> bool:
    """Whether job ``folder`` was last run (or reused) by the multirun ``run``."""
    try:
        return (folder / SWEEP_RUN).read_text() == run
    except FileNotFoundError:
        return False


def candidates(folder: Path) -> Iterator[Path]:
    """``folder``, then ``folder-2``, ``folder-3``, ...: where a job goes when an earlier folder is taken."""
    yield folder
    k = 2
    while True:
        yield folder.with_name(f"{folder.name}-{k}")
        k += 1


def open_job(folder: Path, config: dict, log=print) -> tuple[Path, Job | None]:
    """Where a job with this resolved config runs: ``(folder, finished job)`` when a finished job of the same
    identity is there (reuse it), else ``(folder, None)`` with the folder claimed for this process. A folder whose
    finished job has another identity, or that a live job holds, is never touched: the next candidate is tried."""
    wanted = identity(config)
    for candidate in candidates(folder):
        if (candidate / METRICS).exists():
            job = read_job(candidate)
            changed = differences(job.identity, wanted)
            if not changed:
                return candidate, job
            log(f"{candidate} holds a finished job made with other inputs ({', '.join(changed[:4])}"
                f"{', ...' if len(changed) > 4 else ''}): not reused")
            continue
        if claim(candidate):
            if candidate != folder:
                log(f"this job writes to {candidate}")
            write_config(candidate, config)
            return candidate, None
        log(f"{candidate} is in use by another running job")
    raise AssertionError("unreachable")
