"""``attention="auto"``: exact (equals SDPA); the engine's choice is a pure function of the shape class
given a table handed in, and does no I/O; the run layer measures the table once per machine and shape
class (probe, then the shared probe file), honours $VLPROMPT_ATTENTION and records what it chose."""

from __future__ import annotations

import ast
import builtins
import io
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import vlprompt.engine as engine_pkg
from vlprompt.engine import attention as A
from vlprompt.run import attention as R


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("VLPROMPT_HOME", str(tmp_path))
    monkeypatch.delenv(R.ENV_FORCE, raising=False)
    return tmp_path


def _mha(d=32, h=4):
    torch.manual_seed(0)
    return nn.MultiheadAttention(d, h, batch_first=True)


@pytest.mark.parametrize("causal,valid", [(False, False), (True, False), (True, True)])
def test_auto_equals_the_fused_and_explicit_attention(fresh, causal, valid):
    mha = _mha()
    x = torch.randn(3, 9, 32)
    kv = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool) if valid else None
    ctx = A.AttnContext(n_inst=7 if valid else 9, causal=causal, key_valid=kv)
    auto, table = R.measured_attention("cpu")
    with torch.no_grad():
        ref = A.standard_attention(mha, x, ctx)
        assert torch.allclose(A.plain_attention(mha, x, ctx), ref, atol=1e-6)
        assert torch.allclose(auto(mha, x, ctx), ref, atol=1e-6)
    (rec,) = table.record()["choices"].values()
    assert rec["choice"] in ("sdpa", "plain") and rec["sdpa_ms"] > 0 and rec["plain_ms"] > 0


def test_choice_is_a_pure_function_of_the_shape_given_the_table():
    mha = _mha()
    ctx = A.AttnContext(n_inst=9)
    x = torch.randn(4, 9, 32)
    with torch.no_grad():
        key = A.shape_class(mha, x, ctx)
        assert key == "cpu|float32|nograd|none|H4xhd8|L9|N4"
        assert A.shape_class(mha, torch.randn(3, 9, 32), ctx) == key  # batch rounded up to a power of 2
        assert A.select_attention({key: "plain"}, key) == "plain"
        assert A.select_attention({}, key) == A.DEFAULT_IMPLEMENTATION == "sdpa"
        auto = A.AutoAttention({key: "plain"})
        assert auto.choose(mha, x, ctx) == "plain"
        assert torch.equal(auto(mha, x, ctx), A.plain_attention(mha, x, ctx))
        assert A.AutoAttention().choose(mha, x, ctx) == "sdpa"  # no table, no resolver: SDPA
        assert torch.equal(A.AutoAttention()(mha, x, ctx), A.standard_attention(mha, x, ctx))
    grad = torch.randn(4, 9, 32, requires_grad=True)
    assert A.shape_class(mha, grad, ctx) == "cpu|float32|grad|none|H4xhd8|L9|N4"


