"""Train one configuration into a run directory: validate, fingerprint, lock, train, record.

Nothing is written before the request is validated (config, data set, weights, fingerprint against
what the directory already holds), so a refused command leaves no folder behind.  A complete run is
reused only when its fingerprint equals the request's; otherwise the request is refused with one
line naming the differing keys (``force`` replaces the run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from vlprompt.data import build_loader, build_transform, fewshot, read_descriptions, split_hash
from vlprompt.data import subsample as subsample_fn
from vlprompt.data.custom import public_name
from vlprompt.data.image_cache import cached_eval_loader, cached_train_dataset
from vlprompt.data.subsample import unlabelled_pool
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method
from vlprompt.run import cost as costs
from vlprompt.run.attention import measured_attention
from vlprompt.run.backbone import (
    UNTRAINED_BANNER,
    WORLD_BANNER,
    is_untrained,
    load_backbone_from,
    portable_section,
    world_mismatch,
)
from vlprompt.run.env import environment
from vlprompt.run.hub_ref import is_hub_ref
from vlprompt.run.identity import (
    describe_differences,
    differences,
    load_splits,
    request_fingerprint,
    resolve_teacher,
)
from vlprompt.run.layout import (
    CONFIG,
    FINGERPRINT,
    LOCAL,
    MANIFEST,
    METRICS,
    PROMPT,
    PROMPT_SHA256,
    SPLIT,
    RunDir,
)
from vlprompt.run.learned import learned_nothing, record_warning
from vlprompt.run.lock import RunLock
from vlprompt.run.prompt import FORMAT, FORMAT_VERSION, load_prompt, read_manifest
from vlprompt.train import distributed as ddp
from vlprompt.train.checkpoint import has_checkpoint, save_safetensors
from vlprompt.train.config import RunConfig, dump_yaml
from vlprompt.train.precision import resolve_device, resolve_precision
from vlprompt.train.trainer import fit
from vlprompt.train.zeroshot import evaluate_without_training, has_trainable_parameters
from vlprompt.utils import set_seed, sha256_file
from vlprompt.version import __version__

log = logging.getLogger(__name__)


def provenance(method: str, saw: str | None = None) -> dict[str, Any]:
    """The method's registry notes every artefact carries: ``{"reconstructed": True, "note": ...}`` for
    a reconstruction (DPL), ``{"transductive": True, ...}`` for a transductive method, else ``{}``.
    ``saw``: what the run's training saw (:func:`transductive_saw`), added for a transductive method."""
    out = get_method(method).provenance()
    if saw and out.get("transductive"):
        out["transductive_saw"] = saw
    return out


def transductive_saw(dataset: str, subsample: str, shots: int | None) -> str:
    """What a transductive run trained on, in words (the rule: ``data.subsample.unlabelled_pool``)."""
    which = "base and new classes" if subsample in ("base", "new") else "all classes"
    per = f"{shots} per class" if shots else "the full train split"
    return f"unlabelled train-split images of {public_name(dataset)} ({which}; {per}); no test image"


def run_provenance(cfg: RunConfig) -> dict[str, Any]:
    return provenance(cfg.method, transductive_saw(cfg.data.dataset, cfg.data.subsample, cfg.data.shots))


def build_teacher(cfg: RunConfig, device: Any, teacher: Any = None) -> Any:
    """The frozen teacher the method learns from (``None`` for a method without one): ``teacher`` if
    given, else ``load_prompt`` of the method's ``teacher_source`` on ``device``."""
    src = get_method(cfg.method).teacher_source(cfg.options) if cfg.options is not None else ""
    if teacher is not None or not src:
        return teacher
    return load_prompt(src, device=device)


def build_splits(cfg: RunConfig, subsample: str | None = None, fewshot_: bool = True) -> Any:
    splits = load_splits(cfg.data)
    if fewshot_ and cfg.data.shots:
        splits = fewshot(splits, cfg.data.shots, cfg.data.seed)
    return subsample_fn(splits, subsample or cfg.data.subsample)


