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

from vlprompt.data import build_loader, build_transform, split_hash, training_preprocess
from vlprompt.data.custom import public_name
from vlprompt.data.image_cache import cached_eval_loader, cached_train_dataset
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
from vlprompt.run.request import (
    ResolvedRun,
    build_splits,
    check_request,
    provenance,
    resolve_run,
)
from vlprompt.train import distributed as ddp
from vlprompt.train.checkpoint import save_safetensors
from vlprompt.train.config import RunConfig, dump_yaml
from vlprompt.train.trainer import fit
from vlprompt.train.zeroshot import evaluate_without_training, has_trainable_parameters
from vlprompt.utils import set_seed, sha256_file
from vlprompt.version import __version__

log = logging.getLogger(__name__)


def build_teacher(cfg: RunConfig, device: Any, teacher: Any = None) -> Any:
    """The frozen teacher the method learns from (``None`` for a method without one): ``teacher`` if
    given, else ``load_prompt`` of the method's ``teacher_source`` on ``device``."""
    src = get_method(cfg.method).teacher_source(cfg.options) if cfg.options is not None else ""
    if teacher is not None or not src:
        return teacher
    return load_prompt(src, device=device)


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

    # the trainer's own training transform (no flip on a data set whose labels say left or right)
    pcfg = training_preprocess(backbone.preprocess_cfg, cfg.data.dataset)
    tf = method.train_transform(pcfg) if method is not None else build_transform(True, **pcfg)
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
    # once: device/precision/rank, teacher path, fingerprint, reuse/resume/fresh, notes, splits
    req = resolve_run(cfg, run, resume=resume, force=force)
    decision = req.decision
    if decision == "complete":
        log.info("run %s is complete with the same settings; skipping (force to retrain)", run)
        evals = run.evaluations()
        return _outcome(run, req, "complete", evals[0] if evals else None, evals)
    main = req.placement.main
    banner = backbone is None
    if backbone is None:
        backbone = load_backbone_from(req.cfg.backbone, device=req.placement.device, banner=False)
    if decision == "fresh":
        _check_model(req, backbone)  # a refused request (depth 12 on 9 layers) writes nothing
    lock = RunLock(run.path) if main else None
    try:
        if lock is not None:
            lock.acquire()
            # re-checked under the lock
            decision = check_request(req.cfg, run, req.fingerprint, resume=resume, force=force)
            run.remove_stale_temps()
            if decision == "fresh":
                run.clear_results()
            _write_run_info(run, req, backbone, resume=decision == "resume")
        if banner and main and is_untrained(backbone):
            log.warning(UNTRAINED_BANNER)
        if main and world_mismatch(backbone, req.splits.name):
            log.warning(WORLD_BANNER)
        ddp.barrier()  # the run directory is ready (and a stale checkpoint gone) before any rank resumes
        return _train(
            req,
            run,
            backbone,
            resume=decision == "resume",
            progress=progress,
            stop_after_epoch=stop_after_epoch,
            callbacks=callbacks,
            teacher=teacher,
        )
    finally:
        if lock is not None:
            lock.release()


def _outcome(
    run: RunDir, req: ResolvedRun, status: str, evaluation: Any, evaluations: list[Any]
) -> dict[str, Any]:
    """What ``train_run`` returns."""
    return {
        "run_dir": str(run),
        "status": status,
        "evaluation": evaluation,
        "evaluations": evaluations,
        "fingerprint": req.id,
    }


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
    if src and not is_hub_ref(src):
        read_manifest(src)  # one line if it is not a prompt


def _check_model(req: ResolvedRun, backbone: Any) -> None:
    """Build the model once (RNG untouched) so that options the backbone cannot take are refused
    before anything is written (a method without trainable parameters, zero-shot CLIP, is evaluated
    without training: train/zeroshot.py)."""
    cfg = req.cfg
    _check_teacher_source(cfg)
    with torch.random.fork_rng(devices=[]):
        classes, template = list(req.splits.classnames), req.splits.template
        model = create_model(cfg.method, backbone, classes, template=template, **req.options)
    attach_descriptions(model, cfg.method, req.descriptions)  # a file missing classes: refused here
    del model


