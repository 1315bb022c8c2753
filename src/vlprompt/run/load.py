"""Use a finished run: load its prompt, evaluate it on a data set, export it for sharing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from vlprompt.backbones import load_backbone
from vlprompt.data.custom import public_name
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.run import cost as costs
from vlprompt.run.attention import measured_attention
from vlprompt.run.backbone import backbone_for_manifest, check_weights
from vlprompt.run.hub_ref import download, is_hub_ref
from vlprompt.run.layout import CONFIG, MANIFEST, METRICS, PROMPT, RunDir, read_json
from vlprompt.run.lock import RunLock
from vlprompt.run.train import FORMAT, build_splits, eval_loader, metrics_entry, record_metrics
from vlprompt.train.checkpoint import load_safetensors
from vlprompt.train.config import RunConfig, dump_yaml, read_yaml
from vlprompt.train.evaluate import evaluate
from vlprompt.train.precision import resolve_device
from vlprompt.utils import atomic_write

log = logging.getLogger(__name__)


def read_manifest(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """``(manifest, prompt file)`` of a run/export directory or a single prompt ``.safetensors``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        _, meta = load_safetensors(path)
        if "vlprompt_manifest" not in meta:
            raise VlpromptError(f"{path} carries no vlprompt manifest; pass the run directory instead")
        try:
            return json.loads(meta["vlprompt_manifest"]), path
        except json.JSONDecodeError:
            raise VlpromptError(f"{path} has a damaged manifest; re-export the prompt") from None
    if not path.is_dir():
        raise VlpromptError(f"run not found: {path}; pass a run directory written by `vlprompt train`")
    man, prm = path / MANIFEST, path / PROMPT
    if not man.is_file() or not prm.is_file():
        raise VlpromptError(_not_a_prompt(path, PROMPT if not prm.is_file() else MANIFEST))
    manifest = read_json(man)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VlpromptError(f"{man} is not a vlprompt prompt manifest; pass a run or an exported prompt")
    RunDir(path).verify()  # manifest.json, prompt bytes, fingerprint and config agree (one line if not)
    return manifest, prm


def _not_a_prompt(path: Path, missing: str) -> str:
    """The right advice for a folder without a prompt: a grid folder, an unfinished run, or neither."""
    if (path / CONFIG).is_file():
        return (
            f"{path} has no {missing} (the run did not finish); finish it with `vlprompt train ... --resume` "
            "(or `vlprompt run` again for a grid) or pass a complete run"
        )
    below = sorted(p.parent for p in path.rglob(PROMPT) if (p.parent / MANIFEST).is_file())
    if below:
        return (
            f"{path} is a folder of {len(below)} run(s), not one run; pass one run directory, e.g. {below[0]}"
        )
    return f"{path} is not a run directory (no {missing}); pass a run written by `vlprompt train`"


def load_run(
    path: str | os.PathLike, backbone: Any = None, device: Any = None, *, weights: str | None = None
):
    """The trained PromptModel of a run or export (classnames = training classes).

    The backbone is ``backbone`` if given, else loaded from ``weights`` (your copy of the weights
    file; its sha256 is checked against the one the prompt was trained with), else from the
    manifest (name + tag, or the weights path recorded on this machine).
    ``model.predict(images, classnames)`` works with new classes.
    """
    if is_hub_ref(path):  # hf-hub:org/name[@rev]: the Hub's copy, through its cache
        path = download(str(path))
    manifest, prompt_path = read_manifest(path)
    local = RunDir(path).local() if Path(path).is_dir() else {}
    device = (
        resolve_device(device)
        if device is not None
        else (None if backbone is not None else resolve_device("auto"))
    )
    if backbone is None:
        backbone = backbone_for_manifest(manifest, local, weights, device)
    else:
        src = (backbone.meta or {}).get("source")
        want = (manifest.get("backbone") or {}).get("weights_sha256")
        if want and src and Path(str(src)).is_file():
            check_weights(str(src), want, (manifest.get("backbone") or {}).get("weights_file"))
        if device is not None:
            backbone = backbone.to(device)
    try:
        model = create_model(
            manifest["method"],
            backbone,
            list(manifest["classnames"]),
            template=manifest.get("template"),
            **manifest["options"],
        )
    except KeyError as e:
        raise VlpromptError(f"manifest of {path} lacks '{e.args[0]}'; re-export the prompt") from None
    state, _ = load_safetensors(prompt_path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise VlpromptError(
            f"prompt in {prompt_path} holds non-finite values ({', '.join(bad[:3])}); it is damaged -- "
            "retrain, re-export or re-import it"
        )
    try:
        model.load_prompt_state_dict({k: v.to(backbone.device) for k, v in state.items()})
    except RuntimeError as e:  # shape mismatch: a different backbone than the one it was trained on
        detail = str(e).strip().splitlines()[-1].strip()
        raise VlpromptError(
            f"prompt in {prompt_path} does not fit this backbone ({detail}); use the run's backbone "
            f"{(manifest.get('backbone') or {}).get('name')}"
        ) from None
    recorded = None
    if Path(path).is_dir():  # a run: evaluate with the attention implementations it trained with
        with contextlib.suppress(VlpromptError):
            recorded = (RunDir(path).env() or {}).get("attention")
    model.set_auto_attention(measured_attention(backbone.device, recorded)[0])
    model.eval()
    model.manifest = manifest
    return model


def load_prompt(
    path_or_run: str | os.PathLike,
    backbone: Any = None,
    device: Any = None,
    *,
    weights: str | None = None,
) -> Any:
    """The PromptModel of a run directory, an export, a ``prompt.safetensors`` or an imported prompt
    (``vlprompt.load_prompt``: the one way to load a prompt).

    ``backbone``: a loaded :class:`Backbone` (or an open_clip name / weights file) to use instead of
    the one the manifest records; ``weights``: your copy of the weights file the prompt was trained
    with (its sha256 is checked against the manifest's).
    """
    if isinstance(backbone, (str, os.PathLike)):
        backbone = load_backbone(str(backbone), device=device)
    return load_run(path_or_run, backbone=backbone, device=device, weights=weights)


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
    elif set(exp.foreign_entries()) - {PROMPT, MANIFEST, CONFIG}:
        exp.require_run_or_empty("export target")
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


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config.yaml (safe YAML) as a dict; one-line error for a damaged or crafted file."""
    return read_yaml(path, "run config")


__all__ = ["METRICS", "evaluate_run", "export_run", "load_run", "read_manifest", "read_run_config"]