def eval_loader(splits: Any, backbone: Any, batch_size: int, num_workers: int) -> Any:
    """The deterministic test-split loader of a run (the backbone's test transform)."""

    cached = cached_eval_loader(  # decode once per data set/split/transform, shared by every run
        splits.test, backbone.preprocess_cfg, batch_size, dataset=splits.name,
        split=f"test/{splits.subsample}", device=backbone.device, num_workers=num_workers,
    )  # fmt: skip
    if cached is not None:
        return cached
    tf = build_transform(False, **backbone.preprocess_cfg)
    return build_loader(splits.test, tf, batch_size, shuffle=False, num_workers=num_workers, seed=0)


def train_data(splits: Any, backbone: Any, cfg: RunConfig, method: Any = None) -> Any:
    """Few-shot training images decoded once (augmentation unchanged: it runs per step on the same
    pixels); the items as they are for full training splits or the frozen-feature training mode.
    ``method``: its ``train_transform`` (e.g. two views per image) replaces the backbone's."""
    if not splits.shots or cfg.train.image_features_cache == "train":
        return splits.train

    # the trainer's own training transform
    tf = (
        method.train_transform(backbone.preprocess_cfg)
        if method is not None
        else build_transform(True, **backbone.preprocess_cfg)
    )
    split = f"train/shots{splits.shots}-seed{splits.seed}/{splits.subsample}"
    ds = cached_train_dataset(
        splits.train, tf, dataset=splits.name, split=split, workers=max(1, cfg.data.num_workers)
    )
    return splits.train if ds is None else ds


def metrics_entry(
    res: dict[str, Any], *, dataset: str, subsample: str, epoch: Any, seed: Any, shots: Any, method: str
) -> dict[str, Any]:
    return {
        "dataset": public_name(dataset),  # folder:/csv: sets by name only (no machine path)
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
        **({"confusion": res["confusion_sparse"]} if "confusion_sparse" in res else {}),
    }


