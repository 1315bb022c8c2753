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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlprompt.data import ImageDataset, build_loader, build_transform
from vlprompt.errors import VlpromptError
from vlprompt.train import checkpoint as ckpt
from vlprompt.train import distributed as ddp
from vlprompt.train.config import data_settings, train_settings
from vlprompt.train.evaluate import evaluate
from vlprompt.train.features import FeatureCache, feature_dataset
from vlprompt.train.files import TrainerFiles, trainer_files
from vlprompt.train.precision import make_scaler, resolve_device, resolve_precision
from vlprompt.train.progress import RunLog, progress_bar
from vlprompt.train.schedule import EpochSchedule, build_optimizer
from vlprompt.utils import set_seed, sha256_json

log = logging.getLogger(__name__)

# train keys that do not change what is computed (may differ between a run and its resume)
EXECUTION_KEYS = ("device", "eval_every_epoch", "log_every", "eval_batch_size", "shard_text")


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
    if features and is_items and not model.method.prompts_image:
        tf = build_transform(False, **model.backbone.preprocess_cfg)
        split = "train-noaug" if train else "eval"
        cache = FeatureCache.default()
        return feature_dataset(model.backbone, list(data), tf, dataset=str(dataset), split=split, cache=cache)
    if isinstance(data, Sequence) and data and hasattr(data[0], "impath"):
        return ImageDataset(list(data), build_transform(train, **model.backbone.preprocess_cfg))
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
    shapes = {n: list(p.shape) for n, p in model.trainable_parameters()}
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


def _guard_finite(
    loss: float, params: Sequence[torch.nn.Parameter], epoch: int, step: int, lr: float, precision: str
) -> None:
    """Stop a diverged run at once (no ``done``, no metrics) with one line naming where and why."""
    what = None
    if not math.isfinite(loss):
        what = f"the loss became {loss}"
    elif not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        bad = next(i for i, p in enumerate(params) if not bool(torch.isfinite(p).all()))
        what = f"prompt parameter #{bad} became non-finite"
    if what is None:
        return
    cause = f"lower train.lr (now {lr:g})"
    if precision in ("fp16", "bf16"):
        cause += " or use --set train.precision=fp32"
    raise VlpromptError(f"training diverged at epoch {epoch}, step {step}: {what}; {cause}")


