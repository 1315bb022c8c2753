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
      manifest.json       what load_run needs: method, options, classes, backbone by name + sha256;
                          plus prompt_sha256 (the prompt file's sha256, checked on every read)
      local.json          machine-local facts (absolute data root and weights path); never exported
      checkpoint/         resume state (safetensors + JSON, never a pickle)
      done                written last: the run is complete
      failed.json         the one-line error of the grid's last attempt (removed on success)
      .lock               held (flock) by the one process writing the run
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from vlprompt import utils
from vlprompt.errors import VlpromptError
from vlprompt.run.identity import verify_fingerprint
from vlprompt.train import checkpoint as ckpt
from vlprompt.train.config import read_yaml
from vlprompt.utils import TMP_SUFFIX, atomic_write_json, atomic_write_text, sha256_file

CONFIG = "config.yaml"
FINGERPRINT = "fingerprint.json"
ENV = "env.json"
SPLIT = "split.json"
LOG = "log.jsonl"  # the trainer writes LOG, LOG_TABLE and CHECKPOINT through RunDir (train/files.py)
LOG_TABLE = "log.csv"
METRICS = "metrics.json"
PROMPT = "prompt.safetensors"
MANIFEST = "manifest.json"
LOCAL = "local.json"
DONE = "done"
LOCK = ".lock"
FAILED = "failed.json"
CHECKPOINT = "checkpoint"
TENSORBOARD = "tensorboard"  # --log-to tensorboard (train/loggers.py, through RunDir.tensorboard_dir)
#: results that a retrain replaces (the checkpoint goes with them)
RESULT_FILES = (DONE, METRICS, PROMPT, MANIFEST, FINGERPRINT)
CARD = "README.md"  # the model card of an `export --hub` folder (run/hub.py)
#: the files of a prompt on the Hugging Face Hub (everything else in a repository is ignored)
HUB_FILES = (PROMPT, MANIFEST, CONFIG, METRICS, CARD)
#: every name the run layer writes at a run's top level (nothing else is ever touched there)
RUN_NAMES = (
    LOG_TABLE,
    CONFIG,
    FINGERPRINT,
    ENV,
    SPLIT,
    LOG,
    METRICS,
    PROMPT,
    MANIFEST,
    LOCAL,
    DONE,
    LOCK,
    FAILED,
    CHECKPOINT,
)
#: what may already be in a folder the run layer may take over (e.g. a grid's failed first attempt)
_HARMLESS = (LOCK, FAILED)


def read_json(path: Path) -> Any:
    """A run file's JSON, or a one-line error saying the run directory is damaged."""
    return utils.read_json(path, error="cannot read {path} ({reason}); the run directory is damaged")


class RunDir:
    """A run directory on disk; every read and write of a run's files goes through here.  It is the
    trainer's :class:`~vlprompt.train.files.TrainerFiles`: ``fit`` writes its log and checkpoint through
    ``log_file``, ``log_table`` and ``checkpoint_dir``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def log_table(self) -> Path:
        return self.path / LOG_TABLE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

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

    def is_run(self) -> bool:
        """Written by the run layer: fingerprint.json (a run's first file) is a fingerprint record."""
        try:
            if self.fingerprint() is not None:
                return True
        except VlpromptError:
            pass
        return (self.path / DONE).is_file() and (self.path / CONFIG).is_file()  # an older vlprompt's run

    def foreign_entries(self) -> list[str]:
        """Top-level entries that are neither harmless nor a temp file of the run layer's own names."""
        if not self.path.is_dir():
            return []
        return sorted(
            p.name for p in self.path.iterdir() if p.name not in _HARMLESS and not _own_temp(p.name)
        )

    def require_run_or_empty(self, what: str) -> None:
        """Refuse (one line) to write into a folder that holds files but is not a vlprompt run: its
        files are the user's, and a run would overwrite or delete some of them."""
        if not self.path.is_dir() or self.is_run():
            return
        foreign = self.foreign_entries()
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise VlpromptError(
                f"{what} {self.path} is a folder that is not a vlprompt run (it holds "
                f"{', '.join(foreign[:3])}{more}); pass a new or empty folder"
            )

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

    # ---------------------------------------------------------------- verification
    def verify(self) -> None:
        """Check what the run layer trusts, with one line naming the file that disagrees:
        fingerprint.json against its own hash and against config.yaml, manifest.json against the
        manifest inside prompt.safetensors, the prompt's bytes against the sha256 manifest.json records,
        and the manifest's fingerprint against fingerprint.json.  (Runs written before the hashes
        existed lack ``prompt_sha256``; for them the other checks still apply.)"""
        fp_path = self.path / FINGERPRINT
        record = read_json(fp_path) if fp_path.is_file() else None
        if record is not None:
            config = self.read_config() if self.has_config() else None
            verify_fingerprint(record, config, fp_path=fp_path, config_path=self.path / CONFIG)
        if self.has_prompt():
            manifest = read_json(self.path / MANIFEST)
            verify_prompt(self.path / PROMPT, manifest, self.path / MANIFEST)
            if (
                isinstance(record, dict)
                and isinstance(manifest, dict)
                and manifest.get("fingerprint")
                and manifest.get("fingerprint") != record.get("fingerprint")
            ):
                raise VlpromptError(
                    f"{fp_path} names another run than {self.path / MANIFEST} (fingerprints differ); restore "
                    "the run's own files or retrain with --force"
                )

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

    def record_failure(self, reason: str, stage: str = "run") -> None:
        """``failed.json``: the one-line error a report shows (only in a folder that already exists);
        ``stage`` "evaluation": training finished and the evaluations in metrics.json stand, some
        other evaluation could not be made."""
        if self.path.is_dir():
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            atomic_write_json(self.path / FAILED, {"error": reason, "time": stamp, "stage": stage})

    def clear_failure(self) -> None:
        (self.path / FAILED).unlink(missing_ok=True)

    def _failure_record(self) -> dict[str, Any]:
        f = self.read_json(FAILED) if (self.path / FAILED).is_file() else None
        return f if isinstance(f, dict) else {}

    def failure(self) -> str | None:
        f = self._failure_record()
        return str(f["error"]) if f.get("error") else None

    def failed_evaluations_only(self) -> bool:
        """The recorded failure is of some evaluations of a finished run (``record_failure`` stage)."""
        return self._failure_record().get("stage") == "evaluation"

    def mark_done(self) -> None:
        atomic_write_text(self.path / DONE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")

    def clear_results(self) -> None:
        """Remove a previous run's results and resume state (a retrain starts clean)."""

        for name in RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def clear_run_files(self) -> None:
        """Remove every file the run layer writes at the top (and the checkpoint): the folder stops
        being a run.  Other files are left alone."""
        for name in RUN_NAMES:
            if name in (LOCK, CHECKPOINT):
                continue
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def remove_stale_temps(self) -> int:
        """Remove temp files of interrupted writes: only ``.<run file>.*.tmp`` at the top level and in
        ``checkpoint/`` (never anything below or beside them that the run layer did not name)."""
        n = 0
        for folder in (self.path, self.checkpoint_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if _own_temp(p.name, checkpoint=folder != self.path) and p.is_file():
                    try:
                        p.unlink()
                        n += 1
                    except OSError:
                        pass
        return n


def _own_temp(name: str, checkpoint: bool = False) -> bool:
    """``.<name>.<random>.tmp`` of a file the run layer writes (``atomic_write``'s temp names)."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return False
    if checkpoint:  # last.safetensors, state.json, state-<sha>.safetensors (train/checkpoint.py)
        return name.startswith((f".{ckpt.WEIGHTS}.", f".{ckpt.STATE}.", f".{ckpt.TENSORS_PREFIX}"))
    return any(name.startswith(f".{n}.") for n in RUN_NAMES if n != CHECKPOINT)


PROMPT_SHA256 = "prompt_sha256"  # key of manifest.json: sha256 of prompt.safetensors at write time


def embedded_manifest(prompt: Path) -> dict[str, Any] | None:
    """The manifest stored in a prompt file's safetensors metadata (header only; tensors not read)."""
    try:
        with safe_open(str(prompt), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # a damaged header: safetensors raises its own error types
        raise VlpromptError(
            f"cannot read {prompt} ({type(e).__name__}); the file is corrupt -- retrain or re-export"
        ) from None
    if "vlprompt_manifest" not in meta:
        return None
    try:
        man = json.loads(meta["vlprompt_manifest"])
    except json.JSONDecodeError:
        raise VlpromptError(f"{prompt} has a damaged manifest; re-export the prompt") from None
    return man if isinstance(man, dict) else None


def verify_prompt(prompt: Path, manifest: Any, manifest_path: Path) -> None:
    """manifest.json must equal the manifest inside the prompt file (besides its hash of that file),
    and the prompt file's sha256 the one manifest.json recorded when it was written."""
    if not isinstance(manifest, dict):
        return  # read_manifest refuses it with its own message
    inner = embedded_manifest(prompt)
    outer = {k: v for k, v in manifest.items() if k != PROMPT_SHA256}
    if inner is not None and inner != outer:
        keys = sorted(k for k in set(inner) | set(outer) if inner.get(k) != outer.get(k))
        raise VlpromptError(
            f"{manifest_path} disagrees with the manifest inside {prompt.name} ({', '.join(keys[:4])}); "
            "the file was edited -- restore it, or re-export / retrain"
        )
    want = manifest.get(PROMPT_SHA256)
    if want is not None and sha256_file(prompt) != want:
        raise VlpromptError(
            f"{prompt} does not match the sha256 recorded in {manifest_path.name} (damaged or replaced); "
            "restore it, or re-export / retrain"
        )


def find_runs(root: str | os.PathLike) -> list[RunDir]:
    """Every run directory (one holding config.yaml) under ``root``, sorted."""
    root = Path(root)
    return [RunDir(p.parent) for p in sorted(root.rglob(CONFIG))]
