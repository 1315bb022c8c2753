"""Multi-process (DDP) training helpers: process group from ``torchrun``'s environment, image-batch
sharding, exact gradient reduction of the prompt parameters, and class-sharded text encoding.

Design (why not ``torch.nn.parallel.DistributedDataParallel``): only the small prompt parameters learn
and the CLIP weights are frozen, so after ``backward`` the trainer all-reduces one flat buffer of the
trainable gradients. This works for every method (whatever its parameters, whichever towers they
reach), costs one collective per step, and keeps the trainer free of wrapper-module plumbing.

Semantics (chosen so that a run on W processes follows the same trajectory as a 1-process run):

* ``train.batch_size`` is the **global** batch (the recipe's): every optimisation step consumes the
  same ``batch_size`` images as a single-process run, rank ``r`` taking positions ``r, r+W, ...`` of
  that global batch (per-rank batch = global / W, uneven by at most one when W does not divide it).
* The global order is the single-process order: :func:`shard_loader` reuses the trainer's own seeded
  sampler and generator, so every rank draws the same permutation and resume restores it with the
  generator state the trainer already checkpoints (no ``DistributedSampler.set_epoch`` bookkeeping).
* ``drop_last=False``: a last, partial global batch is kept and split across ranks; only when it holds
  fewer images than there are ranks is it dropped (some rank would get none). ``drop_last=True`` drops
  every partial global batch, as in a single-process run.
* Gradients: each rank back-propagates ``loss_local * n_local / n_global`` (:func:`scale_loss`) and
  :func:`allreduce_grads` *sums*, which is exactly the gradient of the mean loss over the global batch,
  also when ranks hold different numbers of images.
* Random augmentations draw from each rank's own RNG stream, so with augmentation the trajectories
  agree in distribution, not bitwise; without augmentation they agree to float round-off.

Everything is a no-op when ``WORLD_SIZE`` is unset or 1, so the trainer calls these hooks always.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from vlprompt.engine import slice_plan
from vlprompt.errors import VlpromptError
from vlprompt.methods.model import PromptModel

log = logging.getLogger(__name__)

#: collectives wait this long (rank 0 evaluates the test set while the others wait at a barrier)
DEFAULT_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; ``world_size == 1`` means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SINGLE = DistEnv()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise VlpromptError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun"
        ) from None


def env() -> DistEnv:
    """The current process's place in the job (single-process when no process group is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _SINGLE
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        backend=str(dist.get_backend()),
    )


def init_from_env(device: str | torch.device | None = None, backend: str | None = None) -> DistEnv:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    No-op (returns a single-process :class:`DistEnv`) when WORLD_SIZE is unset or 1, and idempotent.
    The backend is ``nccl`` when training on CUDA, else ``gloo``; on CUDA each process is bound to GPU
    ``LOCAL_RANK`` (see :func:`rank_device`). Non-main ranks log warnings only, so the console shows
    one copy of every message. ``VLPROMPT_DIST_TIMEOUT`` (seconds) bounds how long collectives wait.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 and os.environ.get("VLPROMPT_DIST_FORCE") != "1":  # force: a 1-process group (GPU check)
        return _SINGLE
    if not dist.is_available():
        raise VlpromptError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if dist.is_initialized():
        return env()
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise VlpromptError(f"RANK={rank} is not in [0, {world}); launch with torchrun, which sets it")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise VlpromptError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; launch with torchrun")
    use_cuda = _wants_cuda(device)
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
    timeout = datetime.timedelta(seconds=_env_int("VLPROMPT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    if rank != 0:  # one copy of every message: the other ranks report warnings and errors only
        for name in ("", "vlprompt"):
            logger = logging.getLogger(name)
            logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    log.info("distributed: %d processes, backend %s", world, backend)
    return env()


def peer_lost(exc: BaseException) -> VlpromptError | None:
    """The one-line error for a collective that failed because another process (or node) died or
    stopped answering within ``VLPROMPT_DIST_TIMEOUT``; ``None`` for any other exception."""
    if not is_distributed():
        return None
    dist_errors = tuple(
        getattr(dist, n) for n in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(dist, n)
    )
    text = " ".join(str(exc).split())
    markers = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
               "Broken pipe", "NCCL communicator was aborted", "Socket Timeout")  # fmt: skip
    if not isinstance(exc, dist_errors) and not any(m in text for m in markers):
        return None
    e = env()
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:545]" source location
    return VlpromptError(
        f"distributed training stopped on rank {e.rank}/{e.world_size}: another process or node failed or "
        f"did not answer within {_env_int('VLPROMPT_DIST_TIMEOUT', DEFAULT_TIMEOUT_S)} s "
        f"({type(exc).__name__}: {first[:160]}); the last checkpoint is kept, rerun with --resume"
    )