def fit(
    model: torch.nn.Module,
    train_data: Any,
    cfg: Mapping[str, Any],
    out_dir: str | os.PathLike | TrainerFiles | None = None,
    resume: bool = False,
    *,
    eval_data: Any = None,
    seed: int | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    stop_after_epoch: int | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Train ``model`` (a PromptModel) on ``train_data``; checkpoints and logs go to ``out_dir``: the
    :class:`~vlprompt.train.files.TrainerFiles` the run layer hands in (its ``RunDir``), or a folder.

    Args:
        train_data: a Dataset of ``(image tensor, label)``, a DataLoader, or Datum items (the
            backbone's train transform is applied).
        cfg: a full run config (``train`` / ``data`` sections) or just its ``train`` section.
        resume: continue from ``out_dir/checkpoint`` when one exists (same config required).
        eval_data: evaluated after the last epoch (and after each one with ``train.eval_every_epoch``).
        stop_after_epoch: end after this many epochs as if killed (tests; the checkpoint stays).
        callbacks: called with each epoch's summary dict after its checkpoint is written.

    Returns ``{"epochs_done", "stopped", "history": [per-epoch summaries], "eval": metrics|None, ...}``.
    """
    train = train_settings(cfg)
    data_cfg = data_settings(cfg)
    seed = int(seed if seed is not None else data_cfg.seed)
    num_workers = int(num_workers if num_workers is not None else data_cfg.num_workers)
    epochs = train.epochs
    # DDP under torchrun (no-op otherwise): rank 0 writes and evaluates, the others wait at barriers
    main = ddp.init_from_env(train.device).is_main
    progress = progress and main
    device = ddp.rank_device(resolve_device(train.device))
    prec = resolve_precision(train.precision, device)
    out = trainer_files(out_dir)

    model.to(device)
    _check_frozen(model)
    ddp.broadcast_module(model.method)
    if train.shard_text:
        ddp.enable_text_sharding(model)
    params = [p for _, p in model.trainable_parameters()]
    not_fp32 = [n for n, p in model.trainable_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise TypeError(f"learnable parameters must be fp32 master weights: {not_fp32[:3]}")
    optimizer = build_optimizer(params, train)
    schedule = EpochSchedule(optimizer, train)
    scaler = make_scaler(prec)

    set_seed(seed)
    # image_features_cache: "off" | "eval" (exact) | "train" (also training, augmentation OFF: opt-in)
    feat_mode = train.image_features_cache
    dataset_name = data_cfg.dataset
    ds = _as_dataset(train_data, model, train=True, features=feat_mode == "train", dataset=dataset_name)
    bs = train.batch_size
    if not isinstance(ds, DataLoader) and len(ds) == 0:  # before the sampler fails on it with a traceback
        raise VlpromptError("the training split is empty; check the data set, shots and subsample")
    drop_last = not isinstance(ds, DataLoader) and len(ds) >= bs  # as the reference loader
    loader = ddp.shard_loader(_loader(ds, bs, True, seed, num_workers, drop_last))  # bs = global batch
    if len(loader) == 0:
        raise VlpromptError("the training split is empty; check the data set, shots and subsample")
    eval_loader = None
    if eval_data is not None:
        eds = _as_dataset(eval_data, model, train=False, features=feat_mode != "off", dataset=dataset_name)
        eval_loader = _loader(eds, train.eval_batch_size, False, seed, num_workers, False)

    key = _resume_key(train, seed, model)
    start_epoch, step, elapsed, history = 0, 0, 0.0, []
    state = ckpt.load_checkpoint(out.checkpoint_dir) if (resume and out is not None) else None
    if state is not None:
        if state.get("config_hash") != key:
            raise VlpromptError(
                f"checkpoint in {out.checkpoint_dir} was written with different settings; "
                "resume with the same config or start over without --resume"
            )
        model.load_prompt_state_dict({k: v.to(device) for k, v in state["prompt"].items()})
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        model.method.load_hook_state_dict(state.get("hooks") or {})
        ckpt.set_rng_state(state["rng"])
        loader.generator.set_state(state["loader_generator"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        elapsed, history = float(state.get("elapsed", 0.0)), list(state.get("history", []))
        log.info("resuming from epoch %d/%d (%s)", start_epoch, epochs, out.checkpoint_dir)
    runlog = RunLog(out if main else None, keep_epochs=start_epoch)

    log_every = train.log_every
    checked_grads = False
    stopped = False
    bar = progress_bar(
        epochs * len(loader), "train", progress, initial=start_epoch * len(loader), redirect_logs=True
    )
    for epoch in range(start_epoch, epochs):
        lr = schedule.set_epoch(epoch)
        model.train()
        t_epoch = time.perf_counter()
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        for images, labels in loader:
            t0 = time.perf_counter()
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device)
            method = model.method
            with prec.autocast():
                output = model.run(images, need=method.needs)
            loss, terms = method.objective(output, labels)  # the method's loss and its logged terms
            logits = output.logits
            n = labels.shape[0]
            correct = int((logits.detach().argmax(-1) == labels).sum())
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
                    f"training diverged at epoch {epoch + 1}, step {step + 1}: the update overflowed "
                    f"({str(e).splitlines()[0]}); lower train.lr (now {lr:g})"
                ) from None
            if not checked_grads:
                _check_frozen(model)
                checked_grads = True
            _guard_finite(batch.loss, params, epoch + 1, step + 1, lr, prec.name)
            tot_loss += batch.loss_sum
            tot_correct += int(batch.correct)
            tot_n += batch.n
            step += 1
            dt = time.perf_counter() - t0
            if step % log_every == 0:
                runlog.write(
                    {
                        "kind": "step",
                        "epoch": epoch + 1,
                        "step": step,
                        "loss": batch.loss,
                        **{f"loss_{k}": float(v.detach()) for k, v in terms.items()},  # this rank's batch
                        "acc": batch.acc,
                        "lr": lr,
                        "images_per_s": batch.n / max(dt, 1e-9),
                        "time": elapsed + time.perf_counter() - t_epoch,
                    }
                )
            bar.update(1)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{epochs}",
                loss=f"{tot_loss / tot_n:.4f}",
                acc=f"{100.0 * tot_correct / tot_n:.1f}",
                lr=f"{lr:.3g}",
                img_s=f"{tot_n / max(time.perf_counter() - t_epoch, 1e-9):.1f}",
            )
        model.method.on_epoch_end(epoch + 1, epochs)  # e.g. prompt aggregation, before eval + checkpoint
        dt_epoch = time.perf_counter() - t_epoch
        elapsed += dt_epoch
        summary: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "loss": tot_loss / max(tot_n, 1),
            "acc": 100.0 * tot_correct / max(tot_n, 1),
            "lr": lr,
            "images_per_s": tot_n / max(dt_epoch, 1e-9),
            "time": elapsed,
        }
        last = epoch + 1 == epochs
        if main and eval_loader is not None and (last or train.eval_every_epoch):
            res = evaluate(model, eval_loader, device=device, precision=prec.name, confusion=last)
            summary["eval"] = {k: res[k] for k in ("accuracy", "macro_f1", "n")}
            if last:
                summary["eval_full"] = res
        runlog.write({k: v for k, v in summary.items() if not k.startswith("eval")})
        history.append(summary)
        log.info(
            "epoch %d/%d  loss %.4f  acc %.2f  lr %.3g%s",
            epoch + 1,
            epochs,
            summary["loss"],
            summary["acc"],
            lr,
            f"  test acc {summary['eval']['accuracy']:.2f}" if "eval" in summary else "",
        )
        if out is not None and main:
            ckpt.save_checkpoint(
                out.checkpoint_dir,
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "config_hash": key,
                    "prompt": model.prompt_state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": {**schedule.state_dict(), "epoch": epoch + 1},
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": ckpt.rng_state(),
                    "loader_generator": loader.generator.get_state(),
                    "elapsed": elapsed,
                    "history": history,
                    "hooks": model.method.hook_state_dict(),  # tensors and JSON-able values only
                },
            )
        ddp.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
        for cb in callbacks:
            cb(summary)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            stopped = True
            break
    bar.close()

    final = history[-1] if history else {}
    return {
        "epochs_done": int(final.get("epoch", 0)),
        "epochs": epochs,
        "stopped": stopped,
        "history": history,
        "eval": None if stopped else final.get("eval_full"),
        "trainable_parameters": sum(p.numel() for p in params),
        "device": str(device),
        "precision": prec.name,
        "steps": step,
    }