def record_metrics(
    run: RunDir, entry: dict[str, Any], cost: dict[str, Any] | None = None, prov: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Add an evaluation to the run's metrics.json (with the method's provenance note, ``prov`` when
    given); ``cost`` (``{"train": ...}``, run/cost.py) is merged into its top-level ``"cost"``."""
    metrics = run.write_metrics(entry)
    if prov is None:
        prov = provenance(str(entry.get("method") or "zeroshot")) if entry.get("method") else {}
    changed = False
    if prov and any(k not in metrics for k in prov):
        metrics.update(prov)
        changed = True
    if cost:
        metrics["cost"] = {**(metrics.get("cost") or {}), **cost}
        changed = True
    if changed:
        run.write_json(METRICS, metrics)
    return metrics


def check_request(cfg: RunConfig, run: RunDir, fp: dict[str, Any], *, resume: bool, force: bool) -> str:
    """``"complete"`` (reuse), ``"resume"``, ``"fresh"`` -- or a one-line refusal (nothing written)."""

    if force:
        return "fresh"
    if run.is_complete() or has_checkpoint(run.checkpoint_dir):
        run.verify()  # an edited or swapped fingerprint / config / manifest / prompt is never believed
    old = run.fingerprint()
    same = old is not None and old.get("fingerprint") == fp["fingerprint"]
    if run.is_complete():
        if same:
            return "complete"
        diffs = differences((old or {}).get("identity"), fp["identity"]) if old else differences(None, {})
        raise VlpromptError(
            f"{run} holds a complete run with other settings ({describe_differences(diffs)}); "
            "pass --force to replace it or use another --out"
        )
    if has_checkpoint(run.checkpoint_dir):
        if not resume:
            return "fresh"
        if not same:
            diffs = differences((old or {}).get("identity"), fp["identity"]) if old else differences(None, {})
            raise VlpromptError(
                f"{run} holds an interrupted run with other settings ({describe_differences(diffs)}); "
                "pass --force to start over or use another --out"
            )
        return "resume"
    return "fresh"


def train_run(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    progress: bool = True,
    backbone: Any = None,
    *,
    force: bool = False,
    stop_after_epoch: int | None = None,
    callbacks: Any = (),
    teacher: Any = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` and evaluate its own test split.

    ``teacher``: the frozen teacher (a PromptModel) of a method that learns from one, instead of
    loading the method's ``teacher_source``.

    A complete run with the same fingerprint returns its metrics at once (``status: complete``); one
    with other settings is refused unless ``force``.  With ``resume`` an interrupted run with the
    same fingerprint continues from its checkpoint.  Returns ``{"run_dir", "status":
    "trained"|"complete"|"stopped", "evaluation", "evaluations", "fingerprint"}``.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(
            "train_run takes a RunConfig: build it with resolve_config(...) or RunConfig.from_dict(...)"
        )
    run = RunDir(out_dir)
    if run.path.exists() and not run.path.is_dir():
        raise VlpromptError(f"--out {run} is a file; pass a directory")
    run.require_run_or_empty("--out")  # never write into (or clean) a user's own folder
    made = _make_dirs(run.path)  # an unwritable --out fails first; removed again if the request is refused
    try:
        return _train_run(
            cfg,
            run,
            resume=resume,
            progress=progress,
            backbone=backbone,
            force=force,
            stop_after_epoch=stop_after_epoch,
            callbacks=callbacks,
            teacher=teacher,
        )
    except BaseException as exc:
        for d in reversed(made):  # deepest first; only folders this call created and left empty
            if d.is_dir() and not any(p.name != ".lock" for p in d.iterdir()):
                shutil.rmtree(d, ignore_errors=True)
        lost = ddp.peer_lost(exc) if isinstance(exc, Exception) else None
        if lost is not None:  # a dead DDP peer: one line, not a gloo/NCCL traceback
            raise lost from None
        raise


def _make_dirs(path: Path) -> list[Path]:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _train_run(
    cfg: RunConfig,
    run: RunDir,
    *,
    resume: bool,
    progress: bool,
    backbone: Any,
    force: bool,
    stop_after_epoch: int | None,
    callbacks: Any,
    teacher: Any = None,
) -> dict[str, Any]:
    cfg = resolve_teacher(cfg)  # teachers/{dataset} -> this data set's teacher
    env = ddp.init_from_env(cfg.train.device)
    main = env.is_main
    device = ddp.rank_device(resolve_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, device).name
    fp = request_fingerprint(cfg, precision)  # loads (validates) the data set before anything is written
    decision = check_request(cfg, run, fp, resume=resume, force=force)
    if decision == "complete":
        evals = run.evaluations()
        log.info("run %s is complete with the same settings; skipping (force to retrain)", run)
        return {
            "run_dir": str(run),
            "status": "complete",
            "evaluation": evals[0] if evals else None,
            "evaluations": evals,
            "fingerprint": fp["fingerprint"],
        }
    splits = build_splits(cfg)
    pool = _unlabelled_pool(cfg) if get_method(cfg.method).transductive_note else None
    banner = backbone is None
    if backbone is None:
        backbone = load_backbone_from(cfg.backbone, device=device, banner=False)
    if decision == "fresh":
        _check_model(cfg, backbone, splits)  # a refused request (depth 12 on 9 layers) writes nothing
    lock = RunLock(run.path) if main else None
    try:
        if lock is not None:
            lock.acquire()
            decision = check_request(cfg, run, fp, resume=resume, force=force)  # re-check under the lock
            run.remove_stale_temps()
            if decision == "fresh":
                run.clear_results()
            _write_run_info(run, cfg, fp, backbone, splits, resume=decision == "resume", pool=pool)
        if banner and main and is_untrained(backbone):
            log.warning(UNTRAINED_BANNER)
        if main and world_mismatch(backbone, splits.name):
            log.warning(WORLD_BANNER)
        ddp.barrier()  # the run directory is ready (and a stale checkpoint gone) before any rank resumes
        return _train(
            cfg,
            run,
            fp,
            splits,
            backbone,
            create_model,
            fit,
            main=main,
            resume=decision == "resume",
            progress=progress,
            stop_after_epoch=stop_after_epoch,
            callbacks=callbacks,
            pool=pool,
            teacher=teacher,
        )
    finally:
        if lock is not None:
            lock.release()


def _unlabelled_pool(cfg: RunConfig) -> tuple[list[Any], list[str]]:
    """The protocol's unlabelled training images for a transductive method (train split only)."""
    return unlabelled_pool(build_splits(cfg, subsample="all"), cfg.data.subsample)