def test_engine_does_no_io(monkeypatch):
    """No engine module imports a module for files, environment, clocks or threads, and a forward
    through ``auto`` (with a resolver) runs with open() and os.environ made to fail."""
    banned = {"os", "json", "pathlib", "fcntl", "threading", "time", "platform", "statistics"}
    banned |= {"vlprompt.utils", "vlprompt.run"}
    for path in Path(engine_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not banned & set(names), f"{path.name} imports {banned & set(names)}"
    mha, ctx = _mha(), A.AttnContext(n_inst=9)
    asked = []
    auto = A.AutoAttention({}, resolve=lambda key, *a: asked.append(key) or "plain")

    def no_io(*a, **k):
        raise AssertionError("the engine opened a file")

    class NoEnv(dict):
        def __getitem__(self, k):
            raise AssertionError(f"the engine read ${k}")

        get = __getitem__

    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        auto(mha, x, ctx)  # warm torch's own lazy start-up outside the guard
        monkeypatch.setattr(builtins, "open", no_io)
        monkeypatch.setattr(io, "open", no_io)
        monkeypatch.setattr(os, "environ", NoEnv())
        out = auto(mha, x, ctx)
        out2 = auto(mha, torch.randn(2, 17, 32), A.AttnContext(n_inst=17))
    assert len(asked) == 2 and out.shape == (2, 9, 32) and out2.shape == (2, 17, 32)


def test_probe_once_per_shape_class_then_from_the_file(fresh, monkeypatch):
    mha = _mha()
    calls = []
    timings = iter([5.0, 1.0, 1.0, 5.0])  # shape 1: plain faster; shape 2: sdpa faster

    def fake_time(fn, device, reps=3):
        calls.append(1)
        fn()
        return next(timings)

    monkeypatch.setattr(R, "_time", fake_time)
    ctx = A.AttnContext(n_inst=9)
    auto, table = R.measured_attention("cpu")
    with torch.no_grad():
        for _ in range(3):  # same class (batch 3 and 4 both round to 4): probed once
            auto(mha, torch.randn(3, 9, 32), ctx)
            auto(mha, torch.randn(4, 9, 32), ctx)
        assert len(calls) == 2
        assert auto.choose(mha, torch.randn(4, 9, 32), ctx) == "plain"
        assert auto.choose(mha, torch.randn(4, 17, 32), ctx) == "sdpa"  # a new class: probed
    assert len(calls) == 4
    stored = json.loads((fresh / R.PROBE_FILE).read_text())
    with torch.no_grad():
        key = A.shape_class(mha, torch.randn(4, 9, 32), ctx)
    entry = f"{R.machine_name(torch.device('cpu'))}|{key}"
    assert stored[entry]["choice"] == "plain" and stored[entry]["plain_ms"] == 1.0
    # a new table (a new process) reuses the machine's file: no probe, same choice, source recorded
    auto, table = R.measured_attention("cpu")
    with torch.no_grad():
        assert auto.choose(mha, torch.randn(4, 9, 32), ctx) == "plain"
    assert len(calls) == 4
    assert table.record()["choices"][key]["source"] == "probe-cache"


def test_recorded_choices_win_over_the_machine_table(fresh, monkeypatch):
    monkeypatch.setattr(R, "probe", lambda *a: {"choice": "sdpa", "sdpa_ms": 1.0, "plain_ms": 2.0})
    mha, ctx = _mha(), A.AttnContext(n_inst=9)
    with torch.no_grad():
        key = A.shape_class(mha, torch.randn(4, 9, 32), ctx)
        seen = []
        auto, table = R.measured_attention("cpu", {"choices": {key: {"choice": "plain"}}}, on_new=seen.append)
        assert auto.choose(mha, torch.randn(4, 9, 32), ctx) == "plain"
        assert seen == []  # nothing new decided
        assert auto.choose(mha, torch.randn(4, 5, 32), A.AttnContext(n_inst=5)) == "sdpa"  # probed
    assert len(seen) == 1 and seen[0]["choices"][key]["source"] == "recorded"


def test_forced_by_environment(fresh, monkeypatch):
    monkeypatch.setattr(R, "probe", lambda *a: pytest.fail("must not probe when forced"))
    monkeypatch.setenv(R.ENV_FORCE, "plain")
    mha = _mha()
    x = torch.randn(2, 5, 32)
    ctx = A.AttnContext(n_inst=5, causal=True)
    auto, table = R.measured_attention("cpu")
    with torch.no_grad():
        assert auto.choose(mha, x, ctx) == "plain"
        assert torch.equal(auto(mha, x, ctx), A.plain_attention(mha, x, ctx))
    assert table.record()["mode"] == "forced:plain"


def test_model_default_is_auto_and_recorded(fresh):
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import create_model
    from vlprompt.methods.model import ModelOptions

    assert ModelOptions().attention == "auto"
    bb = load_backbone("vlp-tiny")
    images = torch.randn(2, 3, 224, 224)
    auto = create_model("maple", bb, ["cat", "dog", "golden retriever"], depth=2)
    sdpa = create_model(
        "maple", bb, ["cat", "dog", "golden retriever"], depth=2, model=ModelOptions(attention="sdpa")
    )
    measured, table = R.measured_attention(bb.device)
    auto.set_auto_attention(measured)
    sdpa.load_prompt_state_dict(auto.prompt_state_dict())
    with torch.no_grad():
        assert torch.allclose(auto(images), sdpa(images), atol=1e-4)
    classes = table.record()["choices"]
    assert any("|L50|" in k or "|L52|" in k for k in classes), classes  # vlp-tiny image tokens (+ prompts)


def test_probe_inside_activation_checkpointing(fresh):
    """The first call of a shape class inside a checkpointed block probes (with its own backward) without
    re-entering the block's recomputation; gradients equal the fixed-SDPA model's."""
    import torch.nn.functional as F

    from vlprompt.backbones import load_backbone
    from vlprompt.methods import ModelOptions, create_model

    bb = load_backbone("vlp-tiny")
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([0, 1])
    grads = {}
    measured, table = R.measured_attention(bb.device)
    for attn in ("auto", "sdpa"):
        torch.manual_seed(0)
        m = create_model(
            "maple",
            bb,
            ["cat", "dog", "bird"],
            depth=2,
            model=ModelOptions(checkpoint_text=True, attention=attn),
        )
        m.set_auto_attention(measured)
        F.cross_entropy(m(x), y).backward()
        grads[attn] = [p.grad.clone() for p in m.trainable_parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads["auto"], grads["sdpa"]))
    assert any("|grad|" in k for k in table.record()["choices"])


def test_near_ties_stay_on_sdpa(fresh, monkeypatch):
    mha = _mha()
    ctx = A.AttnContext(n_inst=9)
    for sdpa_ms, plain_ms, want in [(1.0, 0.95, "sdpa"), (1.0, 0.9, "plain"), (1.0, 1.5, "sdpa")]:
        timings = iter([sdpa_ms, plain_ms])
        monkeypatch.setattr(R, "_time", lambda fn, device, reps=3, t=timings: next(t))
        with torch.no_grad():
            assert R.probe(mha, torch.randn(2, 9, 32), ctx)["choice"] == want
