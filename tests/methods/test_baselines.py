"""The five baseline methods (coop, cocoop, ivlp, vpt, maple): parameter counts, prompt placement,
token traces, gradient reach, learning a toy task, presets and option validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from toy import make_toy_task, train_steps

from vlprompt.backbones import load_backbone
from vlprompt.engine import prompt_lengths
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import build_config, get_method
from vlprompt.methods.model import create_model

BASELINES = ["coop", "cocoop", "ivlp", "vpt", "maple"]
PRESETS = Path(__file__).resolve().parents[2] / "src" / "vlprompt" / "methods" / "presets"
# small but real deep settings for the 4-layer tiny model
TINY_OPTS = {
    "coop": {"n_ctx": 4},
    "cocoop": {},
    "ivlp": {"depth_text": 4, "depth_image": 4},
    "vpt": {"depth": 4},
    "maple": {"depth": 3},
}


@pytest.fixture(scope="module")
def vitb16():
    torch.manual_seed(0)
    return load_backbone("ViT-B-16")


# ------------------------------------------------------------------ parameter counts (ViT-B/16)
def test_trainable_counts_vit_b16(vitb16):
    counts = {m: create_model(m, vitb16, ["cat", "dog"]).num_trainable() for m in BASELINES}
    assert counts["maple"] == 3_555_072  # 2*512 + (512*768+768) + 8*2*512 + 8*(512*768+768)
    assert counts["coop"] == 16 * 512
    assert counts["cocoop"] == 4 * 512 + (512 * 32 + 32) + (32 * 512 + 512)
    assert counts["ivlp"] == 12 * 2 * 512 + 12 * 2 * 768
    assert counts["vpt"] == 12 * 8 * 768


def test_token_traces_vit_b16(vitb16):
    """VPT-deep stays at 197+8 through its depth (replace), MaPLe at 197+2; IVLP at 197+2."""
    n_inst, layers = vitb16.num_image_tokens, vitb16.image.layers
    assert n_inst == 197
    vpt = create_model("vpt", vitb16, ["cat"]).method
    assert prompt_lengths(n_inst, vpt.image_plan(), layers) == [205] * 12
    vpt3 = create_model("vpt", vitb16, ["cat"], depth=3).method
    assert sorted(vpt3.image_plan().layers) == [1, 2]  # layers 3..11 carry the last prompts
    assert prompt_lengths(n_inst, vpt3.image_plan(), layers) == [205] * 12
    maple = create_model("maple", vitb16, ["cat"]).method
    plan = maple.image_plan()
    assert sorted(plan.layers) == list(range(1, 9))
    assert prompt_lengths(n_inst, plan, layers) == [199] * 12
    ivlp = create_model("ivlp", vitb16, ["cat"]).method
    assert prompt_lengths(n_inst, ivlp.image_plan(), layers) == [199] * 12
    assert sorted(ivlp.text_inputs().plan.layers) == list(range(1, 12))


# ------------------------------------------------------------------ CoOp prompt placement
def _class_ids(backbone, name: str) -> list[int]:
    return backbone.encode_words(name)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_class_token_position(tiny, position):
    names = ["dog", "red panda"]
    m = create_model("coop", tiny, names, n_ctx=4, class_token_position=position).method
    dot = tiny.encode_words(".")
    for c, name in enumerate(names):
        cls = _class_ids(tiny, name)
        ids = m.prompts.ids[c].tolist()
        slots = m.prompts.slots[c].tolist()
        eot = int(m.prompts.eot[c])
        assert ids[0] == tiny.sot_id and ids[eot] == tiny.eot_id
        if position == "end":
            assert slots == [1, 2, 3, 4]
            assert ids[5 : 5 + len(cls)] == cls and ids[5 + len(cls) : eot] == dot
        elif position == "front":
            assert ids[1 : 1 + len(cls)] == cls
            assert slots == list(range(1 + len(cls), 5 + len(cls)))
            assert ids[5 + len(cls) : eot] == dot
        else:
            assert slots == [1, 2] + [3 + len(cls), 4 + len(cls)]
            assert ids[3 : 3 + len(cls)] == cls and ids[5 + len(cls) : eot] == dot
        assert eot == 1 + 4 + len(cls) + len(dot)
    # the context is written exactly into the slots, every other token is the frozen embedding
    embeds = m.text_inputs().embeds
    slot_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    slot_mask.scatter_(1, m.prompts.slots.cpu(), True)
    assert torch.equal(embeds[0][slot_mask[0]], m.ctx.detach())
    assert torch.equal(embeds[~slot_mask], m.prompts.embeds[~slot_mask])


def test_coop_csc_shapes_and_transfer(tiny):
    names = ["cat", "dog", "car"]
    model = create_model("coop", tiny, names, n_ctx=4, csc=True)
    ctx = model.method.ctx
    assert ctx.shape == (3, 4, tiny.text.width) and ctx.requires_grad
    emb = model.method.text_inputs().embeds
    for c in range(3):  # each class gets its own context
        assert torch.equal(emb[c, 1:5], ctx[c].detach())
    assert not torch.equal(ctx[0], ctx[1])
    with pytest.raises(VlpromptError, match="csc=true.*cannot be applied to other class names"):
        model.set_classnames(["tree", "house", "boat"])
    with pytest.raises(VlpromptError, match="csc"):
        model.set_classnames(["cat", "dog"])
    model.set_classnames(names)  # the training classes stay usable
    # class-specific context initialised from a phrase: every class starts from the phrase
    m2 = create_model("coop", tiny, names, n_ctx=4, csc=True, ctx_init="a photo of a").method
    ref = tiny.token_embed(torch.tensor(tiny.encode_words("a photo of a"))).float()
    assert torch.allclose(m2.ctx.detach(), ref.expand(3, -1, -1))


def test_coop_ctx_init_from_words(tiny):
    m = create_model("coop", tiny, ["cat"], n_ctx=4, ctx_init="a photo of a").method
    ref = tiny.token_embed(torch.tensor(tiny.encode_words("a photo of a"))).float()
    assert torch.equal(m.ctx.detach(), ref)
    with pytest.raises(VlpromptError, match="is 4 tokens but n_ctx=16"):
        create_model("coop", tiny, ["cat"], ctx_init="a photo of a")


# ------------------------------------------------------------------ MaPLe / IVLP text prompt
@pytest.mark.parametrize("method", ["maple", "ivlp"])
def test_prefix_prompt_first_two_words_learn(tiny, method):
    """'a photo of a {class}.': slots 1-2 ("a photo") learnable and initialised from them, "of a" frozen."""
    m = create_model(method, tiny, ["dog"], **TINY_OPTS[method]).method
    words = tiny.encode_words("a photo of a dog.")
    assert m.prompts.ids[0, 1 : 1 + len(words)].tolist()[2:] == words[2:]
    assert m.prompts.slots[0].tolist() == [1, 2]
    ref = tiny.token_embed(torch.tensor(words[:2])).float()
    assert torch.equal(m.ctx.detach(), ref)
    # the frozen suffix ("of a dog.") keeps its own token embeddings
    full = tiny.token_embed(tiny.tokenize(["a photo of a dog."])).float()[0]
    emb = m.text_inputs().embeds[0]
    eot = int(m.prompts.eot[0])
    assert torch.equal(emb[3 : eot + 1], full[3 : eot + 1])
    assert torch.equal(emb[1:3], ref)


def test_maple_projections_tie_init(tiny):
    tied = create_model("maple", tiny, ["cat"], depth=4).method
    w = [p.weight for p in tied.compound_prompt_projections]
    assert len(w) == 3 and all(torch.equal(w[0], x) for x in w[1:])
    assert w[0].data_ptr() != w[1].data_ptr()  # copies, not shared storage
    free = create_model("maple", tiny, ["cat"], depth=4, tie_init=False).method
    assert not torch.equal(
        free.compound_prompt_projections[0].weight, free.compound_prompt_projections[1].weight
    )
    # image prompts are the projections of that layer's text prompts
    plan = tied.image_plan()
    assert torch.allclose(plan.shallow, tied.proj(tied.ctx))
    t2 = tied.compound_prompts_text[1]
    assert torch.allclose(plan.layers[2].append, tied.compound_prompt_projections[1](t2))
    assert tied.text_inputs().plan.layers[2].replace is t2


# ------------------------------------------------------------------ CoCoOp batching
def test_cocoop_batched_equals_per_image_loop(tiny):
    names = ["cat", "dog", "red panda"]
    torch.manual_seed(1)
    model = create_model("cocoop", tiny, names).eval()
    with torch.no_grad():  # move the meta-net off its init so the bias really differs per image
        for p in model.method.meta_net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    images, _, _ = make_toy_task(tiny, n_classes=3, n_per_class=1)
    with torch.no_grad():
        img = model.encode_image(images)
        batched = model.logits_from_features(img)
        loop = []
        for b in range(img.shape[0]):
            inputs = model.method.text_inputs(img[b : b + 1])
            assert inputs.embeds.shape[0] == len(names)
            txt = F.normalize(model.run_text(inputs.embeds, inputs.eot, inputs.plan), dim=-1)
            loop.append(model.backbone.logit_scale * img[b] @ txt.t())
        loop = torch.stack(loop)
        model.options.text_chunk = 2  # chunks cut across images: 9 sequences in 5 calls
        chunked = model.logits_from_features(img)
    assert batched.shape == (3, 3)
    assert torch.allclose(batched, loop, atol=1e-5)
    assert torch.allclose(chunked, batched, atol=1e-5)
    # the prompts really depend on the image: different images give different text features
    t = model.encode_text(img)
    assert (t[0] - t[1]).abs().max() > 1e-4


# ------------------------------------------------------------------ gradient reach
@pytest.mark.parametrize("method", BASELINES)
def test_gradients_reach_only_prompts(tiny, method):
    images, labels, names = make_toy_task(tiny, n_per_class=1)
    model = create_model(method, tiny, names, **TINY_OPTS[method])
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    assert all(p.grad is None for p in tiny.parameters())
    assert all(not p.requires_grad for p in tiny.parameters())
    params = model.named_trainable_parameters()
    assert params and all(
        n.startswith(("ctx", "meta_net", "proj", "compound", "text_deep", "image_")) for n, _ in params
    )
    for n, p in params:  # every prompt (each deep layer too) influences the loss
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert {id(p) for _, p in params} == {id(p) for p in model.method.parameters()}


# ------------------------------------------------------------------ learning the toy task
LEARN = {  # (lr, steps) tuned on vlp-tiny; chance is 0.25
    "coop": (0.02, 30),
    "cocoop": (0.3, 20),
    "ivlp": (0.005, 25),
    "vpt": (0.3, 25),
    "maple": (0.01, 30),
}


@pytest.mark.parametrize("method", BASELINES)
def test_learns_toy_task(tiny, method):
    images, labels, names = make_toy_task(tiny, n_classes=4, n_per_class=4)
    torch.manual_seed(0)
    model = create_model(method, tiny, names, **TINY_OPTS[method])
    lr, steps = LEARN[method]
    losses, acc = train_steps(model, images, labels, steps=steps, lr=lr, batch_size=8)
    first, last = losses[0], sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert acc >= 0.9, acc


# ------------------------------------------------------------------ presets and validation
@pytest.mark.parametrize("method", BASELINES)
def test_preset_builds_config(method):
    preset = yaml.safe_load((PRESETS / f"{method}.yaml").read_text())
    assert preset["method"] == method
    cls = get_method(method)
    cfg = build_config(cls, preset["options"])
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert set(preset["options"]) == fields  # the preset spells out the whole recipe
    assert cfg == cls.Config()  # dataclass defaults are the official recipe
    train = preset["train"]
    assert train["optimizer"] == "sgd" and train["momentum"] == 0.9 and train["weight_decay"] == 0.0005
    from vlprompt.train.config import PROTOCOLS, load_preset

    for proto in (None, *PROTOCOLS):  # the trainer's loader merges each protocol's overrides
        merged = load_preset(method, proto)
        build_config(cls, merged["options"])
    if method == "maple":
        assert load_preset("maple", "cross-dataset")["options"]["depth"] == 3
        assert load_preset("maple", "base2new")["options"]["depth"] == 9


def test_preset_recipes_match_spec():
    def load(m):
        return yaml.safe_load((PRESETS / f"{m}.yaml").read_text())

    got = {
        m: (load(m)["train"]["lr"], load(m)["train"]["batch_size"], load(m)["train"]["epochs"])
        for m in BASELINES
    }
    assert got == {
        "coop": (0.002, 32, 200),
        "cocoop": (0.002, 1, 10),
        "ivlp": (0.0035, 4, 5),
        "vpt": (0.0025, 4, 5),
        "maple": (0.0035, 4, 5),
    }
    assert load("coop")["train"]["epochs_by_shots"] == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    cross = load("maple")["protocols"]["cross-dataset"]
    assert cross == {"options": {"depth": 3}, "train": {"lr": 0.0026, "epochs": 2}}


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("coop", {"n_ctx": 0}, "n_ctx=0"),
        ("coop", {"class_token_position": "left"}, "class_token_position 'left'"),
        ("cocoop", {"n_ctx": 2}, "is 4 tokens but n_ctx=2"),
        ("ivlp", {"depth_text": 5}, "depth 5 is outside \\[1, 4\\] for the text tower"),
        ("ivlp", {"depth_image": 9}, "for the image tower"),
        ("ivlp", {"n_ctx_text": 5}, "at least 5 tokens"),
        ("vpt", {"depth": 0}, "depth 0"),
        ("vpt", {"init": "xavier"}, "options.init='xavier' is invalid; choose one of: normal, uniform"),
        ("vpt", {"text": "a photo"}, "no '\\{\\}' placeholder"),
        ("maple", {"depth": 7}, "outside \\[1, 4\\]"),
        ("maple", {"n_ctx": 0}, "n_ctx=0"),
        ("maple", {"depth_text": 3}, "unknown option"),
    ],
)
def test_invalid_options_one_line_errors(tiny, method, options, message):
    with pytest.raises(VlpromptError, match=message) as err:
        create_model(method, tiny, ["cat", "dog"], **{**TINY_OPTS[method], **options})
    assert "\n" not in str(err.value)


def test_ivlp_image_prompting_off(tiny):
    model = create_model("ivlp", tiny, ["cat"], depth_image=0, depth_text=2)
    assert model.method.image_plan() is None
    assert model.num_trainable() == 2 * 2 * tiny.text.width


# ------------------------------------------------------------------ official inits
def test_vpt_default_init_is_official_normal(tiny):
    """MaPLe repo's VPT baseline (the source of the vpt recipe) inits every prompt N(0, 0.02^2)."""
    from vlprompt.methods.vpt import VPTConfig

    assert VPTConfig().init == "normal"
    torch.manual_seed(0)
    p = create_model("vpt", tiny, ["cat"], n_ctx=64, depth=4).method.image_prompts
    assert abs(p.std().item() - 0.02) < 0.001  # U(-v, v) on vlp-tiny would give std 0.025
    assert p.abs().max().item() > 0.05  # and never exceed v = 0.043
