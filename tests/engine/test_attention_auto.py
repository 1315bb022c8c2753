"""``attention="auto"``: exact (equals SDPA), a measured choice per shape class that is probed once and
then read from the shared probe file, forced by $VLPROMPT_ATTENTION, listed for the run's env."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vlprompt.engine import attention as A


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("VLPROMPT_HOME", str(tmp_path))
    monkeypatch.delenv(A.ENV_FORCE, raising=False)
    monkeypatch.setattr(A, "_CHOICES", {})
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
    with torch.no_grad():
        ref = A.standard_attention(mha, x, ctx)
        assert torch.allclose(A.plain_attention(mha, x, ctx), ref, atol=1e-6)
        assert torch.allclose(A.auto_attention(mha, x, ctx), ref, atol=1e-6)
    (rec,) = A.attention_choices()["choices"].values()
    assert rec["choice"] in ("sdpa", "plain") and rec["sdpa_ms"] > 0 and rec["plain_ms"] > 0


def test_probe_once_per_shape_class_then_from_the_file(fresh, monkeypatch):
    mha = _mha()
    calls = []
    timings = iter([5.0, 1.0, 1.0, 5.0])  # shape 1: plain faster; shape 2: sdpa faster

    def fake_time(fn, device, reps=3):
        calls.append(1)
        fn()
        return next(timings)

    monkeypatch.setattr(A, "_time", fake_time)
    ctx = A.AttnContext(n_inst=9)
    with torch.no_grad():
        for _ in range(3):  # same class (batch 3 and 4 both round to 4): probed once
            A.auto_attention(mha, torch.randn(3, 9, 32), ctx)
            A.auto_attention(mha, torch.randn(4, 9, 32), ctx)
        assert len(calls) == 2
        assert A.choose_attention(mha, torch.randn(4, 9, 32), ctx) == "plain"
        assert A.choose_attention(mha, torch.randn(4, 17, 32), ctx) == "sdpa"  # a new class: probed
    assert len(calls) == 4
    stored = json.loads((fresh / "attention-probe.json").read_text())
    with torch.no_grad():
        key = A.shape_class(mha, torch.randn(4, 9, 32), ctx)
    assert "nograd" in key and "L9" in key and "N4" in key and "H4xhd8" in key
    assert stored[key]["choice"] == "plain" and stored[key]["plain_ms"] == 1.0
    # a new process (empty memory) reuses the file: no probe, same choice, source recorded
    monkeypatch.setattr(A, "_CHOICES", {})
    with torch.no_grad():
        assert A.choose_attention(mha, torch.randn(4, 9, 32), ctx) == "plain"
    assert len(calls) == 4
    assert A.attention_choices()["choices"][key]["source"] == "probe-cache"
    # grad on is another class (training measures forward + backward)
    x = torch.randn(4, 9, 32, requires_grad=True)
    assert A.shape_class(mha, x, ctx) != key and "|grad|" in A.shape_class(mha, x, ctx)


def test_forced_by_environment(fresh, monkeypatch):
    monkeypatch.setattr(A, "probe", lambda *a: pytest.fail("must not probe when forced"))
    monkeypatch.setenv(A.ENV_FORCE, "plain")
    mha = _mha()
    x = torch.randn(2, 5, 32)
    ctx = A.AttnContext(n_inst=5, causal=True)
    with torch.no_grad():
        assert A.choose_attention(mha, x, ctx) == "plain"
        assert torch.equal(A.auto_attention(mha, x, ctx), A.plain_attention(mha, x, ctx))
    assert A.attention_choices()["mode"] == "forced:plain"


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
    sdpa.load_prompt_state_dict(auto.prompt_state_dict())
    with torch.no_grad():
        assert torch.allclose(auto(images), sdpa(images), atol=1e-4)
    classes = A.attention_choices()["choices"]
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
    for attn in ("auto", "sdpa"):
        torch.manual_seed(0)
        m = create_model(
            "maple",
            bb,
            ["cat", "dog", "bird"],
            depth=2,
            model=ModelOptions(checkpoint_text=True, attention=attn),
        )
        F.cross_entropy(m(x), y).backward()
        grads[attn] = [p.grad.clone() for _, p in m.trainable_parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads["auto"], grads["sdpa"]))
    assert any("|grad|" in k for k in A.attention_choices()["choices"])


def test_near_ties_stay_on_sdpa(fresh, monkeypatch):
    mha = _mha()
    ctx = A.AttnContext(n_inst=9)
    for sdpa_ms, plain_ms, want in [(1.0, 0.95, "sdpa"), (1.0, 0.9, "plain"), (1.0, 1.5, "sdpa")]:
        timings = iter([sdpa_ms, plain_ms])
        monkeypatch.setattr(A, "_time", lambda fn, device, reps=3, t=timings: next(t))
        with torch.no_grad():
            assert A.probe(mha, torch.randn(2, 9, 32), ctx)["choice"] == want