def _check_teacher_source(cfg: RunConfig) -> None:
    """A method that learns from a teacher names one that exists (before anything is written)."""
    cls = get_method(cfg.method)
    src = cls.teacher_source(cfg.options) if cfg.options is not None else ""
    needs = cls.text_from_teacher or "teacher_logits" in cls.needs
    if needs and not src:
        raise VlpromptError(
            f"method '{cfg.method}' learns from a frozen teacher; give its saved prompt with "
            "--set options.teacher=PATH (a run, an export or a prompt brought in with `vlprompt import`)"
        )
    if src:
        if not is_hub_ref(src):
            read_manifest(src)  # one line if it is not a prompt


def _check_model(cfg: RunConfig, backbone: Any, splits: Any) -> None:
    """Build the model once (RNG untouched) so that options the backbone cannot take are refused
    before anything is written (a method without trainable parameters, zero-shot CLIP, is evaluated
    without training: train/zeroshot.py)."""
    _check_teacher_source(cfg)
    with torch.random.fork_rng(devices=[]):
        model = create_model(
            cfg.method, backbone, list(splits.classnames), template=splits.template, **_options_dict(cfg)
        )
    attach_descriptions(model, cfg)  # a file missing classes is refused before anything is written
    del model


def attach_descriptions(model: Any, cfg: RunConfig) -> None:
    """Give ``model`` the run's class descriptions (``data.descriptions``), checked against its classes;
    one line when the method reads descriptions and none are given, or is given some it never reads."""
    reads = "descriptions" in model.method.needs
    path = cfg.data.descriptions
    if reads and not path:
        raise VlpromptError(
            f"method '{cfg.method}' reads class descriptions; pass --descriptions FILE (JSON class -> "
            "sentences, as CoPrompt's gpt_file/<dataset>_prompt.json, or CSV class,sentence)"
        )
    if path and not reads:
        raise VlpromptError(f"method '{cfg.method}' reads no class descriptions; drop --descriptions")
    if path:
        desc = read_descriptions(path)
        desc.for_classes(model.classnames)
        model.set_descriptions(desc)


def _write_run_info(
    run: RunDir, cfg: RunConfig, fp: dict[str, Any], backbone: Any, splits: Any, *, resume: bool = False,
    pool: Any = None,
) -> None:  # fmt: skip
    """config.yaml, fingerprint.json, env.json, split.json and local.json of a run being trained (a
    resumed run keeps the attention implementations it recorded)."""
    prov = run_provenance(cfg)
    text = dump_yaml(cfg)
    if prov:
        text += yaml.safe_dump({"provenance": prov}, sort_keys=False)
    run.write_json(FINGERPRINT, fp)  # first: it is what marks the folder as a run (RunDir.is_run)
    run.write_config(text)
    recorded = (run.env() or {}).get("attention") if resume else None
    kept = {"attention": recorded} if recorded else {}
    run.write_env(environment(str(backbone.device), {**prov, **kept}))
    run.write_json(
        SPLIT,
        {
            "dataset": public_name(splits.name),
            "split_hash": split_hash(splits),
            "shots": cfg.data.shots,
            "seed": cfg.data.seed,
            "subsample": splits.subsample,
            "classnames": list(splits.classnames),
            "counts": splits.counts(),
            "train": [d.relpath for d in splits.train],
            "val": [d.relpath for d in splits.val],
            # a transductive run: the unlabelled images it trained on (train split only, protocol's rule)
            **(
                {"unlabelled_train": [d.relpath for d in pool[0]], "unlabelled_classnames": pool[1]}
                if pool is not None
                else {}
            ),
        },
    )
    local = {
        "data_root": str(Path(cfg.data.root).resolve()) if cfg.data.root else None,
        "backbone": {"weights": str(Path(cfg.backbone.weights).resolve()) if cfg.backbone.weights else None},
    }
    run.write_json(LOCAL, local)