def attach_descriptions(model: Any, method: str, descriptions: Any) -> None:
    """Give ``model`` the run's class descriptions (``data.descriptions``), checked against its classes;
    one line when the method reads descriptions and none are given, or is given some it never reads."""
    reads = "descriptions" in model.method.needs
    if reads and descriptions is None:
        raise VlpromptError(
            f"method '{method}' reads class descriptions; pass --descriptions FILE (JSON class -> "
            "sentences, as CoPrompt's gpt_file/<dataset>_prompt.json, or CSV class,sentence)"
        )
    if descriptions is not None and not reads:
        raise VlpromptError(f"method '{method}' reads no class descriptions; drop --descriptions")
    if descriptions is not None:
        descriptions.for_classes(model.classnames)
        model.set_descriptions(descriptions)


def _write_run_info(run: RunDir, req: ResolvedRun, backbone: Any, *, resume: bool = False) -> None:
    """config.yaml, fingerprint.json, env.json, split.json and local.json of a run being trained (a
    resumed run keeps the attention implementations it recorded)."""
    cfg, splits, pool, prov = req.cfg, req.splits, req.pool, req.provenance
    text = dump_yaml(cfg)
    if prov:
        text += yaml.safe_dump({"provenance": prov}, sort_keys=False)
    run.write_json(FINGERPRINT, req.fingerprint)  # first: it marks the folder as a run (RunDir.is_run)
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


@dataclasses.dataclass
class _Trained:
    """What the training leaves for the run's record."""

    model: Any
    backbone: Any
    loader: Any  # the test split's loader (the learned-nothing check compares on it)
    result: dict[str, Any]  # fit's
    epochs: costs.EpochCounter  # the per-epoch summaries (run/cost.py)
    train_cost: dict[str, Any]
    attention: dict[str, Any]  # which implementation "auto" chose, per shape class


def _train(
    req: ResolvedRun,
    run: RunDir,
    backbone: Any,
    *,
    resume: bool,
    progress: bool,
    stop_after_epoch: int | None,
    callbacks: Any,
    teacher: Any = None,
) -> dict[str, Any]:
    """Build the model, train it (``fit`` on the resolved placement), record the run (rank 0)."""
    cfg, splits, main = req.cfg, req.splits, req.placement.main
    teacher = build_teacher(cfg, backbone.device, teacher)  # frozen, not part of the prompt
    # attention="auto": the choices this run recorded (on resume), else the machine's measured table;
    # each new choice is written to env.json at once, so a resume after a kill reuses it
    recorded = (run.env() or {}).get("attention") if resume else None
    auto, chosen = measured_attention(
        backbone.device, recorded, on_new=(lambda rec: _record_attention(run, rec)) if main else None
    )
    loader = eval_loader(splits, backbone, cfg.train.eval_batch_size, cfg.data.num_workers)
    set_seed(cfg.data.seed)  # prompt initialisation depends only on the seed
    model = create_model(
        cfg.method, backbone, req.classnames, template=splits.template, model=cfg.model, **req.options
    )
    attach_descriptions(model, cfg.method, req.descriptions)
    if teacher is not None:
        model.set_teacher(teacher)
    model.options.attention = cfg.train.attention
    model.set_auto_attention(auto)
    # a transductive method trains on its pool: unlabelled, train split
    data = train_data(splits, backbone, cfg, model.method) if req.pool is None else req.pool[0]
    meter, epochs_seen = costs.Meter(backbone.device).start(), costs.EpochCounter()  # run/cost.py
    result = _fit(
        model,
        data,
        cfg,
        run,  # the trainer writes its log and checkpoint through the run directory (TrainerFiles)
        resume=resume,
        placement=req.placement,  # resolved once, above: fit does not resolve it again
        eval_data=loader,
        progress=progress,
        stop_after_epoch=stop_after_epoch,
        callbacks=(*callbacks, epochs_seen),
        **({} if req.pool is None else {"eval_classnames": list(splits.classnames)}),
    )
    if req.pool is not None:
        model.set_classnames(list(splits.classnames), splits.template)  # the run's own label space
    train_cost = costs.train_cost(meter.stop(), result, epochs_seen)
    trained = _Trained(model, backbone, loader, result, epochs_seen, train_cost, chosen.record())
    if result["stopped"]:
        if main:
            _record_attention(run, trained.attention)
        return _outcome(run, req, "stopped", None, [])
    if not main:  # rank 0 evaluated and writes the results; report what it wrote
        ddp.barrier()
        evals = run.evaluations()
        return _outcome(run, req, "trained", evals[-1] if evals else None, evals)
    return _finish(run, req, trained)


