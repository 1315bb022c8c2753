"""DPL (reconstructed): zero-shot recovery, gradient reach, each switch's reach, learning, counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from toy import make_toy_task, train_steps

from vlprompt.backbones.backbone import TowerDims
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method

CLASSES = ["cat", "dog", "car"]
TEMPLATE = "a photo of a {}."
SMALL = {"depth_image": 3, "depth_text": 2}  # vlp-tiny has 4 layers per tower
PRESETS = Path(__file__).resolve().parents[2] / "src" / "vlprompt" / "methods" / "presets"


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _model(tiny, method="dpl", seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(SMALL) if method == "dpl" else {}
    if method == "dpl-visual":
        opts["depth_image"] = SMALL["depth_image"]
    if method == "dpl-text":
        opts["depth_text"] = SMALL["depth_text"]
    opts.update(kw)
    return create_model(method, tiny, CLASSES, TEMPLATE, **opts)


def test_registered_and_labelled_reconstructed(tiny):
    for name in ("dpl", "dpl-visual", "dpl-text"):
        assert "reconstructed" in get_method(name).summary
    d = _model(tiny).method.describe()
    assert d["reconstructed"] is True and "reconstructed" in d["note"]
    assert get_method("dpl-text").image_plan is get_method("zeroshot").image_plan  # image tower stays frozen
    assert _model(tiny, "dpl-text").method.image_plan() is None


@pytest.mark.parametrize("how", ["gate_closed", "alpha_to_zero"])
def test_closed_gate_reproduces_zero_shot_logits(tiny, images, how):
    zs = create_model("zeroshot", tiny, CLASSES, TEMPLATE)
    m = _model(tiny, gate_closed=(how == "gate_closed"))
    if how == "alpha_to_zero":
        with torch.no_grad():
            for g in [*m.method.visual.gates, *m.method.textual.gates]:
                g.a.fill_(float("-inf"))
    with torch.no_grad():
        ref, got = zs(images), m(images)
        assert (got - ref).abs().max() <= 1e-5
        open_gate = _model(tiny)(images)  # the prompts do act once the gate is open
    assert (open_gate - ref).abs().max() > 1e-4


def test_closed_gate_text_equals_open_clip_encode_text(tiny):
    m = _model(tiny, "dpl-text", gate_closed=True)
    with torch.no_grad():
        ref = tiny.clip.encode_text(tiny.tokenize([TEMPLATE.format(c) for c in CLASSES]))
        got = m.encode_text()
    assert (got - F.normalize(ref.float(), dim=-1)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "method,kw",
    [
        ("dpl", {}),
        ("dpl", {"gate": "head", "beta_learnable": True, "drop_pp": True}),
        ("dpl-visual", {}),
        ("dpl-text", {}),
    ],
)
def test_gradients_reach_only_dpl_parameters(tiny, images, method, kw):
    m = _model(tiny, method, **kw)
    F.cross_entropy(m(images), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None for p in tiny.parameters())
    names = [n for n, _ in m.named_trainable_parameters()]
    assert names and all(n.startswith(("visual.", "textual.")) for n in names)
    if kw.get("beta_learnable"):
        assert "visual.beta_logit" in names and "textual.beta_logit" in names
    for n, p in m.named_trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def _block_inputs(tiny, model, images):
    """Tokens entering each image block (the input of its ln_1), and block 0's output."""
    seen, hooks = {}, []
    blocks = tiny.clip.visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        hooks.append(
            blk.ln_1.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, inp[0].clone()))
        )
    b0 = blocks[0]
    hooks.append(
        b0.ln_2.register_forward_hook(lambda mod, inp, out: seen.__setitem__("mid0", inp[0].clone()))
    )
    hooks.append(b0.mlp.register_forward_hook(lambda mod, inp, out: seen.__setitem__("mlp0", out.clone())))
    try:
        with torch.no_grad():
            model.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    seen["out0"] = seen["mid0"] + seen["mlp0"]
    return seen


def test_carry_changes_next_layers_prompts_only(tiny, images):
    n_inst, depth = tiny.num_image_tokens, SMALL["depth_image"]
    on = _block_inputs(tiny, _model(tiny, carry=True, after_depth="remove"), images)
    off = _block_inputs(tiny, _model(tiny, carry=False, after_depth="remove"), images)
    assert torch.equal(on[0], off[0])
    assert torch.equal(on[1][:, :n_inst], off[1][:, :n_inst])
    assert (on[1][:, n_inst:] - off[1][:, n_inst:]).abs().max() > 1e-4
    beta = 0.01  # P_1 = beta * O_p^0 + (1 - beta) * P_new_1
    assert (
        on[1][:, n_inst:] - (beta * on["out0"][:, n_inst:] + (1 - beta) * off[1][:, n_inst:])
    ).abs().max() < 1e-5
    # token trace with after_depth="remove": 4 prompts on layers 0..J-1, none from layer J on (frozen CLIP)
    assert [on[i].shape[1] for i in range(tiny.image.layers)] == [n_inst + 4] * depth + [n_inst] * (
        tiny.image.layers - depth
    )


