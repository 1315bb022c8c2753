"""MPL (SPEC §2.6): token traces, parameter count, tied projections, remove-all, gradient reach, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from toy import make_toy_task, train_steps

import vlprompt
from vlprompt.engine import ALL, LayerOps, TowerPlan, encode_image, prompt_lengths
from vlprompt.errors import VlpromptError
from vlprompt.methods.mpl import MPLConfig
from vlprompt.train.config import load_preset

NAMES = ["dog", "cat", "car"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlp-small")


def mpl(backbone, names=NAMES, seed=0, **opts):
    torch.manual_seed(seed)
    return vlprompt.create_model("mpl", backbone, list(names), **opts)


def spec_lengths(n_inst: int, n_ctx: int, add: int, remove, depth: int, layers: int) -> list[int]:
    """SPEC §2.6's closed form: n_inst + n_ctx before block 0; n_inst + n_ctx - r + (l-1)(p-r) + p
    before block 1 <= l < depth (n_inst + p for remove-all); constant afterwards."""
    p = add * n_ctx
    out = []
    for layer in range(layers):
        ll = min(layer, depth - 1)
        if ll == 0:
            out.append(n_inst + n_ctx)
        elif remove == "all":
            out.append(n_inst + p)
        else:
            out.append(n_inst + n_ctx - remove + (ll - 1) * (p - remove) + p)
    return out


def block_lengths(backbone, model, images) -> list[int]:
    """Sequence lengths the image blocks actually see in a real forward (pre-hooks on ln_1)."""
    seen: list[int] = []
    hooks = [
        blk.ln_1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        for blk in backbone.clip.visual.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            model.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def reference_image_features(backbone, method, images) -> torch.Tensor:
    """SPEC §2.6 written out directly with open_clip's own blocks (no engine): per layer remove the
    last r prompt tokens (all of them for remove-all), append F_{1,l}(T_l); ...; F_{add,l}(T_l)."""
    v = backbone.clip.visual
    cfg = method.cfg
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = (
        torch.cat([v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], 1)
        + v.positional_embedding
    )
    n_inst = x.shape[1]
    x = torch.cat([x, method.proj0(method.ctx).expand(x.shape[0], -1, -1)], 1)
    x = v.ln_pre(x)
    for layer, block in enumerate(v.transformer.resblocks):
        if 1 <= layer < cfg.depth:
            present = x.shape[1] - n_inst
            r = present if cfg.remove == "all" else cfg.remove
            x = x[:, : x.shape[1] - r]
            t = method.text_deep[layer - 1]
            for k in range(cfg.add):
                new = method.proj[k * (cfg.depth - 1) + layer - 1](t)
                x = torch.cat([x, new.expand(x.shape[0], -1, -1)], 1)
        x = block(x)
    return v.ln_post(x[:, 0]) @ v.proj


# ------------------------------------------------------------------------------ reference config
def test_reference_config_on_vit_b16_param_count_and_trace():
    torch.manual_seed(0)
    bb = vlprompt.load_backbone("ViT-B-16")
    model = mpl(bb)
    m = model.method
    assert model.num_trainable() == 6_702_336
    d_t, d_i = bb.text.width, bb.image.width
    assert model.num_trainable() == 512 + (512 * 768 + 768) + 8 * 512 + 16 * (512 * 768 + 768)
    assert (m.ctx.shape, len(m.text_deep), len(m.proj)) == ((1, d_t), 8, 16)
    assert m.proj0.weight.shape == (d_i, d_t)
    lengths = prompt_lengths(bb.num_image_tokens, m.image_plan(), bb.image.layers)
    assert bb.num_image_tokens == 197
    assert lengths == [198, 199, 200, 201, 202, 203, 204, 205, 206, 206, 206, 206]
    assert lengths == spec_lengths(197, 1, 2, 1, 9, 12)
    assert m.describe()["image_prompt_counts"] == [n - 197 for n in lengths]
    # the text prompt is "[SOS] X a photo of a dog. [EOT]" with the X slot initialised to X's embedding
    ids = m.prompts.ids[0, :9].tolist()
    assert ids == [bb.sot_id, *bb.encode_words("X a photo of a dog."), bb.eot_id]
    with torch.no_grad():
        x_emb = bb.token_embed(torch.tensor(bb.encode_words("X"))).float()
    assert torch.equal(m.ctx.detach(), x_emb)
    assert torch.equal(m.text_inputs().embeds[:, 1], x_emb.expand(len(NAMES), -1))
    assert m.text_inputs().plan.layers.keys() == set(range(1, 9))
    assert all(op.replace_at == 1 for op in m.text_inputs().plan.layers.values())


def test_reference_token_trace_names():
    bb = vlprompt.load_backbone("vlp-small")
    rows = mpl(bb).method.token_trace()
    assert [r["after"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9]
    assert rows[1]["alive"] == ["a1", "b1"]  # v0 removed at layer 1
    assert rows[3]["alive"] == ["a1", "a2", "a3", "b3"]  # b2 lived one block
    assert rows[11]["alive"] == [f"a{i}" for i in range(1, 9)] + ["b8"]
    assert [r["op"] for r in rows[8:10]] == ["remove 1, add 2", "carry"]


# ------------------------------------------------------------------------------ general form
SETTINGS = [
    dict(n_ctx=1, add=2, remove=1, depth=9),  # the reference configuration
    dict(n_ctx=2, add=3, remove=2, depth=6),  # p=6, r=2: +4 per layer
    dict(n_ctx=1, add=1, remove=0, depth=12),  # carry everything, add one per layer
    dict(n_ctx=2, add=2, remove="all", depth=9),  # VPT-deep-like replacement
    dict(n_ctx=3, add=2, remove=2, depth=1),  # depth 1: the shallow prompt carried through (VPT-shallow)
]


@pytest.mark.parametrize("opts", SETTINGS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_sequence_lengths_follow_spec_formula_in_plan_and_real_forward(small, opts):
    model = mpl(small, **opts)
    n, layers = small.num_image_tokens, small.image.layers
    expected = spec_lengths(n, opts["n_ctx"], opts["add"], opts["remove"], opts["depth"], layers)
    assert prompt_lengths(n, model.method.image_plan(), layers) == expected
    assert block_lengths(small, model, torch.randn(1, 3, 224, 224)) == expected
    assert [r["after"] + n for r in model.method.token_trace()] == expected


@pytest.mark.parametrize("opts", SETTINGS[:4], ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_engine_matches_direct_implementation_of_spec(small, opts):
    """The engine under MPL's plan equals SPEC §2.6 written out with open_clip's blocks."""
    model = mpl(small, **opts)
    with torch.no_grad():
        for p in model.method.text_deep:  # decorrelate deep prompts so a wrong layer index shows
            p.normal_(0, 1.0)
        img = torch.randn(1, 3, 224, 224)
        out = encode_image(small.clip.visual, img, model.method.image_plan())
        ref = reference_image_features(small, model.method, img)
        plain = encode_image(small.clip.visual, img)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out - plain).abs().max().item() > 1e-3  # the prompts do change the feature


def test_remove_all_equals_hand_built_deep_replacement_plan(tiny):
    model = mpl(tiny, n_ctx=2, add=2, remove="all", depth=4, tie_init=False)
    m = model.method
    assert model.method.remove == ALL
    with torch.no_grad():
        layers = {
            layer: LayerOps(
                remove=ALL,
                append=torch.cat(
                    [m.proj[layer - 1](m.text_deep[layer - 1]), m.proj[3 + layer - 1](m.text_deep[layer - 1])]
                ),
            )
            for layer in (1, 2, 3)
        }
        hand = TowerPlan(shallow=m.proj0(m.ctx), layers=layers)
        img = torch.randn(3, 3, 224, 224)
        a = encode_image(tiny.clip.visual, img, m.image_plan())
        b = encode_image(tiny.clip.visual, img, hand)
    assert (a - b).abs().max().item() <= 1e-6
    assert prompt_lengths(tiny.num_image_tokens, hand, 4) == [tiny.num_image_tokens + k for k in (2, 4, 4, 4)]


def test_depth_one_is_shallow_prompt_only(tiny):
    model = mpl(tiny, n_ctx=2, depth=1)
    m = model.method
    assert len(m.proj) == 0 and len(m.text_deep) == 0
    assert (
        model.num_trainable() == 2 * tiny.text.width + tiny.text.width * tiny.image.width + tiny.image.width
    )
    plan = m.image_plan()
    assert plan.layers == {} and plan.shallow.shape == (2, tiny.image.width)
    assert m.text_inputs().plan.layers == {}


# ------------------------------------------------------------------------------ tied projections
def test_tie_init_starts_all_projections_equal_and_independent_init_does_not(tiny):
    tied = mpl(tiny, depth=4).method
    assert len(tied.proj) == 2 * 3
    for lin in tied.proj[1:]:
        assert torch.equal(lin.weight, tied.proj[0].weight) and torch.equal(lin.bias, tied.proj[0].bias)
        assert lin.weight.data_ptr() != tied.proj[0].weight.data_ptr()  # copies, not shared storage
    free = mpl(tiny, depth=4, tie_init=False).method
    w = [lin.weight for lin in free.proj]
    assert all(not torch.equal(w[0], wi) for wi in w[1:])


def test_tied_last_layer_pair_stays_identical_under_sgd(tiny):
    """Official quirk: a_L and b_L (last prompted layer, both never removed) get identical gradients,
    so with tied init F_{1,L} == F_{2,L} forever; pairs where b_l is removed a layer later diverge."""
    images, labels, names = make_toy_task(tiny, n_classes=3, n_per_class=2)
    model = mpl(tiny, names=names, depth=4)  # ops at layers 1..3; a_3, b_3 survive to the end
    m = model.method
    w0 = m.projection(0, 3).weight.detach().clone()
    losses, _ = train_steps(model, images, labels, steps=4, lr=0.1, batch_size=6)
    assert losses[-1] < losses[0]
    a3, b3 = m.projection(0, 3), m.projection(1, 3)
    assert (a3.weight - w0).abs().max().item() > 1e-4  # it did train
    assert (a3.weight - b3.weight).abs().max().item() <= 1e-6
    assert (a3.bias - b3.bias).abs().max().item() <= 1e-6
    assert (m.projection(0, 1).weight - m.projection(1, 1).weight).abs().max().item() > 1e-5
    assert (m.projection(0, 2).weight - m.projection(1, 2).weight).abs().max().item() > 1e-5


# ------------------------------------------------------------------------------ gradients, learning
@pytest.mark.parametrize("tie_init", [True, False])
def test_gradients_reach_every_prompt_and_projection_and_nothing_else(tiny, tie_init):
    images, labels, names = make_toy_task(tiny, n_classes=3, n_per_class=2)
    model = mpl(tiny, names=names, depth=4, tie_init=tie_init)
    model.train()
    F.cross_entropy(model(images), labels).backward()
    named = dict(model.named_trainable_parameters())
    expected = {"ctx", "proj0.weight", "proj0.bias"} | {f"text_deep.{i}" for i in range(3)}
    expected |= {f"proj.{i}.{w}" for i in range(6) for w in ("weight", "bias")}
    assert set(named) == expected
    for name, p in named.items():
        assert p.dtype == torch.float32
        assert p.grad is not None and p.grad.abs().sum().item() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in tiny.clip.parameters())
    assert not model.backbone.training


def test_mpl_learns_toy_task(tiny):
    images, labels, names = make_toy_task(tiny, n_classes=4, n_per_class=4)
    model = mpl(tiny, names=names, depth=4)
    with torch.no_grad():
        model.eval()
        acc0 = float((model(images).argmax(-1) == labels).float().mean())
    losses, acc = train_steps(model, images, labels, steps=15, lr=0.1, batch_size=8)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    assert acc >= 0.9 and acc > acc0


def test_prompt_state_round_trip_gives_identical_logits(tiny):
    a = mpl(tiny, seed=1, depth=3, remove="all")
    b = mpl(tiny, seed=2, depth=3, remove="all")
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (a(img) - b(img)).abs().max().item() > 1e-4
        b.load_prompt_state_dict(a.prompt_state_dict())
        assert torch.equal(a(img), b(img))
    with pytest.raises(VlpromptError, match="does not fit method 'mpl'"):
        mpl(tiny, depth=2).load_prompt_state_dict(a.prompt_state_dict())


def test_text_is_fixed_by_default_and_data_set_template_on_request(tiny):
    """The official prompt ignores the data set's template; ``text=""`` switches to it. The
    option is not called ``template`` so it cannot clash with ``create_model(template=...)``."""
    fixed = vlprompt.create_model("mpl", tiny, ["dog"], template="{} texture.", depth=2)
    own = vlprompt.create_model("mpl", tiny, ["dog"], template="{} texture.", depth=2, text="")
    ids = lambda m, n: m.method.prompts.ids[0, :n].tolist()  # noqa: E731
    assert ids(fixed, 9) == [tiny.sot_id, *tiny.encode_words("X a photo of a dog."), tiny.eot_id]
    assert ids(own, 6) == [tiny.sot_id, *tiny.encode_words("X dog texture."), tiny.eot_id]


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "opts, message",
    [
        (
            dict(n_ctx=1, remove=2, depth=2),
            "remove=2 exceeds the 1 image prompt tokens present before layer 1",
        ),
        (dict(n_ctx=3, add=0, remove=2, depth=3), "exceeds the 1 image prompt tokens present before layer 2"),
        (dict(depth=5), r"depth=5 is outside \[1, 4\]"),
        (dict(depth=0), r"depth=0 is outside \[1, 4\]"),
        (dict(add=-1, depth=2), "options.add=-1 is invalid; it must be an integer >= 0"),
        (dict(n_ctx=0, depth=2), "options.n_ctx=0 is invalid; it must be an integer >= 1"),
        (dict(remove=-2, depth=2), "remove=-2 is invalid"),
        (dict(remove="some", depth=2), "remove='some' is not a number"),
        (dict(ctx_init="a photo", n_ctx=3, depth=2), "is 2 tokens but n_ctx=3"),
        (dict(dropout=0.1), "unknown option"),
    ],
)
def test_impossible_settings_raise_one_line_error(tiny, opts, message):
    with pytest.raises(VlpromptError, match=message) as e:
        mpl(tiny, **opts)
    assert "\n" not in str(e.value)


def test_remove_accepts_all_and_minus_one_and_numeric_strings(tiny):
    for value in ("all", "ALL", -1):
        assert mpl(tiny, n_ctx=1, depth=3, remove=value).method.prompt_counts == [1, 2, 2, 2]
    assert mpl(tiny, n_ctx=2, add=1, depth=4, remove="1").method.prompt_counts == [2, 3, 4, 5]


# ------------------------------------------------------------------------------ preset
def test_preset_is_the_reference_recipe():
    fields = {f.name for f in dataclasses.fields(MPLConfig)}
    b2n = load_preset("mpl", "base2new")
    assert set(b2n["options"]) <= fields
    assert b2n["options"] == {k: v for k, v in dataclasses.asdict(MPLConfig()).items() if k in b2n["options"]}
    assert (
        b2n["options"]["n_ctx"],
        b2n["options"]["add"],
        b2n["options"]["remove"],
        b2n["options"]["depth"],
    ) == (1, 2, 1, 9)
    t = b2n["train"]
    assert (t["optimizer"], t["lr"], t["batch_size"], t["epochs"], t["warmup_epochs"], t["scheduler"]) == (
        "sgd",
        0.0035,
        4,
        5,
        1,
        "cosine",
    )
    assert (t["momentum"], t["weight_decay"], t["warmup_lr"], t["warmup_type"]) == (
        0.9,
        0.0005,
        1e-5,
        "constant",
    )
    xd = load_preset("mpl", "cross-dataset")
    assert xd["train"]["epochs"] == 2 and xd["options"] == b2n["options"]
    assert {k: v for k, v in xd["train"].items() if k != "epochs"} == {
        k: v for k, v in t.items() if k != "epochs"
    }