def _wants_cuda(device: str | torch.device | None) -> bool:
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.cuda.is_available()
    return name.startswith("cuda")


def rank_device(device: torch.device) -> torch.device:
    """Under DDP a bare ``cuda`` (or ``cuda:0`` from ``auto``) becomes ``cuda:LOCAL_RANK``; else unchanged."""
    e = env()
    if not e.active or device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    return torch.device("cuda", e.local_rank % max(1, n))


def is_distributed() -> bool:
    return env().active


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the one process that writes files and logs."""
    return env().is_main


def barrier() -> None:
    """Wait for every rank (no-op single-process); used after rank 0 writes checkpoints or metrics."""
    if is_distributed():
        if env().backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device()) if env().backend == "nccl" else torch.device("cpu")
    )


# --------------------------------------------------------------------------------------- parameters
@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting prompts, whatever the init)."""
    if not is_distributed():
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]
    for t in tensors:
        buf = t.detach().to(_collective_device())
        dist.broadcast(buf, src=0)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)


@dataclass(frozen=True)
class BatchTotals:
    """One step's totals over every rank: images, summed loss, correct predictions."""

    n: int
    loss_sum: float
    correct: float
    loss: float  # mean over the global batch

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / max(1, self.n)


def batch_totals(loss: torch.Tensor, n: int, correct: float | torch.Tensor) -> BatchTotals:
    """Global (all-rank) image count, loss sum and correct count of this step: one small all-reduce.

    ``loss`` is this rank's mean loss over its ``n`` images. Single-process: the local numbers.
    """
    mean = float(loss.detach().float().item())
    if not is_distributed():
        return BatchTotals(int(n), mean * n, float(correct), mean)
    vec = torch.tensor([float(n), mean * n, float(correct)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(vec)
    n_all, loss_sum, corr = vec.tolist()
    return BatchTotals(int(round(n_all)), loss_sum, corr, loss_sum / max(1.0, n_all))


def scale_loss(loss: torch.Tensor, n: int, totals: BatchTotals) -> torch.Tensor:
    """The loss to back-propagate so that *summed* gradients equal the global-batch mean's gradient.

    Returns ``loss * n / totals.n`` under DDP and ``loss`` itself in a single process.
    """
    if not is_distributed():
        return loss
    return loss * (n / max(1, totals.n))


def allreduce_grads(params: Sequence[nn.Parameter] | Sequence[tuple[str, nn.Parameter]]) -> None:
    """Sum the gradients of ``params`` over all ranks through one flat buffer.

    A parameter without a gradient on some rank counts as zero there; one that has no gradient on any
    rank keeps ``grad=None`` (so the optimiser skips it, as it would in a single process). Call after
    ``backward`` of :func:`scale_loss`'s loss and before ``optimizer.step`` / ``scaler.unscale_``, so
    all ranks step identical gradients.
    """
    if not is_distributed():
        return
    ps = [p[1] if isinstance(p, tuple) else p for p in params]
    ps = [p for p in ps if p.requires_grad]
    if not ps:
        return
    dev = _collective_device()
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in ps]
    has = torch.tensor([float(p.grad is not None) for p in ps])
    flat = torch.cat([g.to(dev, torch.float32) for g in grads] + [has.to(dev)])
    dist.all_reduce(flat)
    off = 0
    for p, present in zip(ps, flat[-len(ps) :].tolist(), strict=True):
        k = p.numel()
        g = flat[off : off + k].view_as(p).to(p.device, p.dtype)
        off += k
        if present == 0:
            p.grad = None
        elif p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


# --------------------------------------------------------------------------------------- data
class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` from ``sampler``'s order; rank ``r`` yields its share ``[r::W]``.

    Iterating ``sampler`` on every rank (same seed, same generator state) gives every rank the same
    global order, hence the same global batches as a single-process ``BatchSampler``. A final global
    batch smaller than ``world_size`` is dropped (a rank would get nothing); with ``drop_last`` every
    partial one is.
    """

    def __init__(self, sampler: Any, batch_size: int, rank: int, world_size: int, drop_last: bool = False):
        if batch_size < world_size:
            raise VlpromptError(
                f"train.batch_size={batch_size} is smaller than the {world_size} processes; it is the global "
                f"batch, so use --set train.batch_size={world_size} or more, or fewer processes"
            )
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield batch[self.rank :: self.world_size]
                batch = []
        if batch and not self.drop_last and len(batch) >= self.world_size:
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.sampler)
        full, rest = divmod(n, self.batch_size)
        return full + int(bool(rest) and not self.drop_last and rest >= self.world_size)


def shard_loader(loader: DataLoader) -> DataLoader:
    """``loader`` rebuilt so each rank loads only its share of every global batch (identity single-process).

    Reuses the loader's dataset, sampler (with its seeded generator), workers and collate function;
    ``loader.batch_size`` is the global batch. The returned loader is of the same class.
    """
    e = env()
    if not e.active:
        return loader
    if loader.batch_size is None:
        raise ValueError("shard_loader needs a loader built with batch_size (not a custom batch_sampler)")
    bs = ShardedBatchSampler(loader.sampler, loader.batch_size, e.rank, e.world_size, loader.drop_last)
    if bs.batch_size % e.world_size:
        log.warning(
            "global batch %d is not divisible by %d processes: per-rank batches differ by one image",
            bs.batch_size,
            e.world_size,
        )
    return type(loader)(
        loader.dataset,
        batch_sampler=bs,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        multiprocessing_context=loader.multiprocessing_context,
        timeout=loader.timeout,
    )


# --------------------------------------------------------------------------------------- text sharding
def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of ``n`` rows owned by ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather of per-rank row blocks (uneven sizes allowed) whose backward sums the gradient over
    ranks and returns this rank's block: every rank's loss reaches the prompts of every class."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, counts: tuple[int, ...], rank: int) -> torch.Tensor:  # type: ignore[override]
        m = max(counts)
        padded = local.new_zeros((m, *local.shape[1:]))
        padded[: local.shape[0]] = local
        bufs = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(bufs, padded.contiguous())
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([b[:c] for b, c in zip(bufs, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (rank order, :func:`shard_range` sizes) with gradient."""
    e = env()
    if not e.active:
        return local
    counts = tuple(b - a for a, b in (shard_range(total, r, e.world_size) for r in range(e.world_size)))
    if local.shape[0] != counts[e.rank]:
        raise ValueError(f"rank {e.rank} holds {local.shape[0]} rows, expected {counts[e.rank]} of {total}")
    return _GatherRows.apply(local, counts, e.rank)


class ShardedText:
    """Text strategy (``PromptModel.set_text_strategy``): the class prompts split across ranks.

    Each rank runs the text tower on its contiguous ``1/W`` of the classes; the features are
    all-gathered with gradient (:func:`gather_rows`), so text-tower time and activation memory divide
    by W. Applies when a process group is up, the model is in training mode and autograd is on; for
    evaluation (``no_grad``, rank 0 alone) the full text is encoded locally, so no rank waits on a
    collective the others never join.
    """

    def encode(self, model: Any, inputs: Any) -> torch.Tensor:
        if not (model.training and torch.is_grad_enabled() and is_distributed()):
            return model.run_text(inputs.embeds, inputs.eot, inputs.plan)
        e = env()
        n = inputs.embeds.shape[0]
        s, t = shard_range(n, e.rank, e.world_size)
        if t > s:
            local = model.run_text(inputs.embeds[s:t], inputs.eot[s:t], slice_plan(inputs.plan, s, t, n))
        else:  # more ranks than classes: this rank contributes no rows
            local = inputs.embeds.new_zeros((0, model.backbone.embed_dim), dtype=torch.float32)
        return gather_rows(local, n)


def enable_text_sharding(model: nn.Module) -> bool:
    """Give ``model`` the :class:`ShardedText` strategy when a process group is up.

    Methods whose text depends on the image (CoCoOp-style) are left alone: their text work already
    splits with the image batch. Returns whether sharding was installed.
    """

    if not isinstance(model, PromptModel):
        raise TypeError(f"text sharding needs a PromptModel, got {type(model).__name__}")
    if not is_distributed():
        return False
    if model.method.image_conditioned_text:
        log.info(
            "shard_text: method '%s' conditions its text on the image; text is not sharded", model.method.name
        )
        return False
    if not isinstance(model.text_strategy, ShardedText):
        model.set_text_strategy(ShardedText())
    return True
