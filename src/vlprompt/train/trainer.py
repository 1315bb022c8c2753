"""The training loop: the method's objective on the model's typed output; only the prompts learn.

One loop for every method: the trainer knows no method by name; it calls the method's ``objective``
(default cross-entropy), ``backward`` and ``on_epoch_end`` hooks and checkpoints ``hook_state_dict``.
fp32 master weights, autocast per ``precision``, SGD + the reference per-epoch schedule, seeded
shuffling, evaluation of the last epoch (no model selection), a checkpoint after every epoch, and
exact resume: a killed run continued with ``resume=True`` ends with the same prompt weights and
metrics as an uninterrupted one (CPU).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlprompt.data import ImageDataset, build_loader, build_transform, training_preprocess
from vlprompt.errors import VlpromptError
from vlprompt.train import checkpoint as ckpt
from vlprompt.train import distributed as ddp
from vlprompt.train.config import ADDED_LATER, RunConfig
from vlprompt.train.evaluate import evaluate
from vlprompt.train.features import FeatureCache, feature_dataset
from vlprompt.train.files import TrainerFiles, trainer_files
from vlprompt.train.placement import Placement, resolve_placement
from vlprompt.train.precision import make_scaler
from vlprompt.train.progress import RunLog, progress_bar
from vlprompt.train.schedule import EpochSchedule, build_optimizer
from vlprompt.utils import set_seed, sha256_json

log = logging.getLogger(__name__)

# train keys that do not change what is computed (may differ between a run and its resume)
EXECUTION_KEYS = ("device", "eval_every_epoch", "log_every", "eval_batch_size", "shard_text", "attention")


def _as_dataset(
    data: Any, model: torch.nn.Module, train: bool, features: bool = False, dataset: str | None = None
) -> Dataset | DataLoader:
    """A Dataset/DataLoader as given, or Datum items wrapped with the backbone's transforms.

    ``features``: Datum items become cached frozen image features (``vlprompt.train.features``) under
    the deterministic test transform -- only for methods whose image side has no prompts.
    """
    if isinstance(data, (Dataset, DataLoader)):
        return data
    is_items = isinstance(data, Sequence) and data and hasattr(data[0], "impath")
    if features and is_items and model.method.takes_cached_image_features and model.method.views == 1:
        tf = build_transform(False, **model.backbone.preprocess_cfg)
        split = "train-noaug" if train else "eval"
        cache = FeatureCache.default()
        return feature_dataset(model.backbone, list(data), tf, dataset=str(dataset), split=split, cache=cache)
    if isinstance(data, Sequence) and data and hasattr(data[0], "impath"):
        cfg = model.backbone.preprocess_cfg  # training: the method's own (one view, or several stacked)
        tf = (  # never flipped where the data set's labels say left or right
            model.method.train_transform(training_preprocess(cfg, dataset))
            if train
            else build_transform(False, **cfg)
        )
        return ImageDataset(list(data), tf)
    if isinstance(data, Sequence):
        return list(data)  # a list of (tensor, label) pairs is a valid map-style dataset
    raise TypeError(f"cannot train on {type(data).__name__}; pass a Dataset, a DataLoader or Datum items")


def _loader(
    data: Any, batch_size: int, shuffle: bool, seed: int, num_workers: int, drop_last: bool
) -> DataLoader:
    if isinstance(data, DataLoader):
        return data

    return build_loader(data, None, batch_size, shuffle, num_workers, seed=seed, drop_last=drop_last)


def _resume_key(train: Any, seed: int, model: torch.nn.Module) -> str:
    """What must be equal for a checkpoint to continue this training."""
    t = {k: v for k, v in train.to_dict().items() if k not in EXECUTION_KEYS}
    t = {k: v for k, v in t.items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}
    shapes = {n: list(p.shape) for n, p in model.named_trainable_parameters()}
    return sha256_json({"train": t, "seed": seed, "params": shapes, "classes": list(model.classnames)})


def _backprop(
    t: torch.Tensor, retain_graph: bool = False, *, n: int, totals: Any, scaler: Any, params: list
) -> None:
    """Back-propagate ``t`` as the trainer does: DDP share scaling, AMP loss scaling, gradient sum."""
    t = ddp.scale_loss(t, n, totals)
    (scaler.scale(t) if scaler is not None else t).backward(retain_graph=retain_graph)
    ddp.allreduce_grads(params)


def _check_frozen(model: torch.nn.Module) -> None:
    leaked = [n for n, p in model.backbone.named_parameters() if p.requires_grad or p.grad is not None]
    if leaked:
        raise RuntimeError(f"CLIP weights would be trained ({leaked[:3]}); only prompt parameters may learn")


#: ours: no prompt entry of a working run comes near these (learned prompts are O(1), losses O(10));
#: beyond them a run has diverged even while every number is still finite (e.g. train.lr=1e30)
MAX_PARAM_ABS = 1e4
MAX_LOSS = 1e6


def _guard_finite(
    loss: float, params: Sequence[torch.nn.Parameter], epoch: int, step: int, lr: float, precision: str
) -> None:
    """Stop a diverged run at once (no ``done``, no metrics) with one line naming where and why."""
    what = None
    if not math.isfinite(loss):
        what = f"the loss became {loss}"
    elif abs(loss) > MAX_LOSS:
        what = f"the loss reached {loss:.3g} (> {MAX_LOSS:g})"
    elif any(p.numel() for p in params):
        peak = torch.stack(
            [p.detach().abs().amax().float() if p.numel() else p.new_zeros(()) for p in params]
        )
        ok = torch.isfinite(peak) & (peak <= MAX_PARAM_ABS)
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0])
            val = float(peak[bad])
            what = (
                f"prompt parameter #{bad} became non-finite"
                if not math.isfinite(val)
                else f"prompt parameter #{bad} reached |x| = {val:.3g} (> {MAX_PARAM_ABS:g})"
            )
    if what is None:
        return
    cause = f"lower train.lr (now {lr:g})"
    if precision in ("fp16", "bf16"):
        cause += " or use --set train.precision=fp32"
    raise VlpromptError(f"training diverged at epoch {epoch}, step {step}: {what}; {cause}")


@dataclass
class _Progress:
    """Where training stands: what a checkpoint saves and a resumed run restores besides the modules."""

    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Parts:
    """The stateful pieces of one training: restored together on resume, saved together per epoch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: EpochSchedule
    scaler: Any
    loader: DataLoader
    key: str

    def resume_point(self, files: TrainerFiles | None, device: torch.device, epochs: int) -> _Progress:
        """Where training starts: the checkpoint in ``files`` restored, else epoch 0 (``files=None``:
        not resuming)."""
        state = ckpt.load_checkpoint(files.checkpoint_dir) if files is not None else None
        if state is None:
            return _Progress()
        done = self.restore(state, files.checkpoint_dir, device, epochs)
        log.info("resuming from epoch %d/%d (%s)", done.epoch, epochs, files.checkpoint_dir)
        return done

    def state(self, progress: _Progress) -> dict[str, Any]:
        """The checkpoint of the end of epoch ``progress.epoch`` (tensors and JSON-able values)."""
        return {
            "epoch": progress.epoch,
            "step": progress.step,
            "config_hash": self.key,
            "prompt": self.model.prompt_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {**self.schedule.state_dict(), "epoch": progress.epoch},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "loader_generator": self.loader.generator.get_state(),
            "elapsed": progress.elapsed,
            "history": progress.history,
            "hooks": self.model.method.hook_state_dict(),  # tensors and JSON-able values only
        }

    def restore(self, state: dict[str, Any], where: Path, device: torch.device, epochs: int) -> _Progress:
        """Load a checkpoint written by :meth:`state` (refused when its settings differ or it is
        damaged: one line naming the file, never a traceback)."""
        if state.get("config_hash") != self.key:
            raise VlpromptError(
                f"checkpoint in {where} was written with different settings; "
                "resume with the same config or start over without --resume"
            )
        try:
            self.model.load_prompt_state_dict({k: v.to(device) for k, v in state["prompt"].items()})
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.model.method.load_hook_state_dict(state.get("hooks") or {})
            ckpt.set_rng_state(state["rng"])
            self.loader.generator.set_state(state["loader_generator"])
            done = _Progress(
                int(state["epoch"]),
                int(state["step"]),
                float(state.get("elapsed", 0.0)),
                list(state.get("history", [])),
            )
            if not 0 <= done.epoch <= epochs or done.step < 0:
                raise ValueError(f"epoch {done.epoch} of {epochs}, step {done.step}")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            what = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:80]}"
                if str(e).strip()
                else type(e).__name__
            )
            raise VlpromptError(
                f"resume checkpoint {where / ckpt.STATE} is damaged ({what}); delete "
                f"{where} or pass --force to start the run over"
            ) from None
        return done


