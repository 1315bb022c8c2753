"""The run directory: train one configuration, evaluate it, load it back, export it.

A run directory holds ``config.yaml`` (fully resolved), ``env.json``, ``split.json``, ``metrics.json``,
``log.jsonl``/``log.csv``, ``prompt.safetensors`` + ``manifest.json`` (what :func:`load_run` needs),
``checkpoint/`` (resume state) and ``done``, written last: a directory with ``done`` is complete and is
never retrained unless forced.  Reports are built from these files only.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write_json, atomic_write_text, set_seed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROMPT = "prompt.safetensors"
METRICS = "metrics.json"
DONE = "done"
FORMAT = "vlprompt-prompt"
FORMAT_VERSION = 1
UNTRAINED_BANNER = "untrained weights: pipeline check only, accuracy is chance"


# ----------------------------------------------------------------------------------------- helpers
def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions, git revision, device and host: enough to tell two runs' setups apart."""
    import open_clip
    import torch

    import vlprompt

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", None),
        "vlprompt": vlprompt.__version__,
        "git_revision": _git_revision(),
        "device": device,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if (device or "").startswith("cuda") else None,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


def _load_backbone_from(section: Mapping[str, Any], device: Any = None):
    from vlprompt.backbones import load_backbone

    name, tag, weights = section.get("name"), section.get("pretrained"), section.get("weights")
    if weights and not Path(weights).is_file():
        raise VlpromptError(
            f"backbone weights file not found: {weights}; pass --weights PATH to a local copy"
        )
    bb = load_backbone(name, pretrained=weights or tag, device=device)
    if not weights and not tag:
        log.warning(UNTRAINED_BANNER)
    return bb


def _backbone_section(backbone) -> dict[str, Any]:
    src = backbone.meta.get("source")
    tag = (
        backbone.pretrained if backbone.pretrained and not os.path.exists(str(backbone.pretrained)) else None
    )
    weights = str(Path(src).resolve()) if src and src != "random-init" and os.path.exists(str(src)) else None
    return {"name": backbone.name, "pretrained": tag, "weights": weights if tag is None else None}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise VlpromptError(
            f"cannot read {path} ({type(e).__name__}); the run directory is damaged"
        ) from None


def _build_splits(data: Mapping[str, Any], subsample: str | None = None, fewshot_: bool = True):
    from vlprompt.data import fewshot, get_dataset
    from vlprompt.data import subsample as subsample_fn

    splits = get_dataset(data["dataset"], data.get("root"), skip_bad=bool(data.get("skip_bad", False)))
    if fewshot_ and data.get("shots"):
        splits = fewshot(splits, int(data["shots"]), int(data.get("seed", 1)))
    return subsample_fn(splits, subsample or data.get("subsample", "all"))


def _eval_loader(splits, backbone, batch_size: int, num_workers: int):
    from vlprompt.data import build_loader, build_transform
    from vlprompt.data.image_cache import cached_eval_loader

    cached = cached_eval_loader(  # decode once per data set/split/transform, shared by every run
        splits.test, backbone.preprocess_cfg, batch_size, dataset=splits.name,
        split=f"test/{splits.subsample}", device=backbone.device, num_workers=num_workers,
    )  # fmt: skip
    if cached is not None:
        return cached
    tf = build_transform(False, **backbone.preprocess_cfg)
    return build_loader(splits.test, tf, batch_size, shuffle=False, num_workers=num_workers, seed=0)


def _train_data(splits, backbone, train: Mapping[str, Any], num_workers: int):
    """Few-shot training images decoded once (augmentation unchanged: it runs per step on the same
    pixels); the items as they are for full training splits or the frozen-feature training mode."""
    if not splits.shots or str(train.get("image_features_cache", "off")) == "train":
        return splits.train
    from vlprompt.data import build_transform
    from vlprompt.data.image_cache import cached_train_dataset

    tf = build_transform(True, **backbone.preprocess_cfg)  # the trainer's own training transform
    split = f"train/shots{splits.shots}-seed{splits.seed}/{splits.subsample}"
    ds = cached_train_dataset(splits.train, tf, dataset=splits.name, split=split, workers=max(1, num_workers))
    return splits.train if ds is None else ds


