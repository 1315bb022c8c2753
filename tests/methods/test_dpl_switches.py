"""DPL's reconstruction switches (each labelled as our reading): each changes only what it names,
the exact-mode and closed-gate identities still hold, alpha_init="auto" starts at the measured share,
the ProVP-style preset carries ProVP's values, and `vlprompt inspect` reports the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from vlprompt.engine import AttnContext, LayerOps, TowerPlan, standard_attention
from vlprompt.engine.decoupled import decoupled_attention
from vlprompt.errors import VlpromptError
from vlprompt.methods import build_config, create_model, get_method
from vlprompt.methods.base import option_help
from vlprompt.methods.inspection import inspect_prompts

CLASSES = ["cat", "dog", "car"]
TEMPLATE = "a photo of a {}."
SMALL = {"depth_image": 3, "depth_text": 2}  # vlp-tiny: 4 layers per tower
PRESETS = Path(__file__).resolve().parents[2] / "src" / "vlprompt" / "methods" / "presets"


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _model(tiny, method="dpl", seed=0, **kw):
    torch.manual_seed(seed)
    opts = {**SMALL, **kw} if method == "dpl" else kw
    return create_model(method, tiny, CLASSES, TEMPLATE, **opts)


def _feats(model, images):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text()


def _block_inputs(blocks, run):
    """The residual stream entering each block (input of its ln_1) during ``run()``."""
    seen, hooks = {}, []
    for i, blk in enumerate(blocks):
        hooks.append(blk.ln_1.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone())))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_switches_are_labelled_as_our_reading(tiny):
    helps = option_help(get_method("dpl").Config)
    for name in ("image_insert", "after_depth", "init", "prompts_first"):
        assert "our reading" in helps[name], name
    assert "auto" in helps["alpha_init"]
    desc = _model(tiny).method.describe()
    assert desc["reconstructed"] is True and desc["note"] == get_method("dpl").reconstruction_note
    assert "reconstructed" in desc["note"]


# ------------------------------------------------------------------ image_insert
def test_after_ln_pre_changes_only_the_layer0_image_prompts(tiny, images):
    before = _model(tiny)
    after = _model(tiny, image_insert="after_ln_pre")
    assert torch.equal(before.method.visual.prompts, after.method.visual.prompts)  # same parameters
    (ib, tb), (ia, ta) = _feats(before, images), _feats(after, images)
    assert torch.equal(tb, ta)  # text tower untouched
    assert (ib - ia).abs().max() > 1e-5
    blocks, n = tiny.clip.visual.transformer.resblocks, tiny.num_image_tokens
    got = _block_inputs(blocks, lambda: after.encode_image(images))
    ref = _block_inputs(blocks, lambda: before.encode_image(images))
    p0 = after.method.visual.prompts[0].detach()
    assert torch.equal(got[0][:, n:], p0.expand(images.shape[0], -1, -1))  # raw prompts, not ln_pre'd
    assert torch.equal(got[0][:, :n], ref[0][:, :n])  # instances identical
    ln = tiny.clip.visual.ln_pre
    assert (ref[0][:, n:] - ln(p0)).abs().max() < 1e-5  # before: normalised with the patches


def test_after_ln_pre_exact_mode_equals_standard_prompting(tiny, images):
    m = _model(tiny, "dpl-visual", mode="exact", image_insert="after_ln_pre", depth_image=3)
    plan = m.method.image_plan()
    assert plan.shallow is None and plan.layers[0].append is not None
    std = TowerPlan(
        layers={
            i: LayerOps(remove=op.remove, append=op.append, blend=op.blend) for i, op in plan.layers.items()
        }
    )
    with torch.no_grad():
        assert (m.encode_image(images) - m.encode_image(images, std)).abs().max() <= 1e-5


# ------------------------------------------------------------------ after_depth
def test_keep_carries_prompts_to_the_end_with_gates_of_their_own(tiny, images):
    rm, keep = _model(tiny, after_depth="remove"), _model(tiny, after_depth="keep")
    layers = tiny.image.layers
    blocks, n = tiny.clip.visual.transformer.resblocks, tiny.num_image_tokens
    seen = _block_inputs(blocks, lambda: keep.encode_image(images))
    assert [seen[i].shape[1] - n for i in range(layers)] == [4] * layers
    assert len(keep.method.visual.gates) == layers and len(rm.method.visual.gates) == SMALL["depth_image"]
    extra = (layers - SMALL["depth_image"]) + (tiny.text.layers - SMALL["depth_text"])
    assert keep.num_trainable() == rm.num_trainable() + extra  # one gate per later layer
    (ir, tr), (ik, tk) = _feats(rm, images), _feats(keep, images)
    assert (ir - ik).abs().max() > 1e-6 and (tr - tk).abs().max() > 1e-6
    # at full depth nothing follows the last prompted layer: keep == remove
    full = {"depth_image": layers, "depth_text": tiny.text.layers}
    a = _feats(_model(tiny, after_depth="remove", **full), images)
    b = _feats(_model(tiny, after_depth="keep", **full), images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_keep_keeps_the_identities(tiny, images):
    zs = create_model("zeroshot", tiny, CLASSES, TEMPLATE)
    closed = _model(tiny, after_depth="keep", gate_closed=True)
    with torch.no_grad():
        assert (closed(images) - zs(images)).abs().max() <= 1e-5
    m = _model(tiny, after_depth="keep", mode="exact")
    plan = m.method.image_plan()
    std = TowerPlan(
        shallow=plan.shallow,
        layers={
            i: LayerOps(remove=op.remove, append=op.append, blend=op.blend) for i, op in plan.layers.items()
        },
    )
    with torch.no_grad():
        assert (m.encode_image(images) - m.encode_image(images, std)).abs().max() <= 1e-5


def test_image_depth_up_to_all_layers():
    from types import SimpleNamespace

    from vlprompt.backbones.backbone import TowerDims

    fake = SimpleNamespace(text=TowerDims(512, 12, 8), image=TowerDims(768, 12, 12))  # ViT-B/16 towers
    cls = get_method("dpl-visual")
    m = cls(cls.Config(depth_image=12), fake)
    assert sum(p.numel() for p in m.parameters()) == 12 * 4 * 768 + 12
    plan = m.image_plan()
    assert sorted(plan.layers) == list(range(12)) and all(
        op.remove != 0 for i, op in plan.layers.items() if i
    )
    with pytest.raises(VlpromptError, match="outside \\[1, 12\\]"):
        cls(cls.Config(depth_image=13), fake)


# ------------------------------------------------------------------ init
def test_uniform_init_changes_only_the_initial_values(tiny, images):
    u = _model(tiny, init="uniform")
    patch = tiny.clip.visual.conv1.kernel_size[0]
    for stream, width in ((u.method.visual, tiny.image.width), (u.method.textual, tiny.text.width)):
        v = math.sqrt(6.0 / (3 * patch * patch + width))  # ProVP / VPT
        p = stream.prompts.detach()
        assert p.abs().max() <= v and p.abs().max() > 0.9 * v and abs(float(p.mean())) < 0.1 * v
    n = _model(tiny, seed=5)
    n.load_prompt_state_dict(u.prompt_state_dict())
    with torch.no_grad():
        assert torch.equal(n(images), u(images))  # same values -> same model: init is all it changes
    with pytest.raises(
        VlpromptError, match="options.init='xavier' is invalid; choose one of: normal, uniform"
    ):
        _model(tiny, init="xavier")


# ------------------------------------------------------------------ prompts_first
D, HEADS, N_INST, N_P = 32, 4, 7, 3


@pytest.fixture(scope="module")
def mha() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(D, HEADS, batch_first=True)
    with torch.no_grad():
        m.in_proj_weight.mul_(3.0)
        m.in_proj_bias.normal_(0, 0.5)
    return m.eval().requires_grad_(False)


def _ctx(text: bool) -> AttnContext:
    if not text:
        return AttnContext(n_inst=N_INST)
    eot = torch.tensor([2, 6])
    return AttnContext(n_inst=N_INST, causal=True, key_valid=torch.arange(N_INST)[None] <= eot[:, None])


@pytest.mark.parametrize("text", [False, True], ids=["image", "text"])
def test_prompts_first_updates_prompts_then_instances_read_them(mha, text):
    x = torch.randn(2, N_INST + N_P, D, generator=torch.Generator().manual_seed(3))
    ctx = _ctx(text)
    with torch.no_grad():
        joint = decoupled_attention(mha, x, ctx)
        first = decoupled_attention(mha, x, ctx, prompts_first=True)
        assert torch.equal(first[:, N_INST:], joint[:, N_INST:])  # prompt rows unchanged
        assert (first[:, :N_INST] - joint[:, :N_INST]).abs().max() > 1e-4
        # exact mode: instance rows = standard attention over [X; X_p + Attn_p]
        updated = torch.cat([x[:, :N_INST], x[:, N_INST:] + joint[:, N_INST:]], dim=1)
        ref = standard_attention(mha, updated, ctx)
        assert (first[:, :N_INST] - ref[:, :N_INST]).abs().max() <= 1e-5
        # the closed gate is still frozen attention over the instances
        closed = decoupled_attention(mha, x, ctx, alpha=torch.ones(1), gate_closed=True, prompts_first=True)
        frozen = standard_attention(mha, x[:, :N_INST], ctx)
        assert (closed[:, :N_INST] - frozen).abs().max() <= 1e-5


def test_prompts_first_lets_p_to_i_reach_features_without_carry(tiny, images):
    def img(**kw):
        with torch.no_grad():
            return _model(tiny, "dpl-visual", depth_image=3, carry=False, **kw).encode_image(images)

    # joint update, prompts removed after layer J: P->P never reaches the instances
    assert torch.equal(img(after_depth="remove"), img(after_depth="remove", drop_pp=True))
    # kept: layer J-1's prompt outputs (where P->I / P->P act) are read by the later layers
    assert (img(after_depth="keep") - img(after_depth="keep", drop_pp=True)).abs().max() > 1e-6
    first = {"prompts_first": True, "after_depth": "remove"}
    assert (img(**first) - img(**first, drop_pp=True)).abs().max() > 1e-6
    zs = create_model("zeroshot", tiny, CLASSES, TEMPLATE)
    with torch.no_grad():
        assert (_model(tiny, prompts_first=True, gate_closed=True)(images) - zs(images)).abs().max() <= 1e-5


# ------------------------------------------------------------------ alpha_init = auto
def test_auto_alpha_starts_at_the_measured_share(tiny, images):
    m = _model(tiny, alpha_init="auto", gate="layer")
    report = inspect_prompts(m, images)  # the first forward: every gate measures itself
    for tower in ("image", "text"):
        rows = [r for r in report[tower]["layers"] if r["n_prompts"]]
        assert rows
        for r in rows:
            assert abs(r["alpha"] - r["share"]) < 1e-5, (tower, r)
    stream = m.method.visual
    assert all(bool(g.measured) for g in stream.gates)
    a0 = stream.gates[0].a.detach().clone()
    with torch.no_grad():
        m.encode_image(torch.randn(2, 3, 224, 224))
    assert torch.equal(stream.gates[0].a, a0)  # measured once, never again
    fresh = _model(tiny, alpha_init="auto", seed=3)
    fresh.load_prompt_state_dict(m.prompt_state_dict())  # 'measured' is saved: no re-measurement
    assert all(bool(g.measured) for g in fresh.method.visual.gates)
    head = _model(tiny, alpha_init="auto", gate="head")
    inspect_prompts(head, images)
    assert head.method.visual.gates[0].a.shape == (tiny.image.heads,)
    with pytest.raises(VlpromptError, match="alpha_init='auto' needs mode='gated'"):
        _model(tiny, alpha_init="auto", mode="exact")
    with pytest.raises(VlpromptError, match="not a number"):
        _model(tiny, alpha_init="big")


# ------------------------------------------------------------------ inspect figures
def test_inspect_carried_ratio_follows_beta(tiny, images):
    def ratio(beta):
        rows = inspect_prompts(_model(tiny, "dpl-visual", depth_image=3, beta=beta), images)["image"][
            "layers"
        ]
        return rows[1]["carried_ratio"]

    # layer 1: |beta O_p^0| / |(1 - beta) P_1|, and O_p^0 does not depend on beta
    assert ratio(0.0) == 0.0
    assert abs(ratio(0.5) / ratio(0.1) - (0.5 / 0.5) / (0.1 / 0.9)) < 1e-3
    rows = inspect_prompts(_model(tiny, carry=False), images)["image"]["layers"]
    assert [r["carried_ratio"] for r in rows] == [None] * tiny.image.layers
    assert [r["n_prompts"] for r in rows] == [4, 4, 4, 4]  # kept after the last prompted layer
    rows = inspect_prompts(_model(tiny, after_depth="remove"), images)["image"]["layers"]
    assert [r["n_prompts"] for r in rows] == [4, 4, 4, 0]


def test_inspect_cli_writes_figures(tmp_path):
    from PIL import Image

    from vlprompt.cli.main import main

    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img)
    out = tmp_path / "fig.json"
    argv = ["inspect", "--method", "dpl", "--model", "vlp-tiny", "--set", "options.depth_image=3"]
    argv += ["--set", "options.depth_text=2", "--json", str(out), str(img)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["reconstructed"] is True and data["images"] == 1
    assert [r["n_prompts"] for r in data["image"]["layers"]] == [4, 4, 4, 4]
    assert data["image"]["layers"][1]["carried_ratio"] > 0


# ------------------------------------------------------------------ ProVP-style preset
def test_provp_preset_values_and_source():
    text = (PRESETS / "dpl-provp.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["method"] == "dpl" and "MCG-NJU/ProVP" in text and "reconstructed" in text
    cfg = build_config(get_method("dpl"), data["options"])
    assert (cfg.image_insert, cfg.depth_image, cfg.n_prompts_image, cfg.init) == (
        "after_ln_pre",
        12,
        16,
        "uniform",
    )
    assert (cfg.carry, cfg.beta, cfg.after_depth) == (True, 0.01, "keep")
    t = data["train"]
    assert (t["optimizer"], t["lr"], t["batch_size"], t["weight_decay"], t["epochs"]) == (
        "sgd",
        0.1,
        32,
        0.001,
        100,
    )
    assert (t["warmup_epochs"], t["warmup_lr"], t["scheduler"]) == (1, 1.0e-5, "cosine")
