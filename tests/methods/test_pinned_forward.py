"""Every registered method's logits (and the regularised methods' loss terms) against a plainly written,
independent reference.

The reference below shares no code with ``vlprompt.engine`` or ``vlprompt.methods``: it tokenises each
class prompt as a string with open_clip's tokenizer, writes the learnable vectors into the slots itself,
and runs both towers block by block from open_clip's weights, with multi-head attention written out
(``in_proj`` / heads / scaled scores / mask / softmax / ``out_proj``).  What each method computes is
written here from its paper and docstring (DPL: from docs/dpl.md, since DPL is reconstructed from the
paper's abstract); only the method's *parameter values* are read from the model, by name.  Every
parameter is first set to fresh random values, so an initialisation that happens to hide a wrong index
(zeros, tied copies) cannot.

A sign, order or index change in a method file makes one of these fail
(``tests/mutation/hand_mutants.py``, recorded in docs/testing.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.methods.common import IMAGENET_TEMPLATES

CLASSES = ["cat", "golden retriever", "sea lion with a long name"]
TEMPLATE = "a photo of a {}."
TOL = 1e-5  # on logits of size ~3 (measured: <= 4e-6)


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlp-tiny")


@pytest.fixture(scope="module")
def images(bb):
    g = torch.Generator().manual_seed(5)
    s = bb.preprocess_cfg["size"]
    return torch.randn(3, 3, s, s, generator=g)


def build(bb, method: str, template: str = TEMPLATE, **options):
    model = vlprompt.create_model(method, bb, CLASSES, template, **options)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.method.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    return model


def P(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.method.named_parameters()}


# ----------------------------------------------------------------------------- hand-written CLIP
def attention(block, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Multi-head self-attention of ``block.attn`` on ``x`` (N, L, D); ``allowed`` (N, L, L) bool or None."""
    mha = block.attn
    n, length, d = x.shape
    h = mha.num_heads
    hd = d // h
    qkv = x @ mha.in_proj_weight.t() + mha.in_proj_bias
    q, k, v = (t.reshape(n, length, h, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
    return out @ mha.out_proj.weight.t() + mha.out_proj.bias


def block_forward(block, x: torch.Tensor, attend) -> torch.Tensor:
    """One pre-LN residual block; ``attend(block, ln_1(x)) -> (N, L, D)``."""
    x = x + attend(block, block.ln_1(x))
    h = block.ln_2(x)
    return x + block.mlp.c_proj(block.mlp.gelu(block.mlp.c_fc(h)))


def causal(n: int, length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril().expand(n, -1, -1)


def tokens(bb, texts: list[str]) -> torch.Tensor:
    return bb.tokenize(texts)


def text_tower(bb, texts, slots_fill, deep: dict[int, tuple[list[int], torch.Tensor]] | None = None):
    """Unnormalised text features.  ``slots_fill``: (positions, (n, d) or (N, n, d)) written over the token
    embeddings; ``deep``: before block l, ``(positions, vectors)`` overwrite those positions (no positional
    embedding).  Causal attention, pooled at each sequence's end-of-text."""
    clip = bb.clip
    ids = tokens(bb, texts)
    n, length = ids.shape
    eot = ids.argmax(-1)
    emb = clip.token_embedding(ids).clone()
    if slots_fill is not None:
        pos, vec = slots_fill
        for i in range(n):
            emb[i, pos[i]] = vec if vec.dim() == 2 else vec[i]
    x = emb + clip.positional_embedding
    for layer, block in enumerate(clip.transformer.resblocks):
        if deep and layer in deep:
            pos, vec = deep[layer]
            x = x.clone()
            for i in range(n):
                x[i, pos[i]] = vec if vec.dim() == 2 else vec[i]  # shared, or per class (TCP)
        x = block_forward(block, x, lambda b, h: attention(b, h, causal(n, length)))
    pooled = clip.ln_final(x[torch.arange(n), eot])
    return pooled @ clip.text_projection


def image_tower(bb, imgs, shallow=None, per_layer=None, attend=None, after_ln_pre=None):
    """Unnormalised image features.  ``shallow`` (k, d) appended after the positional embedding, before
    ``ln_pre``; ``after_ln_pre`` appended after it; ``per_layer(layer, x, n_inst) -> x`` edits the prompt
    tail before each block; ``attend(layer, block, h, n_inst)`` replaces full self-attention."""
    v = bb.clip.visual
    x = F.conv2d(imgs, v.conv1.weight, stride=v.conv1.stride)  # (B, D, g, g)
    b, d = x.shape[:2]
    x = x.reshape(b, d, -1).transpose(1, 2)
    x = torch.cat([v.class_embedding.view(1, 1, d).expand(b, 1, d), x], dim=1) + v.positional_embedding
    n_inst = x.shape[1]
    if shallow is not None:
        x = torch.cat([x, shallow.expand(b, -1, -1)], dim=1)
    x = v.ln_pre(x)
    if after_ln_pre is not None:
        x = torch.cat([x, after_ln_pre.expand(b, -1, -1)], dim=1)
    for layer, block in enumerate(v.transformer.resblocks):
        if per_layer is not None:
            x = per_layer(layer, x, n_inst)
        if attend is None:
            x = block_forward(block, x, lambda blk, h: attention(blk, h, None))
        else:
            x = block_forward(block, x, lambda blk, h, layer=layer: attend(layer, blk, h, n_inst))
    return v.ln_post(x[:, 0]) @ v.proj


def logits(bb, img_feat, txt_feat):
    img = img_feat / img_feat.norm(dim=-1, keepdim=True)
    txt = txt_feat / txt_feat.norm(dim=-1, keepdim=True)
    scale = bb.clip.logit_scale.exp()
    if txt.dim() == 3:
        return scale * torch.einsum("be,bce->bc", img, txt)
    return scale * img @ txt.t()


def x_slots(bb, texts) -> list[list[int]]:
    """Positions of the placeholder word "X" in each tokenised prompt (the learnable slots)."""
    x_id = int(tokens(bb, ["X"])[0, 1])
    ids = tokens(bb, texts)
    return [[j for j in range(ids.shape[1]) if int(ids[i, j]) == x_id] for i in range(len(texts))]


def replace_tail(x, n_inst, new):
    """Drop every prompt after the instances, append ``new`` (k, d)."""
    return torch.cat([x[:, :n_inst], new.expand(x.shape[0], -1, -1)], dim=1)


def check(model, images, ref):
    with torch.no_grad():
        got = model(images)
    err = (got - ref).abs().max().item()
    assert err <= TOL, err
    return err


# ----------------------------------------------------------------------------- the methods
@pytest.mark.parametrize(
    ("template", "text", "used"),
    [
        ("a blurry photo of a {}.", "", "a blurry photo of a {}."),
        (TEMPLATE, "art of the {}.", "art of the {}."),
    ],
)
def test_zeroshot(bb, images, template, text, used):
    """The data set's template, or the ``text`` option when set."""
    model = build(bb, "zeroshot", template=template, text=text)
    with torch.no_grad():
        txt = text_tower(bb, [used.format(c) for c in CLASSES], None)
        ref = logits(bb, image_tower(bb, images), txt)
    check(model, images, ref)


@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_coop(bb, images, position):
    n = 4
    model = build(bb, "coop", n_ctx=n, class_token_position=position)
    ctx = P(model)["ctx"]
    xs = " ".join(["X"] * n)
    texts = {
        "end": [f"{xs} {c}." for c in CLASSES],
        "front": [f"{c} {xs}." for c in CLASSES],
        "middle": [f"X X {c} X X." for c in CLASSES],
    }[position]
    with torch.no_grad():
        txt = text_tower(bb, texts, (x_slots(bb, texts), ctx))
        ref = logits(bb, image_tower(bb, images), txt)
    check(model, images, ref)


def test_coop_class_specific(bb, images):
    model = build(bb, "coop", n_ctx=3, csc=True)
    ctx = P(model)["ctx"]  # (C, 3, d): class c uses ctx[c]
    texts = [f"X X X {c}." for c in CLASSES]
    with torch.no_grad():
        txt = text_tower(bb, texts, (x_slots(bb, texts), ctx))
        ref = logits(bb, image_tower(bb, images), txt)
    check(model, images, ref)


def test_cocoop(bb, images):
    model = build(bb, "cocoop", n_ctx=4, ctx_init="a photo of a")
    p = P(model)
    texts = [f"a photo of a {c}." for c in CLASSES]
    slots = [[1, 2, 3, 4]] * len(CLASSES)
    with torch.no_grad():
        img = image_tower(bb, images)
        x = img / img.norm(dim=-1, keepdim=True)
        h = torch.relu(x @ p["meta_net.0.weight"].t() + p["meta_net.0.bias"])
        bias = h @ p["meta_net.2.weight"].t() + p["meta_net.2.bias"]  # (B, d)
        txt = torch.stack([text_tower(bb, texts, (slots, p["ctx"] + bias[b])) for b in range(len(images))])
        ref = logits(bb, img, txt)
    check(model, images, ref)


def _independent_deep(bb, p, images, n_txt, depth_txt, depth_img, prefix="a photo of a"):
    """IVLP/PromptSRC: the first n_txt tokens of "<prefix> {c}." learn; deep text slots replaced at
    layers 1..depth_txt-1; image prompts appended before ln_pre and replaced at layers 1..depth_img-1."""
    texts = [f"{prefix} {c}." for c in CLASSES]
    slots = [list(range(1, 1 + n_txt))] * len(CLASSES)
    deep = {layer: (slots, p[f"text_deep.{layer - 1}"]) for layer in range(1, depth_txt)}
    txt = text_tower(bb, texts, (slots, p["ctx"]), deep)
    prompts = p["image_prompts"]

    def per_layer(layer, x, n_inst):
        return replace_tail(x, n_inst, prompts[layer]) if 1 <= layer < depth_img else x

    return image_tower(bb, images, shallow=prompts[0], per_layer=per_layer), txt


def test_ivlp(bb, images):
    model = build(bb, "ivlp", n_ctx_text=2, n_ctx_image=3, depth_text=3, depth_image=4)
    with torch.no_grad():
        img, txt = _independent_deep(bb, P(model), images, 2, 3, 4)
        ref = logits(bb, img, txt)
    check(model, images, ref)


def test_promptsrc_forward(bb, images):
    model = build(bb, "promptsrc", depth_text=4, depth_image=3, n_ctx_text=3, n_ctx_image=2)
    with torch.no_grad():
        img, txt = _independent_deep(bb, P(model), images, 3, 4, 3)
        ref = logits(bb, img, txt)
    check(model, images, ref)


def test_vpt(bb, images):
    model = build(bb, "vpt", n_ctx=3, depth=3, text="a sketch of a {}.")
    prompts = P(model)["image_prompts"]

    def per_layer(layer, x, n_inst):
        return replace_tail(x, n_inst, prompts[layer]) if 1 <= layer < 3 else x

    with torch.no_grad():
        txt = text_tower(bb, [f"a sketch of a {c}." for c in CLASSES], None)
        ref = logits(bb, image_tower(bb, images, shallow=prompts[0], per_layer=per_layer), txt)
    check(model, images, ref)


def linear(p, name, x):
    return x @ p[f"{name}.weight"].t() + p[f"{name}.bias"]


def test_maple(bb, images):
    depth = 3
    model = build(bb, "maple", n_ctx=2, depth=depth)
    p = P(model)
    texts = [f"a photo of a {c}." for c in CLASSES]
    slots = [[1, 2]] * len(CLASSES)
    deep_t = [p[f"compound_prompts_text.{i}"] for i in range(depth - 1)]
    with torch.no_grad():
        txt = text_tower(bb, texts, (slots, p["ctx"]), {i + 1: (slots, t) for i, t in enumerate(deep_t)})

        def per_layer(layer, x, n_inst):
            if 1 <= layer < depth:
                return replace_tail(
                    x, n_inst, linear(p, f"compound_prompt_projections.{layer - 1}", deep_t[layer - 1])
                )
            return x

        img = image_tower(bb, images, shallow=linear(p, "proj", p["ctx"]), per_layer=per_layer)
        ref = logits(bb, img, txt)
    check(model, images, ref)


@pytest.mark.parametrize("remove", [1, "all", 0])
def test_mpl(bb, images, remove):
    n_ctx, add, depth = 2, 2, 4
    model = build(bb, "mpl", n_ctx=n_ctx, add=add, remove=remove, depth=depth)
    p = P(model)
    texts = [f"X X a photo of a {c}." for c in CLASSES]
    slots = [[1, 2]] * len(CLASSES)
    deep_t = {layer: p[f"text_deep.{layer - 1}"] for layer in range(1, depth)}
    with torch.no_grad():
        txt = text_tower(bb, texts, (slots, p["ctx"]), {layer: (slots, t) for layer, t in deep_t.items()})

        def per_layer(layer, x, n_inst):
            if not 1 <= layer < depth:
                return x
            present = x.shape[1] - n_inst
            r = present if remove == "all" else remove
            x = x[:, : x.shape[1] - r]
            # F_{k,l}: added token group k at layer l is proj[k * (depth - 1) + (l - 1)]
            new = [linear(p, f"proj.{k * (depth - 1) + layer - 1}", deep_t[layer]) for k in range(add)]
            return torch.cat([x, torch.cat(new).expand(x.shape[0], -1, -1)], dim=1)

        img = image_tower(bb, images, shallow=linear(p, "proj0", p["ctx"]), per_layer=per_layer)
        ref = logits(bb, img, txt)
    check(model, images, ref)


def _kgcoop_ref(bb, model, images):
    p = P(model)
    texts = [f"X X X X {c}." for c in CLASSES]
    img = image_tower(bb, images)
    txt = text_tower(bb, texts, (x_slots(bb, texts), p["ctx"]))
    return img, txt


def test_kgcoop_forward_and_loss(bb, images):
    model = build(bb, "kgcoop", n_ctx=4, weight=8.0)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        img, txt = _kgcoop_ref(bb, model, images)
        ref = logits(bb, img, txt)
        frozen = text_tower(bb, [f"a photo of a {c}." for c in CLASSES], None)
        t = txt / txt.norm(dim=-1, keepdim=True)
        f = frozen / frozen.norm(dim=-1, keepdim=True)
        kg = 1 - (t * f).sum(-1).mean()  # 1 - mean cosine; both already unit length
        ce = -ref.log_softmax(-1)[torch.arange(3), labels].mean()
        out = model.run(images, need=model.method.needs)
        loss, terms = model.method.objective(out, labels)
    check(model, images, ref)
    assert abs(terms["kg"].item() - kg.item()) <= 1e-6 and kg.item() > 1e-3
    assert abs(terms["ce"].item() - ce.item()) <= 1e-5
    assert abs(loss.item() - (ce + 8.0 * kg).item()) <= 1e-5


PETS = "a photo of a {}, a type of pet."


def test_tcp_forward_and_loss(bb, images):
    """TCP on the pets template: "[SOS] X X X X {c}, a type of pet." with the context in the X slots; the
    frozen features of "a photo of a {c}, a type of pet." through Linear - QuickGELU - Linear give 4
    tokens per class that overwrite positions 1..4 before block 3 (class_depth 3 of the 4 blocks)."""
    model = build(bb, "tcp", PETS, class_depth=3)
    p, labels = P(model), torch.tensor([1, 2, 0])
    with torch.no_grad():
        frozen = text_tower(bb, [PETS.format(c) for c in CLASSES], None)
        f = frozen / frozen.norm(dim=-1, keepdim=True)
        h = f @ p["meta_net.linear1.weight"].t() + p["meta_net.linear1.bias"]
        h = h * torch.sigmoid(1.702 * h)
        tok = (h @ p["meta_net.linear2.weight"].t() + p["meta_net.linear2.bias"]).view(3, 4, -1)
        texts = [f"X X X X {c}, a type of pet." for c in CLASSES]
        txt = text_tower(bb, texts, (x_slots(bb, texts), p["ctx"]), {2: ([[1, 2, 3, 4]] * 3, tok)})
        ref = logits(bb, image_tower(bb, images), txt)
        t = txt / txt.norm(dim=-1, keepdim=True)
        kg = 1 - (t * f).sum(-1).mean()
        ce = -ref.log_softmax(-1)[torch.arange(3), labels].mean()
        out = model.run(images, need=model.method.needs)
        loss, terms = model.method.objective(out, labels)
    check(model, images, ref)
    assert abs(terms["kg"].item() - kg.item()) <= 1e-6 and kg.item() > 1e-3
    assert abs(terms["ce"].item() - ce.item()) <= 1e-5
    assert abs(loss.item() - (ce + 8.0 * kg).item()) <= 1e-5


def test_prograd_forward_and_loss(bb, images):
    """ProGrad's prompt on a pets-like template: ProGrad's own template "a type of pet, a photo of a {}."
    has 8 space-separated words, 9 tokens: 16 slots (the last 8 start from those tokens), then the 9th
    token "a" stays frozen text before the class name."""
    model = build(bb, "prograd", template=PETS, n_ctx=16, temperature=2.0)
    p = P(model)
    xs = " ".join(["X"] * 16)
    texts = [f"{xs} a {c}." for c in CLASSES]
    labels = torch.tensor([1, 1, 0])
    with torch.no_grad():
        img = image_tower(bb, images)
        txt = text_tower(bb, texts, (x_slots(bb, texts), p["ctx"]))
        ref = logits(bb, img, txt)
        zs_txt = text_tower(bb, [f"a type of pet, a photo of a {c}." for c in CLASSES], None)
        zs = logits(bb, img, zs_txt)
        t = 2.0
        kl = (-(zs / t).softmax(-1) * (ref / t).log_softmax(-1)).sum(-1).mean() * t * t
        ce = -ref.log_softmax(-1)[torch.arange(3), labels].mean()
        out = model.run(images, need=model.method.needs)
        loss, terms = model.method.objective(out, labels)
    check(model, images, ref)
    assert (out.zero_shot_logits - zs).abs().max().item() <= TOL
    assert abs(terms["kl"].item() - kl.item()) <= 1e-5
    assert abs(terms["ce"].item() - ce.item()) <= 1e-5 and abs(loss.item() - ce.item()) <= 1e-5


def test_prograd_projection_by_hand():
    """``g_ce`` against ``g_kl`` loses lam times its component along ``g_kl``; agreeing gradients pass."""
    from vlprompt.methods.prograd import project_gradients

    a = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    b.grad = torch.tensor([1.0, 1.0, 0.0])
    g_kl = [torch.tensor([[-1.0, 0.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0, 1.0])]
    project_gradients([a, b], g_kl, lam=0.5)
    # a: dot = -1 < 0; unit guide (-1, 0, 0, 0); component -1 -> a - 0.5 * (-1) * (-1, 0, 0, 0)
    assert torch.allclose(a.grad, torch.tensor([[0.5, 2.0], [0.0, -1.0]]))
    assert torch.equal(b.grad, torch.tensor([1.0, 1.0, 0.0]))  # dot = 2 > 0: unchanged


def test_prograd_backward_projects_ce_gradient(bb, images):
    """The update ProGrad's backward leaves in ``ctx.grad`` is the hand-projected CE gradient: labels
    opposite to zero-shot CLIP's choice make the two gradients disagree, so the projection is live."""
    model = build(bb, "prograd", n_ctx=6, ctx_init="")
    model.train()
    ctx = model.method.ctx
    texts = [f"X X X X X X {c}." for c in CLASSES]
    with torch.no_grad():
        img = image_tower(bb, images)
        zs = logits(bb, img, text_tower(bb, [f"a photo of a {c}." for c in CLASSES], None))
    labels = zs.argmin(-1)
    leaf = ctx.detach().clone().requires_grad_(True)
    ref = logits(bb, img, text_tower(bb, texts, (x_slots(bb, texts), leaf)))
    ce = F.cross_entropy(ref, labels)
    kl = (-zs.softmax(-1) * ref.log_softmax(-1)).sum(-1).mean()
    g_ce, g_kl = (torch.autograd.grad(t, leaf, retain_graph=True)[0] for t in (ce, kl))
    cos = (g_ce * g_kl).sum() / (g_ce.norm() * g_kl.norm())
    assert cos < -0.05, float(cos)  # the case is one where ProGrad projects
    unit = g_kl / g_kl.norm()
    expect = g_ce - (g_ce * unit).sum() * unit

    out = model.run(images, need=model.method.needs)
    loss, terms = model.method.objective(out, labels)
    model.method.backward(
        loss, terms, [ctx], lambda t, retain_graph=False: t.backward(retain_graph=retain_graph)
    )
    scale = expect.abs().max().item()
    assert (ctx.grad - expect).abs().max().item() <= 1e-5 * scale
    assert abs((ctx.grad * unit).sum().item()) <= 1e-5 * ctx.grad.norm().item()  # nothing left along g_kl
    assert (ctx.grad - g_ce).abs().max().item() > 1e-2 * scale  # and it did change the CE gradient


def test_promptsrc_loss_terms(bb, images):
    depth_t, depth_i = 3, 2
    model = build(bb, "promptsrc", depth_text=depth_t, depth_image=depth_i, n_ctx_text=2, n_ctx_image=2)
    labels = torch.tensor([2, 2, 0])
    with torch.no_grad():
        img, txt = _independent_deep(bb, P(model), images, 2, depth_t, depth_i)
        ref = logits(bb, img, txt)
        frozen_img = image_tower(bb, images)
        total = sum(text_tower(bb, [t.format(c) for c in CLASSES], None) for t in IMAGENET_TEMPLATES)
        frozen_txt = total / len(IMAGENET_TEMPLATES)
        zs = logits(bb, frozen_img, frozen_txt)
        unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
        l1_text = (unit(txt) - unit(frozen_txt)).abs().mean()
        l1_image = (unit(img) - unit(frozen_img)).abs().mean()
        p_zs, logp = zs.softmax(-1), ref.log_softmax(-1)
        kl = (p_zs * (p_zs.log() - logp)).sum() / ref.numel()
        ce = -logp[torch.arange(3), labels].mean()
        out = model.run(images, need=model.method.needs)
        loss, terms = model.method.objective(out, labels)
    check(model, images, ref)
    for name, want in {"ce": ce, "l1_text": l1_text, "l1_image": l1_image, "kl": kl}.items():
        assert abs(terms[name].item() - want.item()) <= 1e-6 * max(1.0, abs(want.item())), name
        assert want.item() > 1e-4, name  # every term is live in this case
    assert abs(loss.item() - (ce + 25 * l1_text + 10 * l1_image + kl).item()) <= 1e-5


def test_promptsrc_gaussian_aggregation(bb):
    """After epoch e of E the prompts enter a running sum with weight N(e; mean, std) / sum_k N(k);
    after the last epoch the sum replaces the prompts."""
    model = build(bb, "promptsrc", depth_text=2, depth_image=2, gpa_mean=2.0, gpa_std=1.0)
    m = model.method
    seen = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            m.ctx.fill_(float(epoch))
        seen.append(float(epoch))
        m.on_epoch_end(epoch, 3)
    w = [math.exp(-0.5 * ((e - 2.0) / 1.0) ** 2) for e in (1, 2, 3)]
    want = sum(wi * s for wi, s in zip(w, seen)) / sum(w)
    assert torch.allclose(m.ctx, torch.full_like(m.ctx, want), atol=1e-6)


# ----------------------------------------------------------------------------- DPL (our reconstruction)
def _dpl_attention(block, h, n_inst, *, alpha, exact, drop_pp, prompts_first, key_ok, causal_inst):
    """docs/dpl.md written out: instance rows (1 - alpha) softmax(S_xx) V_x + alpha softmax(S_xp) V_p;
    prompt rows softmax over [valid instances; prompts] (drop_pp: valid instances only); exact mode is
    plain attention under the joint mask; prompts_first: instance rows read P + Attn_p re-projected."""
    mha = block.attn
    n, length, d = h.shape
    heads = mha.num_heads
    hd = d // heads
    if length == n_inst:
        allowed = causal(n, length) if causal_inst else None
        return attention(block, h, allowed)
    w, bias = mha.in_proj_weight, mha.in_proj_bias

    def proj(t, i):
        y = t @ w[i * d : (i + 1) * d].t() + bias[i * d : (i + 1) * d]
        return y.reshape(n, t.shape[1], heads, hd).transpose(1, 2)

    def soft(q, k, v, ok):
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if ok is not None:
            s = s.masked_fill(~ok[:, None], float("-inf"))
        return s.softmax(-1) @ v

    def merge(o):
        return o.transpose(1, 2).reshape(n, o.shape[2], d) @ mha.out_proj.weight.t() + mha.out_proj.bias

    n_p = length - n_inst
    hx, hp = h[:, :n_inst], h[:, n_inst:]
    qx, kx, vx = proj(hx, 0), proj(hx, 1), proj(hx, 2)
    qp, kp, vp = proj(hp, 0), proj(hp, 1), proj(hp, 2)
    key_ok = torch.ones(n, n_inst, dtype=torch.bool) if key_ok is None else key_ok
    inst_ok = causal(n, n_inst) if causal_inst else torch.ones(n, n_inst, n_inst, dtype=torch.bool)
    # prompt rows
    if drop_pp:
        o_p = soft(qp, kx, vx, key_ok[:, None, :].expand(-1, n_p, -1))
    else:
        ok = torch.cat(
            [key_ok[:, None, :].expand(-1, n_p, -1), torch.ones(n, n_p, n_p, dtype=torch.bool)], -1
        )
        o_p = soft(qp, torch.cat([kx, kp], 2), torch.cat([vx, vp], 2), ok)
    if prompts_first:
        updated = hp + merge(o_p)
        kp, vp = proj(updated, 1), proj(updated, 2)
    # instance rows
    if exact:
        ok = torch.cat([inst_ok, torch.ones(n, n_inst, n_p, dtype=torch.bool)], -1)
        o_x = soft(qx, torch.cat([kx, kp], 2), torch.cat([vx, vp], 2), ok)
    else:
        a = alpha.view(1, -1, 1, 1)
        o_x = (1 - a) * soft(qx, kx, vx, inst_ok) + a * soft(qx, kp, vp, None)
    return merge(torch.cat([o_x, o_p], 2))


def _dpl_stream(p, prefix, depth, layers, *, carry, beta, keep, closed=False):
    """Per layer: the prompt edit before the block and the gate used there (None = exact mode).
    A learnable beta is sigmoid of the stream's ``beta_logit``; a closed gate is alpha = 0."""
    if f"{prefix}.beta_logit" in p:
        beta = torch.sigmoid(p[f"{prefix}.beta_logit"])

    def edit(layer, x, n_inst):
        if layer == 0:
            return x
        if 1 <= layer < depth:
            new = p[f"{prefix}.prompts"][layer].expand(x.shape[0], -1, -1)
            if carry:
                new = beta * x[:, n_inst:] + (1 - beta) * new
            return torch.cat([x[:, :n_inst], new], dim=1)
        if not keep and layer == depth:
            return x[:, :n_inst]
        return x

    def alpha(layer):
        a = p.get(f"{prefix}.gates.{layer}.a")
        return None if a is None else torch.zeros_like(a) if closed else torch.sigmoid(a)

    return edit, alpha


DPL_CASES = {
    "dpl-default": ("dpl", {}),
    "dpl-exact-remove": ("dpl", {"mode": "exact", "after_depth": "remove", "carry": False}),
    "dpl-visual-head-after-ln-pre": ("dpl-visual", {"gate": "head", "image_insert": "after_ln_pre"}),
    "dpl-visual-drop-pp-first": ("dpl-visual", {"drop_pp": True, "prompts_first": True, "beta": 0.3}),
    "dpl-text-first": ("dpl-text", {"prompts_first": True, "beta": 0.2}),
    "dpl-text-remove-drop-pp": ("dpl-text", {"after_depth": "remove", "drop_pp": True}),
    "dpl-beta-learnable-head": ("dpl", {"beta_learnable": True, "beta": 0.2, "gate": "head"}),
    "dpl-visual-gate-closed": ("dpl-visual", {"gate_closed": True}),
}


@pytest.mark.parametrize("case", list(DPL_CASES))
def test_dpl(bb, images, case):
    method, extra = DPL_CASES[case]
    opts = {"depth_image": 3, "depth_text": 2, "n_prompts_image": 3, "n_prompts_text": 2, **extra}
    if method == "dpl-visual":
        opts.pop("depth_text"), opts.pop("n_prompts_text")
    if method == "dpl-text":
        opts.pop("depth_image"), opts.pop("n_prompts_image")
    model = build(bb, method, template="a drawing of a {}.", **opts)
    p = P(model)
    cfg = model.method.cfg
    layers = len(bb.clip.transformer.resblocks)
    kw = dict(exact=cfg.mode == "exact", drop_pp=cfg.drop_pp, prompts_first=cfg.prompts_first)
    texts = [f"a drawing of a {c}." for c in CLASSES]
    with torch.no_grad():
        if model.method.visual is not None:
            edit, alpha = _dpl_stream(
                p,
                "visual",
                cfg.depth_image,
                layers,
                carry=cfg.carry,
                beta=cfg.beta,
                keep=cfg.after_depth == "keep",
                closed=cfg.gate_closed,
            )
            first = p["visual.prompts"][0]
            after = cfg.image_insert == "after_ln_pre"

            def attend(layer, blk, h, n_inst):
                return _dpl_attention(
                    blk, h, n_inst, alpha=alpha(layer), key_ok=None, causal_inst=False, **kw
                )

            img = image_tower(
                bb, images, shallow=None if after else first, after_ln_pre=first if after else None,
                per_layer=edit, attend=attend,
            )  # fmt: skip
        else:
            img = image_tower(bb, images)
        if model.method.textual is not None:
            clip = bb.clip
            ids = tokens(bb, texts)
            n, length = ids.shape
            eot = ids.argmax(-1)
            key_ok = torch.arange(length)[None] <= eot[:, None]
            edit, alpha = _dpl_stream(
                p,
                "textual",
                cfg.depth_text,
                layers,
                carry=cfg.carry,
                beta=cfg.beta,
                keep=cfg.after_depth == "keep",
                closed=cfg.gate_closed,
            )
            x = clip.token_embedding(ids) + clip.positional_embedding
            x = torch.cat([x, p["textual.prompts"][0].expand(n, -1, -1)], dim=1)  # appended, no position
            for layer, blk in enumerate(clip.transformer.resblocks):
                x = edit(layer, x, length)
                x = block_forward(
                    blk, x,
                    lambda b, h, layer=layer: _dpl_attention(
                        b, h, length, alpha=alpha(layer), key_ok=key_ok, causal_inst=True, **kw
                    ),
                )  # fmt: skip
            txt = clip.ln_final(x[torch.arange(n), eot]) @ clip.text_projection
        else:
            txt = text_tower(bb, texts, None)
        ref = logits(bb, img, txt)
    check(model, images, ref)