def _fit(model: Any, data: Any, cfg: RunConfig, run: RunDir, **kw: Any) -> dict[str, Any]:
    """``fit``; zero-shot CLIP (no trainable parameters, nothing built from data) is evaluated, not
    trained (train/zeroshot.py)."""
    if not has_trainable_parameters(model) and not model.method.builds_from_data:
        return evaluate_without_training(model, data, cfg, run, **kw)
    return fit(model, data, cfg, run, **kw)


def _finish(run: RunDir, req: ResolvedRun, trained: _Trained) -> dict[str, Any]:
    """The run's record, in one pass: assembled first (manifest, metrics entry, costs, the
    learned-nothing line), then written (env.json's attention, prompt + manifest, metrics.json, done)."""
    cfg, splits, model, result = req.cfg, req.splits, trained.model, trained.result
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        **req.provenance,
        "options": req.options,
        "backbone": portable_section(cfg.backbone, trained.backbone),
        "classnames": list(model.classnames),
        "template": model.template,
        "protocol": cfg.protocol,
        "dataset": splits.name,
        "subsample": splits.subsample,
        "shots": cfg.data.shots,
        "seed": cfg.data.seed,
        "epochs": result["epochs_done"],
        "fingerprint": req.id,
        "vlprompt_version": __version__,
        "trainable_parameters": result["trainable_parameters"],
    }
    entry = metrics_entry(
        result["eval"],
        dataset=splits.name,
        subsample=splits.subsample,
        epoch=result["epochs_done"],
        seed=cfg.data.seed,
        shots=cfg.data.shots,
        method=cfg.method,
    )
    own_eval_s = next((e["eval_s"] for e in reversed(trained.epochs.epochs) if e.get("eval_s")), None)
    entry["cost"] = costs.eval_cost(None, int(entry.get("n") or 0), own_eval_s)
    learned = _learned_line(req, trained)
    if learned:
        log.warning("%s: %s", run.path.name, learned)
    _record_attention(run, trained.attention)
    save_prompt(run, model.prompt_state_dict(), manifest)
    metrics = record_metrics(run, entry, cost={"train": trained.train_cost}, prov=req.provenance)
    record_warning(run, learned)
    run.mark_done()
    ddp.barrier()  # the other ranks read metrics.json now
    return _outcome(run, req, "trained", entry, metrics["evaluations"])


def _record_attention(run: RunDir, record: dict[str, Any]) -> None:
    run.write_env({**(run.env() or {}), "attention": record})


def _learned_line(req: ResolvedRun, trained: _Trained) -> str | None:
    """The line saying the run learned nothing, or None (run/learned.py; logged, kept in metrics.json)."""
    splits, backbone = req.splits, trained.backbone

    def zero_shot() -> Any:
        return create_model("zeroshot", backbone, list(splits.classnames), template=splits.template)

    result, model, loader = trained.result, trained.model, trained.loader
    return learned_nothing(result, req.cfg.train, model, zero_shot, loader, len(splits.train))


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
