"""The run directory's files: their names, readers and writers (the only place that knows them).

::

    RUN/
      config.yaml         the fully resolved RunConfig (as requested; local paths included)
      fingerprint.json    sha256 of everything that changes the result + the identity it hashes
      env.json            versions, git revision, device, attention choice (no hostname unless asked)
      split.json          split hash, class names, counts and the few-shot picks (paths relative)
      log.jsonl           step / epoch records (the source of training curves)
      log.csv             the same records as a table
      metrics.json        every test-split evaluation of this run
      prompt.safetensors  the learned prompt, the manifest embedded in its metadata
      manifest.json       what load_run needs: method, options, classes, backbone by name + sha256
      local.json          machine-local facts (absolute data root and weights path); never exported
      checkpoint/         resume state (safetensors + JSON, never a pickle)
      done                written last: the run is complete
      failed.json         the one-line error of the grid's last attempt (removed on success)
      .lock               held (flock) by the one process writing the run
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from vlprompt import utils
from vlprompt.errors import VlpromptError
from vlprompt.train import files as trainer_files
from vlprompt.train.config import read_yaml
from vlprompt.utils import atomic_write_json, atomic_write_text, remove_stale_temps

CONFIG = "config.yaml"
FINGERPRINT = "fingerprint.json"
ENV = "env.json"
SPLIT = "split.json"
LOG = trainer_files.LOG  # written by the trainer through RunDir (train/files.py names them)
LOG_TABLE = trainer_files.LOG_TABLE
METRICS = "metrics.json"
PROMPT = "prompt.safetensors"
MANIFEST = "manifest.json"
LOCAL = "local.json"
DONE = "done"
LOCK = ".lock"
FAILED = "failed.json"
CHECKPOINT = trainer_files.CHECKPOINT
#: results that a retrain replaces (the checkpoint goes with them)
RESULT_FILES = (DONE, METRICS, PROMPT, MANIFEST, FINGERPRINT)


def read_json(path: Path) -> Any:
    """A run file's JSON, or a one-line error saying the run directory is damaged."""
    return utils.read_json(path, error="cannot read {path} ({reason}); the run directory is damaged")


class RunDir(trainer_files.FolderFiles):
    """A run directory on disk; every read and write of a run's files goes through here (the trainer
    writes its log and checkpoint through it: ``log_file``, ``log_table``, ``checkpoint_dir``)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def log_records(self) -> list[Any]:
        """The records of the training log (a line cut by a kill skipped; [] when there is none)."""
        return utils.read_jsonl(self.log_file)

    # ---------------------------------------------------------------- state
    def exists(self) -> bool:
        return self.path.is_dir()

    def is_complete(self) -> bool:
        return (self.path / DONE).is_file()

    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def has_prompt(self) -> bool:
        return (self.path / PROMPT).is_file() and (self.path / MANIFEST).is_file()

    def is_empty(self) -> bool:
        return self.path.is_dir() and not any(p.name != LOCK for p in self.path.iterdir())

    # ---------------------------------------------------------------- readers
    def read_config(self) -> dict[str, Any]:
        """config.yaml as a dict (safe YAML: a crafted file cannot build Python objects)."""

        if not self.has_config():
            return {}
        return read_yaml(self.path / CONFIG, "run config")

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path / name
        return read_json(p) if p.is_file() else default

    def metrics(self) -> dict[str, Any]:
        m = self.read_json(METRICS, {"evaluations": []})
        if not isinstance(m, dict) or not isinstance(m.get("evaluations", []), list):
            raise VlpromptError(
                f"{self.path / METRICS} is not a vlprompt metrics file; delete it to re-evaluate"
            )
        return m

    def evaluations(self) -> list[dict[str, Any]]:
        return list(self.metrics().get("evaluations", []))

    def recorded_evaluations(self) -> set[tuple[str, str]]:
        """(dataset, subsample) pairs of the test-split evaluations recorded in metrics.json."""
        try:
            evals = self.evaluations()
        except VlpromptError:
            return set()
        return {
            (str(e.get("dataset")), str(e.get("subsample", "all")))
            for e in evals
            if isinstance(e, dict) and e.get("split", "test") == "test" and e.get("accuracy") is not None
        }

    def fingerprint(self) -> dict[str, Any] | None:
        fp = self.read_json(FINGERPRINT)
        return fp if isinstance(fp, dict) and "fingerprint" in fp else None

    def manifest(self) -> dict[str, Any] | None:
        return self.read_json(MANIFEST)

    def env(self) -> dict[str, Any] | None:
        return self.read_json(ENV)

    def local(self) -> dict[str, Any]:
        return self.read_json(LOCAL, {}) or {}

    # ---------------------------------------------------------------- writers
    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / CONFIG, text)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.path / ENV, env)

    def write_metrics(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Add ``entry`` to metrics.json, replacing one for the same (dataset, subsample)."""
        metrics = self.metrics() if (self.path / METRICS).is_file() else {"evaluations": []}
        evals = [
            e
            for e in metrics.get("evaluations", [])
            if (e.get("dataset"), e.get("subsample")) != (entry["dataset"], entry["subsample"])
        ]
        evals.append(entry)
        metrics["evaluations"] = evals
        atomic_write_json(self.path / METRICS, metrics)
        return metrics

    def record_failure(self, reason: str) -> None:
        """``failed.json``: the one-line error a report shows (only in a folder that already exists)."""
        if self.path.is_dir():
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            atomic_write_json(self.path / FAILED, {"error": reason, "time": stamp})

    def clear_failure(self) -> None:
        (self.path / FAILED).unlink(missing_ok=True)

    def failure(self) -> str | None:
        f = self.read_json(FAILED) if (self.path / FAILED).is_file() else None
        return str(f.get("error")) if isinstance(f, dict) and f.get("error") else None

    def mark_done(self) -> None:
        atomic_write_text(self.path / DONE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")

    def clear_results(self) -> None:
        """Remove a previous run's results and resume state (a retrain starts clean)."""

        for name in RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def remove_stale_temps(self) -> int:
        return remove_stale_temps(self.path)


def find_runs(root: str | os.PathLike) -> list[RunDir]:
    """Every run directory (one holding config.yaml) under ``root``, sorted."""
    root = Path(root)
    return [RunDir(p.parent) for p in sorted(root.rglob(CONFIG))]