def _train(
    cfg: RunConfig,
    run: RunDir,
    fp: dict[str, Any],
    splits: Any,
    backbone: Any,
    create_model: Any,
    fit: Any,
    *,
    main: bool,
    resume: bool,
    progress: bool,
    stop_after_epoch: int | None,
    callbacks: Any,
    pool: Any = None,
    teacher: Any = None,
) -> dict[str, Any]:
    teacher = build_teacher(cfg, backbone.device, teacher)  # frozen, not part of the prompt
    options = _options_dict(cfg)  # the method's section, as create_model and the manifest take it
    set_seed(cfg.data.seed)  # prompt initialisation depends only on the seed
    model = create_model(
        cfg.method,
        backbone,
        list(splits.classnames) if pool is None else list(pool[1]),  # transductive: all pool classes
        template=splits.template,
        model=cfg.model,
        **options,
    )
    attach_descriptions(model, cfg)
    if teacher is not None:
        model.set_teacher(teacher)
    # attention="auto": the choices this run recorded (on resume), else the machine's measured table;
    # each new choice is written to env.json at once, so a resume after a kill reuses it
    recorded = (run.env() or {}).get("attention") if resume else None
    auto, chosen = measured_attention(
        backbone.device, recorded, on_new=(lambda rec: _record_attention(run, rec)) if main else None
    )
    model.options.attention = cfg.train.attention
    model.set_auto_attention(auto)
    loader = eval_loader(splits, backbone, cfg.train.eval_batch_size, cfg.data.num_workers)
    meter, epochs_seen = costs.Meter(backbone.device).start(), costs.EpochCounter()  # run/cost.py
    callbacks = (*callbacks, epochs_seen)
    # zero-shot CLIP: evaluated, not trained (train/zeroshot.py); a cache model is built by fit
    if not has_trainable_parameters(model) and not model.method.builds_from_data:
        fit = evaluate_without_training
    extra = {} if pool is None else {"eval_classnames": list(splits.classnames)}
    result = fit(
        model,
        # a transductive method trains on its pool: unlabelled, train split
        train_data(splits, backbone, cfg, model.method) if pool is None else pool[0],
        cfg,
        run,  # the trainer writes its log and checkpoint through the run directory
        resume=resume,
        eval_data=loader,
        progress=progress,
        stop_after_epoch=stop_after_epoch,
        callbacks=callbacks,
        **extra,
    )
    if pool is not None:
        model.set_classnames(list(splits.classnames), splits.template)  # the run's own label space
    train_cost = costs.train_cost(meter.stop(), result, epochs_seen)
    if main:  # which attention implementation "auto" used, per shape class
        _record_attention(run, chosen.record())
    if result["stopped"]:
        return {
            "run_dir": str(run),
            "status": "stopped",
            "evaluation": None,
            "evaluations": [],
            "fingerprint": fp["fingerprint"],
        }
    if not main:  # rank 0 evaluated and writes the results; report what it wrote
        ddp.barrier()
        evals = run.evaluations()
        return {
            "run_dir": str(run),
            "status": "trained",
            "evaluation": evals[-1] if evals else None,
            "evaluations": evals,
            "fingerprint": fp["fingerprint"],
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        **run_provenance(cfg),
        "options": options,
        "backbone": portable_section(cfg.backbone, backbone),
        "classnames": list(model.classnames),
        "template": model.template,
        "protocol": cfg.protocol,
        "dataset": splits.name,
        "subsample": splits.subsample,
        "shots": cfg.data.shots,
        "seed": cfg.data.seed,
        "epochs": result["epochs_done"],
        "fingerprint": fp["fingerprint"],
        "vlprompt_version": __version__,
        "trainable_parameters": result["trainable_parameters"],
    }
    save_prompt(run, model.prompt_state_dict(), manifest)
    entry = metrics_entry(
        result["eval"],
        dataset=splits.name,
        subsample=splits.subsample,
        epoch=result["epochs_done"],
        seed=cfg.data.seed,
        shots=cfg.data.shots,
        method=cfg.method,
    )
    own_eval_s = next((e["eval_s"] for e in reversed(epochs_seen.epochs) if e.get("eval_s")), None)
    entry["cost"] = costs.eval_cost(None, int(entry.get("n") or 0), own_eval_s)
    metrics = record_metrics(run, entry, cost={"train": train_cost}, prov=run_provenance(cfg))
    _check_learned(cfg, run, result, model, backbone, splits, loader, create_model)
    run.mark_done()
    ddp.barrier()  # the other ranks read metrics.json now
    return {
        "run_dir": str(run),
        "status": "trained",
        "evaluation": entry,
        "evaluations": metrics["evaluations"],
        "fingerprint": fp["fingerprint"],
    }