def zero_epoch_result(evaluation: dict[str, Any] | None, device: Any, precision: str) -> dict[str, Any]:
    """What :func:`fit` returns when no epoch runs (zero-shot CLIP; a cache model built, not trained)."""
    return {
        "epochs_done": 0,
        "epochs": 0,
        "stopped": False,
        "history": [],
        "eval": evaluation,
        "trainable_parameters": 0,
        "device": str(device),
        "precision": precision,
        "steps": 0,
    }


def _training_free_result(
    model: torch.nn.Module, eval_loader: Any, device: torch.device, precision: str, main: bool
) -> dict[str, Any]:
    """What :func:`fit` returns for a method built from the training set with nothing left to train."""
    res = None
    if main and eval_loader is not None:
        res = evaluate(model, eval_loader, device=device, precision=precision, confusion=True)
    ddp.barrier()
    return zero_epoch_result(res, device, precision)


def fit(
    model: torch.nn.Module,
    train_data: Any,
    cfg: RunConfig,
    files: TrainerFiles | None = None,
    resume: bool = False,
    *,
    placement: Placement | None = None,
    eval_data: Any = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    eval_classnames: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a PromptModel) on ``train_data``.

    Args:
        train_data: a Dataset of ``(image tensor, label)``, a DataLoader, or Datum items (the
            backbone's train transform is applied).
        cfg: the run's configuration: its ``train`` section and ``data.seed`` / ``data.num_workers``
            (``RunConfig.from_dict({...}, partial=True)`` builds one for in-memory data).
        files: where the step log and the resume checkpoint go (:class:`~vlprompt.train.files.
            TrainerFiles`: the run layer hands its ``RunDir``; ``vlprompt.run.RunDir(folder)`` for a
            folder of your own); ``None`` keeps neither.
        resume: continue from ``files.checkpoint_dir`` when it holds a checkpoint (same config required).
        placement: device, precision and DDP role, resolved once by the run layer; ``None`` resolves
            them from ``cfg.train`` (library use).
        eval_data: evaluated after the last epoch (and after each one with ``train.eval_every_epoch``).
        stop_after_epoch: end after this many epochs as if killed (tests; the checkpoint stays).
        eval_classnames: the label space of ``eval_data`` when training runs on another one (a
            transductive method trains on the unlabelled images of every class, the run is tested on
            its own classes); the model's class names are switched for evaluation and back.
        callbacks: called with each epoch's summary dict after its checkpoint is written.

    Returns ``{"epochs_done", "stopped", "history": [per-epoch summaries], "eval": metrics|None, ...}``.
    """
    train, seed, epochs = cfg.train, cfg.data.seed, cfg.train.epochs
    out = trainer_files(files)
    # DDP under torchrun (no-op otherwise): rank 0 writes and evaluates, the others wait at barriers
    place = placement if placement is not None else resolve_placement(train.device, train.precision)
    device, prec, main = place.device, place.precision, place.main
    progress = progress and main

    model.to(device)
    set_seed(seed)
    loader, eval_loader, ds = _loaders(model, train_data, eval_data, cfg)
    if model.method.builds_from_data:  # e.g. a cache model: from the training set, in order, no SGD
        _build_from_data(model, ds, cfg, device, prec)
    params = _prepare_model(model, device, shard_text=train.shard_text)
    if not params and model.method.builds_from_data:  # training-free: built, evaluated, no epochs
        return _training_free_result(model, eval_loader, device, prec.name, main)
    optimizer = build_optimizer(params, train, lr_scales(model))
    schedule = EpochSchedule(optimizer, train)
    parts = _Parts(model, optimizer, schedule, make_scaler(prec), loader, _resume_key(train, seed, model))
    done = parts.resume_point(out if resume else None, device, epochs)
    runlog = RunLog(out if main else None, keep_epochs=done.epoch)
    steps = len(loader)
    bar = progress_bar(epochs * steps, "train", progress, initial=done.epoch * steps, redirect_logs=True)
    stopped = False
    for epoch in range(done.epoch, epochs):
        lr = schedule.set_epoch(epoch)
        t_epoch = time.perf_counter()
        totals = _train_epoch(parts, params, prec, device, epoch, lr, done, runlog, bar, cfg)
        model.method.on_epoch_end(epoch + 1, epochs)  # e.g. prompt aggregation, before eval + checkpoint
        dt_epoch = time.perf_counter() - t_epoch
        done.elapsed += dt_epoch
        summary = _epoch_summary(epoch, done, totals, lr, dt_epoch)
        last = epoch + 1 == epochs
        if main and eval_loader is not None and (last or train.eval_every_epoch):
            t_eval = time.perf_counter()
            res = _evaluate_on(model, eval_classnames, eval_loader, device, prec.name, last)
            summary["eval_s"] = time.perf_counter() - t_eval  # run/cost.py
            summary["eval"] = {k: res[k] for k in ("accuracy", "macro_f1", "n")}
            if last:
                summary["eval_full"] = res
        runlog.write({k: v for k, v in summary.items() if not k.startswith("eval")})
        done.history.append(summary)
        done.epoch = epoch + 1
        _log_epoch(summary, epochs)
        if out is not None and main:
            ckpt.save_checkpoint(out.checkpoint_dir, parts.state(done))
        ddp.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
        for cb in callbacks:
            cb(summary)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            stopped = True
            break
    bar.close()

    final = done.history[-1] if done.history else {}
    return {
        "epochs_done": int(final.get("epoch", 0)),
        "epochs": epochs,
        "stopped": stopped,
        "history": done.history,
        "eval": None if stopped else final.get("eval_full"),
        "trainable_parameters": sum(p.numel() for p in params),
        "device": str(device),
        "precision": prec.name,
        "steps": done.step,
    }


def _evaluate_on(
    model: Any, classnames: Sequence[str] | None, loader: Any, device: Any, precision: str, confusion: bool
) -> dict[str, Any]:
    """``evaluate`` over ``classnames`` (None: the model's own), the training label space restored."""
    before = list(model.classnames)
    if classnames is None or list(classnames) == before:
        return evaluate(model, loader, device=device, precision=precision, confusion=confusion)
    model.set_classnames(list(classnames))
    try:
        return evaluate(model, loader, device=device, precision=precision, confusion=confusion)
    finally:
        model.set_classnames(before)


def _prepare_model(model: torch.nn.Module, device: torch.device, *, shard_text: bool) -> list[nn.Parameter]:
    """Move the model, check CLIP is frozen, share rank 0's prompts; the fp32 learnable parameters."""
    model.to(device)
    _check_frozen(model)
    ddp.broadcast_module(model.method)
    if shard_text:
        ddp.enable_text_sharding(model)
    not_fp32 = [n for n, p in model.named_trainable_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise TypeError(f"learnable parameters must be fp32 master weights: {not_fp32[:3]}")
    return list(model.trainable_parameters())


def lr_scales(model: Any) -> list[float]:
    """Per trainable parameter (in ``trainable_parameters()`` order), its factor of ``train.lr``."""
    mult = model.method.lr_multipliers()
    names = [n for n, _ in model.named_trainable_parameters()]
    unknown = sorted(set(mult) - set(names))
    if unknown:
        raise VlpromptError(
            f"method '{model.method.name}' scales the lr of unknown parameter(s) {unknown[:3]}"
        )
    return [float(mult.get(n, 1.0)) for n in names]


def _loaders(model: torch.nn.Module, train_data: Any, eval_data: Any, cfg: RunConfig) -> tuple[Any, Any, Any]:
    """The (DDP-sharded) training loader, the evaluation loader (None without ``eval_data``) and the
    training data set they read."""
    train, seed, workers = cfg.train, cfg.data.seed, cfg.data.num_workers
    # image_features_cache: "off" | "eval" (exact) | "train" (also training, augmentation OFF: opt-in)
    feat_mode, name = train.image_features_cache, cfg.data.dataset
    ds = _as_dataset(train_data, model, train=True, features=feat_mode == "train", dataset=name)
    bs = train.batch_size
    if not isinstance(ds, DataLoader) and len(ds) == 0:  # before the sampler fails on it with a traceback
        raise VlpromptError("the training split is empty; check the data set, shots and subsample")
    drop_last = not isinstance(ds, DataLoader) and len(ds) >= bs  # as the reference loader
    loader = ddp.shard_loader(_loader(ds, bs, True, seed, workers, drop_last))  # bs = global batch
    if len(loader) == 0:
        raise VlpromptError("the training split is empty; check the data set, shots and subsample")
    if eval_data is None:
        return loader, None, ds
    eds = _as_dataset(eval_data, model, train=False, features=feat_mode != "off", dataset=name)
    return loader, _loader(eds, train.eval_batch_size, False, seed, workers, False), ds


def _build_from_data(
    model: torch.nn.Module, ds: Any, cfg: RunConfig, device: torch.device, prec: Any
) -> None:
    """Let a method built from the training set (``builds_from_data``) build itself: the set in order,
    under the train transform, without gradients."""
    in_order = (
        ds
        if isinstance(ds, DataLoader)
        else _loader(ds, cfg.train.batch_size, False, cfg.data.seed, cfg.data.num_workers, False)
    )
    model.eval()
    with torch.no_grad(), prec.autocast():
        model.method.build(model, in_order)
    model.method.to(device)


@dataclass
class _Totals:
    loss: float = 0.0
    correct: int = 0
    n: int = 0


def _train_epoch(
    parts: _Parts,
    params: list[nn.Parameter],
    prec: Any,
    device: torch.device,
    epoch: int,
    lr: float,
    done: _Progress,
    runlog: RunLog,
    bar: Any,
    cfg: RunConfig,
) -> _Totals:
    """One epoch of steps: the method's objective and backward, the optimiser step, the step log."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    model.train()
    t_epoch = time.perf_counter()
    tot = _Totals()
    checked_grads = False  # CLIP's weights got no gradient: checked after the epoch's first step
    for images, labels in parts.loader:
        t0 = time.perf_counter()
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device)
        method = model.method
        with prec.autocast():
            output = model.run(images, need=method.needs)
        loss, terms = method.objective(output, labels)  # the method's loss and its logged terms
        n = labels.shape[0]
        correct = int((output.logits.detach().argmax(-1) == labels).sum())
        batch = ddp.batch_totals(loss, n, correct)  # all ranks' totals (this rank's when single)
        optimizer.zero_grad(set_to_none=True)
        backprop = functools.partial(_backprop, n=n, totals=batch, scaler=scaler, params=params)
        try:
            method.backward(loss, terms, params, backprop)  # default: backprop(loss)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        except RuntimeError as e:  # e.g. an lr that does not fit the parameters' dtype
            if "overflow" not in str(e):
                raise
            raise VlpromptError(
                f"training diverged at epoch {epoch + 1}, step {done.step + 1}: the update overflowed "
                f"({str(e).splitlines()[0]}); lower train.lr (now {lr:g})"
            ) from None
        if not checked_grads:
            _check_frozen(model)
            checked_grads = True
        _guard_finite(batch.loss, params, epoch + 1, done.step + 1, lr, prec.name)
        tot.loss += batch.loss_sum
        tot.correct += int(batch.correct)
        tot.n += batch.n
        done.step += 1
        dt = time.perf_counter() - t0
        if done.step % cfg.train.log_every == 0:
            runlog.write(
                {
                    "kind": "step",
                    "epoch": epoch + 1,
                    "step": done.step,
                    "loss": batch.loss,
                    **{f"loss_{k}": float(v.detach()) for k, v in terms.items()},  # this rank's batch
                    "acc": batch.acc,
                    "lr": lr,
                    "images_per_s": batch.n / max(dt, 1e-9),
                    "time": done.elapsed + time.perf_counter() - t_epoch,
                }
            )
        bar.update(1)
        bar.set_postfix(
            epoch=f"{epoch + 1}/{cfg.train.epochs}",
            loss=f"{tot.loss / tot.n:.4f}",
            acc=f"{100.0 * tot.correct / tot.n:.1f}",
            lr=f"{lr:.3g}",
            img_s=f"{tot.n / max(time.perf_counter() - t_epoch, 1e-9):.1f}",
        )
    return tot


def _epoch_summary(epoch: int, done: _Progress, tot: _Totals, lr: float, dt_epoch: float) -> dict[str, Any]:
    return {
        "kind": "epoch",
        "epoch": epoch + 1,
        "step": done.step,
        "loss": tot.loss / max(tot.n, 1),
        "acc": 100.0 * tot.correct / max(tot.n, 1),
        "lr": lr,
        "images_per_s": tot.n / max(dt_epoch, 1e-9),
        "time": done.elapsed,
        "images": tot.n,  # images seen this epoch (all ranks): run/cost.py
    }


def _log_epoch(summary: dict[str, Any], epochs: int) -> None:
    log.info(
        "epoch %d/%d  loss %.4f  acc %.2f  lr %.3g%s",
        summary["epoch"],
        epochs,
        summary["loss"],
        summary["acc"],
        summary["lr"],
        f"  test acc {summary['eval']['accuracy']:.2f}" if "eval" in summary else "",
    )
