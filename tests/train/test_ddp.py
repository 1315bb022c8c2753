"""DDP: batch sharding semantics, exact gradient reduction, class-sharded text encoding, and a
2-process gloo training run that ends with the prompt weights of the 1-process run (same global batch)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from vlprompt.errors import VlpromptError
from vlprompt.run import RunDir
from vlprompt.train import distributed as D
from vlprompt.train.config import RunConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------- pure
@pytest.mark.parametrize(
    "n,batch,world,drop_last",
    [(10, 4, 2, False), (11, 6, 3, False), (13, 4, 2, True), (9, 4, 3, False), (9, 5, 2, False)],
)
def test_sharded_batches_partition_the_single_process_batches(n, batch, world, drop_last):
    single = list(BatchSampler(SequentialSampler(range(n)), batch, drop_last))
    shards = [
        list(D.ShardedBatchSampler(SequentialSampler(range(n)), batch, r, world, drop_last))
        for r in range(world)
    ]
    lens = {
        len(D.ShardedBatchSampler(SequentialSampler(range(n)), batch, r, world, drop_last))
        for r in range(world)
    }
    assert lens == {len(shards[0])}  # every rank takes the same number of steps (no collective deadlock)
    assert all(len(s) == len(shards[0]) for s in shards)
    # a last global batch with fewer images than ranks is the only thing ever dropped
    expect = [b for b in single if len(b) >= world]
    assert len(shards[0]) == len(expect)
    for k, global_batch in enumerate(expect):
        got = sorted(i for s in shards for i in s[k])
        assert got == sorted(global_batch)
        assert shards[0][k] == global_batch[0::world]


def test_sharded_order_follows_the_seeded_generator_like_a_single_process_loader():
    def order(world):
        g = torch.Generator().manual_seed(7)
        sampler = RandomSampler(range(20), generator=g)
        per_rank = []
        for r in range(world):
            g.manual_seed(7)
            per_rank.append(list(D.ShardedBatchSampler(sampler, 8, r, world)))
        return per_rank

    one, two = order(1)[0], order(2)
    assert [sorted(a + b) for a, b in zip(two[0], two[1], strict=True)] == [sorted(b) for b in one]


def test_batch_smaller_than_world_is_a_clear_error():
    with pytest.raises(VlpromptError, match="global batch"):
        D.ShardedBatchSampler(range(10), 2, 0, 4)


def test_shard_range_covers_all_rows():
    for n in (0, 1, 5, 8):
        for w in (1, 2, 3):
            spans = [D.shard_range(n, r, w) for r in range(w)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_single_process_hooks_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env() == D.DistEnv()
    assert D.is_main() and not D.is_distributed()
    loss = torch.tensor(2.0, requires_grad=True)
    tot = D.batch_totals(loss, 4, 3)
    assert (tot.n, tot.loss, tot.acc) == (4, 2.0, 75.0)
    assert D.scale_loss(loss, 4, tot) is loss
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 0.5)
    D.allreduce_grads([p])
    assert torch.equal(p.grad, torch.full((3,), 0.5))
    D.barrier()


def test_init_from_env_names_missing_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(VlpromptError, match="MASTER_ADDR"):
        D.init_from_env("cpu")


# ------------------------------------------------------------------------- sharded text, 2 processes
CLASSES = ["cat", "dog", "car", "tree", "boat"]  # 5 classes: uneven shards (3 + 2)


def _recording(fn, rows: list[int]):
    """``fn`` (PromptModel.run_text) that also records how many sequences each call encodes."""

    def run(embeds, *args, **kwargs):
        rows.append(embeds.shape[0])
        return fn(embeds, *args, **kwargs)

    return run


METHODS = [("coop", {"n_ctx": 4}), ("mpl", {"depth": 2, "n_ctx": 1, "ctx_init": "X"})]


def _text_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.nn.functional as F

    from vlprompt.backbones import load_backbone
    from vlprompt.methods import create_model

    _dist_env(rank, world, port)
    D.init_from_env("cpu")
    try:
        torch.manual_seed(0)
        backbone = load_backbone("vlp-tiny")
        g = torch.Generator().manual_seed(1)
        x = torch.randn(6, 3, 224, 224, generator=g)
        y = torch.tensor([0, 1, 2, 3, 4, 0])
        results = {}
        for method, options in METHODS:
            torch.manual_seed(0)
            model = create_model(method, backbone, CLASSES, **options)
            D.broadcast_module(model.method)
            model.train()
            params = [p for p in model.trainable_parameters()]

            # reference: the whole batch and all classes in this process, no collective involved
            ref_loss = F.cross_entropy(model(x), y)
            ref_grads = torch.autograd.grad(ref_loss, params)

            rows: list[int] = []
            model.run_text = _recording(model.run_text, rows)
            assert D.enable_text_sharding(model)
            xs, ys = x[rank::world], y[rank::world]
            loss = F.cross_entropy(model(xs), ys)
            tot = D.batch_totals(loss, len(ys), 0)
            D.scale_loss(loss, len(ys), tot).backward()
            D.allreduce_grads(params)
            results[method] = {
                "ref_loss": ref_loss.item(),
                "loss": tot.loss,
                "ref_grads": [g.clone() for g in ref_grads],
                "grads": [p.grad.clone() for p in params],
                "rows": rows,
                "names": [n for n, _ in model.named_trainable_parameters()],
            }
        # a gradient present on one rank only is summed everywhere; none on any rank stays None
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        if rank == 0:
            a.grad = torch.ones(2)
        D.allreduce_grads([a, b])
        results["partial"] = (a.grad, b.grad)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        D.cleanup()


def test_sharded_text_matches_single_process_loss_and_gradients(tmp_path):
    """coop (shallow text context) and mpl depth 2 (deep text prompts): 2 gloo ranks, 5 classes split
    3 + 2, a batch of 6 split 3 + 3; loss and every prompt gradient equal the 1-process values."""
    mp.spawn(_text_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in res:
        assert torch.equal(r["partial"][0], torch.ones(2)) and r["partial"][1] is None
    for method, _ in METHODS:
        per_rank = [r[method] for r in res]
        assert [r["rows"] for r in per_rank] == [[3], [2]], method  # each rank encoded only its classes
        for r in per_rank:
            assert abs(r["loss"] - r["ref_loss"]) < 1e-5
            assert len(r["grads"]) == len(r["ref_grads"]) > 0
            for name, g, ref in zip(r["names"], r["grads"], r["ref_grads"], strict=True):
                assert ref.abs().max() > 0, name  # the gradient reaches every prompt parameter
                torch.testing.assert_close(
                    g, ref, rtol=1e-5, atol=1e-5, msg=lambda m, n=f"{method} {name}": f"{n}: {m}"
                )
                assert (g - ref).norm() <= 1e-4 * ref.norm(), (
                    method,
                    name,
                    float((g - ref).norm() / ref.norm()),
                )
        for g0, g1 in zip(per_rank[0]["grads"], per_rank[1]["grads"], strict=True):
            assert torch.equal(g0, g1)  # ranks step identical gradients


# ------------------------------------------------------------------ trainer: 2 processes == 1 process
TRAIN_CLASSES = ["cat", "dog", "car"]
TRAIN_CFG = RunConfig.from_dict(
    {
        # global batch 5 over 2 ranks: per-rank batches of 3 + 2 (uneven, exact through loss weighting);
        # 10 images -> 2 steps per epoch; lr high enough that the prompts move measurably
        "train": {
            "batch_size": 5,
            "epochs": 3,
            "lr": 0.05,
            "warmup_epochs": 1,
            "device": "cpu",
            "precision": "fp32",
        },
        "data": {"seed": 3},
    },
    partial=True,
)


class RecordingData(torch.utils.data.Dataset):
    """10 fixed images (no augmentation); remembers which indices this process loaded."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.items = [(torch.randn(3, 224, 224, generator=g), i % 3) for i in range(10)]
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.seen.append(i)
        return self.items[i]