def _record_attention(run: RunDir, record: dict[str, Any]) -> None:
    run.write_env({**(run.env() or {}), "attention": record})


def _check_learned(cfg: RunConfig, run: RunDir, result: dict[str, Any], model: Any, backbone: Any,
                   splits: Any, loader: Any, create_model: Any) -> None:  # fmt: skip
    """Say so (log + metrics.json) when the run learned nothing (run/learned.py)."""

    def zero_shot() -> Any:
        return create_model("zeroshot", backbone, list(splits.classnames), template=splits.template)

    line = learned_nothing(result, cfg.train, model, zero_shot, loader, len(splits.train))
    if line:
        log.warning("%s: %s", run.path.name, line)
    record_warning(run, line)


def _options_dict(cfg: RunConfig) -> dict[str, Any]:
    return (
        dataclasses.asdict(cfg.options) if dataclasses.is_dataclass(cfg.options) else dict(cfg.options or {})
    )


def save_prompt(run: RunDir | str | os.PathLike, state: dict[str, Any], manifest: dict[str, Any]) -> None:
    """prompt.safetensors (manifest embedded, provenance as plain keys) + manifest.json."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise VlpromptError(f"the prompt holds non-finite values ({', '.join(bad[:3])}); nothing was written")
    manifest = {k: v for k, v in manifest.items() if k != PROMPT_SHA256}
    if isinstance(manifest.get("dataset"), str):  # folder:/csv: sets by name only (no machine path)
        manifest["dataset"] = public_name(manifest["dataset"])
    meta = {"vlprompt_manifest": json.dumps(manifest)}
    if manifest.get("reconstructed"):
        meta.update({"reconstructed": "true", "note": str(manifest.get("note", ""))})
    if manifest.get("transductive"):
        meta.update({"transductive": "true", "transductive_note": str(manifest.get("transductive_note", ""))})
        if manifest.get("transductive_saw"):
            meta["transductive_saw"] = str(manifest["transductive_saw"])
    save_safetensors(run.file(PROMPT), state, meta)
    # manifest.json = the embedded manifest + the prompt file's sha256 (checked on every read)
    run.write_json(MANIFEST, {**manifest, PROMPT_SHA256: sha256_file(run.file(PROMPT))})


__all__ = ["CONFIG", "FORMAT", "FORMAT_VERSION", "train_run", "save_prompt", "provenance", "build_splits"]