def test_drop_pp_reaches_features_only_through_carry(tiny, images):
    """Instances read a layer's prompt *inputs*; prompt *outputs* (what A3 changes) matter only if carried
    (with after_depth="remove"; "keep" also carries the last outputs on, see test_dpl_switches.py)."""

    def feats(**kw):
        with torch.no_grad():
            return _model(tiny, "dpl-visual", after_depth="remove", **kw).encode_image(images)

    assert torch.equal(feats(carry=False), feats(carry=False, drop_pp=True))
    assert (feats(carry=True, beta=0.5) - feats(carry=True, beta=0.5, drop_pp=True)).abs().max() > 1e-5


def test_exact_mode_has_no_gate_and_equals_standard_prompting(tiny, images):
    m = _model(tiny, mode="exact")
    names = [n for n, _ in m.named_trainable_parameters()]
    assert not any(".gates." in n for n in names)
    # exact decoupled attention == standard attention over [X; P] with the same prompts and ops
    plan = m.method.image_plan()
    for op in plan.layers.values():
        op.attention = None
    with torch.no_grad():
        assert (m.encode_image(images) - m.encode_image(images, plan)).abs().max() <= 1e-5


def _count(method_cls, dims_text: TowerDims, dims_image: TowerDims, **kw) -> int:
    fake = SimpleNamespace(text=dims_text, image=dims_image)  # the method reads only the tower dims
    m = method_cls(method_cls.Config(**kw), fake)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_parameter_counts(tiny, capsys):
    t, i = tiny.text, tiny.image
    # default after_depth="keep": one gate per layer of each tower (prompted or carrying prompts)
    assert _model(tiny).num_trainable() == 3 * 4 * i.width + 2 * 4 * t.width + i.layers + t.layers
    assert _model(tiny, after_depth="remove").num_trainable() == 3 * 4 * i.width + 2 * 4 * t.width + 3 + 2
    assert (
        _model(tiny, gate="head").num_trainable()
        == 3 * 4 * i.width + 2 * 4 * t.width + i.layers * i.heads + t.layers * t.heads
    )
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-16")
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    img = TowerDims(vc["width"], vc["layers"], vc["width"] // vc.get("head_width", 64))
    txt = TowerDims(tc["width"], tc["layers"], tc["heads"])
    counts = {name: _count(get_method(name), txt, img) for name in ("dpl", "dpl-visual", "dpl-text")}
    assert counts["dpl"] == 9 * 4 * 768 + 9 * 4 * 512 + 12 + 12 == 46_104
    assert counts["dpl"] == counts["dpl-visual"] + counts["dpl-text"]
    with capsys.disabled():
        print(f"\nDPL trainable parameters, ViT-B/16 (defaults): {counts}")


def test_invalid_options_are_clear_errors(tiny):
    cases = [
        ({"mode": "soft"}, r"options.mode='soft' is invalid; choose one of: gated, exact"),
        ({"gate": "token"}, r"options.gate='token' is invalid; choose one of: layer, head"),
        ({"alpha_init": 0}, r"alpha_init=0(\.0)? .*between 0 and 1"),
        ({"depth_image": 9}, r"depth 9 .*image tower"),
        ({"beta": 1.5}, r"beta=1.5 .*\[0, 1\]"),
    ]
    for kw, msg in cases:
        with pytest.raises(VlpromptError, match=msg) as e:
            _model(tiny, **kw)
        assert "\n" not in str(e.value), kw  # one line
    with pytest.raises(VlpromptError, match="n_prompts_text"):
        create_model("dpl-visual", tiny, CLASSES, n_prompts_text=4)


def test_prompt_state_roundtrip_and_new_classes(tiny, images):
    a = _model(tiny, seed=1)
    b = _model(tiny, seed=2)
    with torch.no_grad():
        assert (a(images) - b(images)).abs().max() > 1e-5
        b.load_prompt_state_dict(a.prompt_state_dict())
        assert torch.equal(a(images), b(images))
        a.set_classnames(["tree", "house"])  # base -> new: prompts are class-agnostic
        assert a(images).shape == (3, 2)


def test_dpl_learns_the_toy_task(tiny):
    images, labels, names = make_toy_task(tiny, n_per_class=4)
    zs = create_model("zeroshot", tiny, names)
    with torch.no_grad():
        zs_acc = float((zs(images).argmax(-1) == labels).float().mean())
    torch.manual_seed(0)
    m = create_model("dpl", tiny, names, **SMALL)
    losses, acc = train_steps(m, images, labels, steps=40, lr=0.05, batch_size=4)
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert acc >= 0.75 and acc > zs_acc


@pytest.mark.parametrize("name", ["dpl", "dpl-visual", "dpl-text"])
def test_presets_fit_the_config(name):
    data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    assert data["method"] == name
    fields = {f.name for f in dataclasses.fields(get_method(name).Config)}
    assert set(data["options"]) <= fields
    for proto in data.get("protocols", {}).values():
        assert set(proto.get("options", {})) <= fields
    assert data["train"]["lr"] == 0.0035 and data["train"]["batch_size"] == 4 and data["train"]["epochs"] == 5
    assert data["protocols"]["cross-dataset"]["train"]["epochs"] == 2
    text = (PRESETS / f"{name}.yaml").read_text().lower()
    assert "reconstructed" in text and "ours" in text
    from vlprompt.methods import build_config
    from vlprompt.train.config import load_preset

    cross = load_preset(name, "cross-dataset")
    assert cross["train"]["epochs"] == 2 and cross["train"]["lr"] == 0.0035
    assert build_config(get_method(name), cross["options"]) == get_method(name).Config()  # preset = defaults