def _train_model():
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import create_model

    torch.manual_seed(0)
    return create_model("coop", load_backbone("vlp-tiny"), TRAIN_CLASSES, n_ctx=4)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    from vlprompt.train.trainer import fit

    _dist_env(rank, world, port)
    try:
        cfg = TRAIN_CFG.but(train={"shard_text": True})
        run_dir = os.path.join(out, "ddp")
        # "killed" after epoch 1, then resumed under DDP to the end
        data = RecordingData()
        first = fit(_train_model(), data, cfg, RunDir(run_dir), progress=False, stop_after_epoch=1)
        assert first["stopped"] and D.is_distributed() and D.env().world_size == world
        model = _train_model()
        res = fit(model, data, cfg, RunDir(run_dir), resume=True, progress=False)
        torch.save(
            {"state": model.prompt_state_dict(), "history": res["history"], "seen": data.seen},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        D.cleanup()


def test_two_process_training_matches_one_process(tmp_path):
    """2 gloo ranks (text sharded, killed after epoch 1 and resumed) end with the prompt weights of an
    uninterrupted 1-process run with the same global batch; only rank 0 writes the run directory."""
    import json

    from vlprompt.train.trainer import fit

    mp.spawn(_train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ref_model = _train_model()
    start = {k: v.clone() for k, v in ref_model.prompt_state_dict().items()}
    data = RecordingData()
    ref = fit(ref_model, data, TRAIN_CFG, RunDir(tmp_path / "single"), progress=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # each rank loaded only its share of every global batch (3 + 2 images), together the 1-process images
    assert [len(r["seen"]) for r in ranks] == [18, 12]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == sorted(data.seen)
    for epoch in range(3):
        per_rank = [set(r["seen"][epoch * n : (epoch + 1) * n]) for r, n in zip(ranks, (6, 4), strict=True)]
        assert not per_rank[0] & per_rank[1]
    ref_state = ref_model.prompt_state_dict()
    for k, v in ref_state.items():
        assert (v - start[k]).abs().max() > 1e-3, k  # training moved the prompts
        for r in ranks:
            torch.testing.assert_close(r["state"][k], v, rtol=0, atol=1e-5)
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k])
    # logged loss/accuracy are global-batch values: the same as the 1-process run's
    for mine, theirs in zip(ranks[0]["history"], ref["history"], strict=True):
        assert abs(mine["loss"] - theirs["loss"]) < 1e-5 and mine["acc"] == theirs["acc"]
    # rank 0 alone wrote the logs (2 steps + 1 epoch record per epoch, no duplicates from rank 1)
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [(x["kind"], x["epoch"]) for x in lines] == [
        (k, e) for e in (1, 2, 3) for k in ("step", "step", "epoch")
    ]
    assert (tmp_path / "ddp" / "checkpoint" / "state.json").is_file()
