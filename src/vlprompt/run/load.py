"""Use a finished run: load its prompt, evaluate it on a data set, export it for sharing."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from vlprompt.data.custom import public_name
from vlprompt.errors import VlpromptError
from vlprompt.run import cost as costs
from vlprompt.run.backbone import WORLD_BANNER, world_mismatch
from vlprompt.run.layout import CARD, CONFIG, MANIFEST, METRICS, PROMPT, RunDir
from vlprompt.run.lock import RunLock
from vlprompt.run.prompt import FORMAT, load_prompt, load_run, read_manifest  # noqa: F401 (public here too)
from vlprompt.run.train import build_splits, eval_loader, metrics_entry, record_metrics
from vlprompt.train.config import RunConfig, dump_yaml, read_yaml
from vlprompt.train.evaluate import evaluate
from vlprompt.train.precision import resolve_device
from vlprompt.utils import atomic_write

log = logging.getLogger(__name__)


def run_config_of(run: RunDir) -> dict[str, Any]:
    """The run's config.yaml as a dict ({} when absent), provenance removed."""
    raw = run.read_config()
    raw.pop("provenance", None)
    return raw


def evaluate_run(
    run_dir: str | os.PathLike,
    dataset: str | None = None,
    root: str | None = None,
    subsample: str | None = None,
    backbone: Any = None,
    *,
    device: Any = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    skip_bad: bool | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on a data set's test split and record it in the run's metrics.json.

    ``dataset`` defaults to the run's own (``root`` then defaults to the run's root too); ``subsample``
    defaults to ``new`` for a run trained on base classes and ``all`` otherwise.  Class names and the
    template come from the evaluated data set.  Returns the metrics entry.
    """

    run = RunDir(run_dir)
    manifest, _ = read_manifest(run.path)
    raw = run_config_of(run) if run.path.is_dir() else {}
    cfg = (
        RunConfig.from_dict(raw, where=str(run.file(CONFIG))) if raw.get("data", {}).get("dataset") else None
    )
    own = (
        dataset is None
        or dataset == manifest.get("dataset")
        or (cfg is not None and dataset == cfg.data.dataset)
    )
    if subsample is None:
        subsample = "new" if (own and manifest.get("subsample") == "base") else "all"
    data = (
        cfg.copy()
        if cfg is not None
        else RunConfig.from_dict({"data": {"dataset": dataset or manifest["dataset"]}})
    )
    if own:
        data.data.dataset = cfg.data.dataset if cfg is not None else manifest["dataset"]
        if root is None:
            root = run.local().get("data_root") or (cfg.data.root if cfg is not None else None)
    else:
        data.data.dataset = dataset
    data.data.root = root
    if skip_bad is not None:
        data.data.skip_bad = bool(skip_bad)
    dev = resolve_device(device or (cfg.train.device if cfg is not None else "auto"))
    model = load_run(run.path, backbone=backbone, device=dev, weights=weights)
    splits = build_splits(data, subsample=subsample, fewshot_=False)
    if world_mismatch(model.backbone, splits.name):
        log.warning(WORLD_BANNER)
    model.set_classnames(list(splits.classnames), splits.template)
    train = cfg.train if cfg is not None else data.train
    loader = eval_loader(
        splits,
        model.backbone,
        int(batch_size or train.eval_batch_size),
        int(num_workers if num_workers is not None else data.data.num_workers),
    )
    meter = costs.Meter(dev).start()  # run/cost.py
    res = evaluate(model, loader, device=dev, precision=train.precision, confusion=True)
    measured = meter.stop()
    entry = metrics_entry(
        res,
        dataset=splits.name,
        subsample=subsample,
        epoch=manifest.get("epochs"),
        seed=manifest.get("seed"),
        shots=manifest.get("shots"),
        method=manifest["method"],
    )
    entry["cost"] = costs.eval_cost(measured, int(entry.get("n") or 0))
    if run.path.is_dir():
        record_metrics(run, entry)
    return entry


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """The learned prompt (safetensors, manifest embedded) + manifest.json + a portable config.yaml.

    The export holds no machine paths: the config's data root and weights path are dropped (the
    manifest names the weights by file name and sha256).  Files get the umask's mode.  The target is a
    new or empty folder or an earlier export; a run is replaced only with ``force`` (it then stops being
    a run: its results, fingerprint and checkpoint go), any other folder is refused.
    """

    manifest, prompt_path = read_manifest(run_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlpromptError(f"export target {out} is a file; pass a directory")
    exp = RunDir(out)
    if out.is_dir() and out.resolve() == Path(run_dir).resolve():
        raise VlpromptError(f"export target {out} is the run itself; pass another folder")
    if exp.is_run():
        if not force:
            raise VlpromptError(
                f"export target {out} is a run; exporting would replace its prompt -- pass --force to "
                "replace the run by this export (its results and checkpoint go) or choose another folder"
            )
        with RunLock(out):
            exp.clear_run_files()
    else:
        found = set(exp.foreign_entries())
        hub_export = (
            {PROMPT, MANIFEST} <= found
            and not found - {PROMPT, MANIFEST, CONFIG, METRICS, CARD}
            and (CARD not in found or _is_our_card(exp.file(CARD)))  # a README of the user's is theirs
        )
        if found - {PROMPT, MANIFEST, CONFIG} and not hub_export:
            exp.require_run_or_empty("export target")
        for name in (METRICS, CARD) if hub_export else ():  # an earlier `export --hub`'s: stale now
            exp.file(name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(exp.file(PROMPT), lambda tmp: shutil.copyfile(prompt_path, tmp))
    exp.write_json(MANIFEST, manifest)
    src = RunDir(run_dir)
    if Path(run_dir).is_dir() and src.has_config():
        raw = src.read_config()
        prov = raw.pop("provenance", None)
        if isinstance(raw.get("data"), dict):
            raw["data"]["root"] = None
            if isinstance(raw["data"].get("dataset"), str):
                raw["data"]["dataset"] = public_name(raw["data"]["dataset"])
        if isinstance(raw.get("backbone"), dict) and raw["backbone"].get("weights"):
            raw["backbone"]["weights"] = Path(str(raw["backbone"]["weights"])).name

        text = dump_yaml(raw) + (yaml.safe_dump({"provenance": prov}, sort_keys=False) if prov else "")
        exp.write_config(text)
    return out


def _is_our_card(path: Path) -> bool:
    """``README.md`` is the model card `export --hub` writes (its front matter names the library)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return False
    front = head.split("---")[1] if head.startswith("---") and head.count("---") >= 2 else ""
    return "library_name: vlprompt" in front


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config.yaml (safe YAML) as a dict; one-line error for a damaged or crafted file."""
    return read_yaml(path, "run config")


__all__ = ["METRICS", "evaluate_run", "export_run", "load_run", "read_manifest", "read_run_config"]