def _entry(res: Mapping[str, Any], *, dataset, subsample, epoch, seed, shots, method) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "subsample": subsample,
        "split": "test",
        "epoch": epoch,
        "accuracy": res["accuracy"],
        "macro_f1": res["macro_f1"],
        "per_class_accuracy": res["per_class_accuracy"],
        "n": res["n"],
        "n_classes": res["n_classes"],
        "seed": seed,
        "shots": shots,
        "method": method,
    }


def _write_metrics(run_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` to metrics.json, replacing an entry for the same (dataset, subsample)."""
    path = run_dir / METRICS
    metrics = _read_json(path) if path.is_file() else {"evaluations": []}
    evals = [
        e
        for e in metrics.get("evaluations", [])
        if (e.get("dataset"), e.get("subsample")) != (entry["dataset"], entry["subsample"])
    ]
    evals.append(entry)
    metrics["evaluations"] = evals
    atomic_write_json(path, metrics)
    return metrics


def is_complete(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).is_file()


# ----------------------------------------------------------------------------------------- train
def _write_run_info(
    out: Path, config_text: str, backbone: Any, splits: Any, data: Mapping[str, Any], seed: int
) -> None:
    """config.yaml, env.json and split.json of a run being trained."""
    from vlprompt.data import split_hash

    atomic_write_text(out / "config.yaml", config_text)
    atomic_write_json(out / "env.json", environment(str(backbone.device)))
    atomic_write_json(
        out / "split.json",
        {
            "dataset": splits.name,
            "split_hash": split_hash(splits),
            "shots": data["shots"],
            "seed": seed,
            "subsample": splits.subsample,
            "classnames": list(splits.classnames),
            "counts": splits.counts(),
            "train": [d.relpath for d in splits.train],
            "val": [d.relpath for d in splits.val],
        },
    )


def train_run(
    cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    resume: bool = True,
    progress: bool = True,
    backbone: Any = None,
    *,
    force: bool = False,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` (from ``resolve_config``) into ``out_dir`` and evaluate its own test split.

    A complete run (``done`` present) returns its metrics immediately unless ``force``.  With ``resume``
    an interrupted run continues from its checkpoint (same config required); otherwise it starts over.
    Returns ``{"run_dir", "status": "trained"|"complete"|"stopped", "evaluation", "evaluations"}``.
    """
    import shutil

    from vlprompt.methods import create_model
    from vlprompt.train import checkpoint as ckpt
    from vlprompt.train.config import dump_yaml, validate_config
    from vlprompt.train.trainer import fit

    cfg = json.loads(json.dumps(dict(cfg)))  # a plain, detached copy
    validate_config(cfg)
    out = Path(out_dir)
    if is_complete(out) and not force:
        metrics = _read_json(out / METRICS)
        evals = metrics.get("evaluations", [])
        log.info("run %s is complete; skipping (force to retrain)", out)
        return {
            "run_dir": str(out),
            "status": "complete",
            "evaluation": evals[0] if evals else None,
            "evaluations": evals,
        }
    out.mkdir(parents=True, exist_ok=True)
    config_text = dump_yaml(cfg)
    old = out / "config.yaml"
    if (
        resume
        and not force
        and old.is_file()
        and (out / ckpt.CKPT_DIR).is_dir()
        and old.read_text() != config_text
    ):
        import yaml

        prev = yaml.safe_load(old.read_text()) or {}
        if {k: v for k, v in prev.items() if k != "train"} != {k: v for k, v in cfg.items() if k != "train"}:
            raise VlpromptError(
                f"{out} holds a run with a different config; use another --out or train without --resume"
            )
    from vlprompt.train import distributed as ddp

    # under torchrun (no-op otherwise) every rank trains; rank 0 alone writes the run directory
    main = ddp.init_from_env(cfg["train"].get("device", "auto")).is_main
    if (force or not resume) and main:
        for name in (DONE, METRICS, PROMPT, MANIFEST):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / ckpt.CKPT_DIR, ignore_errors=True)

    data, train = cfg["data"], cfg["train"]
    seed = int(data["seed"])
    set_seed(seed)
    splits = _build_splits(data)
    if backbone is None:
        from vlprompt.train.precision import resolve_device

        device = ddp.rank_device(resolve_device(train.get("device", "auto")))
        backbone = _load_backbone_from(cfg["backbone"], device=device)
    if main:
        _write_run_info(out, config_text, backbone, splits, data, seed)
    ddp.barrier()  # the run directory is ready (and a stale checkpoint gone) before any rank resumes

    set_seed(seed)  # prompt initialisation depends only on the seed
    model = create_model(
        cfg["method"], backbone, list(splits.classnames), template=splits.template, **cfg["options"]
    )
    eval_loader = _eval_loader(
        splits, backbone, int(train["eval_batch_size"]), int(data.get("num_workers", 0))
    )
    result = fit(
        model,
        _train_data(splits, backbone, train, int(data.get("num_workers", 0))),
        cfg,
        out,
        resume=resume and not force,
        eval_data=eval_loader,
        progress=progress,
        stop_after_epoch=stop_after_epoch,
    )
    if main:  # which attention implementation "auto" measured and used, per shape class
        from vlprompt.engine import attention_choices

        env = {**_read_json(out / "env.json"), "attention": attention_choices()}
        atomic_write_json(out / "env.json", env)
    if result["stopped"]:
        return {"run_dir": str(out), "status": "stopped", "evaluation": None, "evaluations": []}
    if not main:  # rank 0 evaluated and writes the results; report what it wrote
        ddp.barrier()
        evals = _read_json(out / METRICS).get("evaluations", [])
        last = evals[-1] if evals else None
        return {"run_dir": str(out), "status": "trained", "evaluation": last, "evaluations": evals}

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": cfg["method"],
        "options": cfg["options"],
        "backbone": {**_backbone_section(backbone), **{k: v for k, v in cfg["backbone"].items() if v}},
        "classnames": list(model.classnames),
        "template": model.template,
        "protocol": cfg.get("protocol"),
        "dataset": splits.name,
        "subsample": splits.subsample,
        "shots": data["shots"],
        "seed": seed,
        "epochs": result["epochs_done"],
        "vlprompt_version": _version(),
        "trainable_parameters": result["trainable_parameters"],
    }
    _save_prompt(out, model, manifest)
    entry = _entry(
        result["eval"],
        dataset=splits.name,
        subsample=splits.subsample,
        epoch=result["epochs_done"],
        seed=seed,
        shots=data["shots"],
        method=cfg["method"],
    )
    metrics = _write_metrics(out, entry)
    atomic_write_text(out / DONE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    ddp.barrier()  # the other ranks read metrics.json now
    return {
        "run_dir": str(out),
        "status": "trained",
        "evaluation": entry,
        "evaluations": metrics["evaluations"],
    }


def _version() -> str:
    import vlprompt

    return vlprompt.__version__


def _save_prompt(out: Path, model: Any, manifest: dict[str, Any]) -> None:
    from vlprompt.train.checkpoint import save_safetensors

    save_safetensors(out / PROMPT, model.prompt_state_dict(), {"vlprompt_manifest": json.dumps(manifest)})
    atomic_write_json(out / MANIFEST, manifest)


# ----------------------------------------------------------------------------------------- load / eval
def _read_manifest(path: Path) -> tuple[dict[str, Any], Path]:
    """``(manifest, prompt file)`` of a run/export directory or a single prompt ``.safetensors``."""
    if path.is_file() and path.suffix == ".safetensors":
        from vlprompt.train.checkpoint import load_safetensors

        _, meta = load_safetensors(path)
        if "vlprompt_manifest" not in meta:
            raise VlpromptError(f"{path} carries no vlprompt manifest; pass the run directory instead")
        return json.loads(meta["vlprompt_manifest"]), path
    if not path.is_dir():
        raise VlpromptError(f"run not found: {path}; pass a run directory written by `vlprompt train`")
    man, prm = path / MANIFEST, path / PROMPT
    if not man.is_file() or not prm.is_file():
        missing = PROMPT if not prm.is_file() else MANIFEST
        raise VlpromptError(
            f"{path} has no {missing} (run not finished or not a run directory); finish it with "
            "`vlprompt train ... --resume` or pass a complete run"
        )
    manifest = _read_json(man)
    if manifest.get("format") != FORMAT:
        raise VlpromptError(f"{man} is not a vlprompt prompt manifest (format {manifest.get('format')!r})")
    return manifest, prm


def load_run(path: str | os.PathLike, backbone: Any = None, device: Any = None):
    """The trained PromptModel of a run or export (classnames = training classes).

    The backbone is loaded from the manifest (name + tag or weights file) unless given;
    ``model.predict(images, classnames)`` works with new classes.
    """
    from vlprompt.methods import create_model
    from vlprompt.train.checkpoint import load_safetensors
    from vlprompt.train.precision import resolve_device

    manifest, prompt_path = _read_manifest(Path(path))
    device = (
        resolve_device(device)
        if device is not None
        else (None if backbone is not None else resolve_device("auto"))
    )
    if backbone is None:
        backbone = _load_backbone_from(manifest["backbone"], device=device)
    elif device is not None:
        backbone = backbone.to(device)
    model = create_model(
        manifest["method"],
        backbone,
        list(manifest["classnames"]),
        template=manifest.get("template"),
        **manifest["options"],
    )
    state, _ = load_safetensors(prompt_path)
    try:
        model.load_prompt_state_dict({k: v.to(backbone.device) for k, v in state.items()})
    except RuntimeError as e:  # shape mismatch: a different backbone than the one it was trained on
        raise VlpromptError(
            f"prompt in {prompt_path} does not fit this backbone ({str(e).splitlines()[-1].strip()[:120]}); "
            f"use the run's backbone {manifest['backbone'].get('name')}"
        ) from None
    model.eval()
    model.manifest = manifest
    return model


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
) -> dict[str, Any]:
    """Evaluate a trained run on a data set's test split and record it in the run's metrics.json.

    ``dataset`` defaults to the run's own (``root`` then defaults to the run's root too); ``subsample``
    defaults to ``new`` for a run trained on base classes and ``all`` otherwise.  Class names and the
    template come from the evaluated data set.  Returns the metrics entry.
    """
    from vlprompt.train.evaluate import evaluate
    from vlprompt.train.precision import resolve_device

    run = Path(run_dir)
    manifest, _ = _read_manifest(run)
    cfg: dict[str, Any] = {}
    if (run / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    data_cfg = dict(cfg.get("data") or {})
    train = dict(cfg.get("train") or {})
    own = dataset is None or dataset == manifest.get("dataset") or dataset == data_cfg.get("dataset")
    if subsample is None:
        subsample = "new" if (own and manifest.get("subsample") == "base") else "all"
    if own:
        dataset = data_cfg.get("dataset") or manifest["dataset"]
        root = root if root is not None else data_cfg.get("root")
    dev = resolve_device(device or train.get("device", "auto"))
    model = load_run(run, backbone=backbone, device=dev)
    if skip_bad is None:
        skip_bad = bool(data_cfg.get("skip_bad", False))
    eval_data = {"dataset": dataset, "root": root, "skip_bad": skip_bad}
    splits = _build_splits(eval_data, subsample=subsample, fewshot_=False)
    model.set_classnames(list(splits.classnames), splits.template)
    loader = _eval_loader(
        splits,
        model.backbone,
        int(batch_size or train.get("eval_batch_size", 100)),
        int(num_workers if num_workers is not None else data_cfg.get("num_workers", 0) or 0),
    )
    res = evaluate(model, loader, device=dev, precision=train.get("precision", "auto"))
    entry = _entry(
        res,
        dataset=splits.name,
        subsample=subsample,
        epoch=manifest.get("epochs"),
        seed=manifest.get("seed"),
        shots=manifest.get("shots"),
        method=manifest["method"],
    )
    if run.is_dir():
        _write_metrics(run, entry)
    return entry


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy the learned prompt (safetensors, manifest embedded) + manifest.json to ``out_dir``."""
    import shutil

    manifest, prompt_path = _read_manifest(Path(run_dir))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlpromptError(f"export target {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    from vlprompt.utils import atomic_write

    atomic_write(out / PROMPT, lambda tmp: shutil.copyfile(prompt_path, tmp))
    atomic_write_json(out / MANIFEST, manifest)
    cfg = Path(run_dir) / "config.yaml"
    if cfg.is_file():
        atomic_write_text(out / "config.yaml", cfg.read_text())
    return out
