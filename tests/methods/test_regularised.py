"""KgCoOp, ProGrad, PromptSRC: regularisers zero where they must be, ProGrad's projection, Gaussian
prompt aggregation (weights, exact resume), logged loss terms, official parameter counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import load_backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.methods.common import IMAGENET_TEMPLATES
from vlprompt.methods.prograd import project_gradients
from vlprompt.methods.promptsrc import gpa_weights
from vlprompt.run import RunDir
from vlprompt.train import fit
from vlprompt.train.config import RunConfig

CLASSES = ["cat", "dog", "car"]
PHOTO = "a photo of a {}."


@pytest.fixture(scope="module")
def images(tiny):
    g = torch.Generator().manual_seed(0)
    size = tiny.preprocess_cfg["size"]
    return torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 0])


def _terms(model, x, y):
    out = model.run(x, need=model.method.needs)
    return out, *model.method.objective(out, y)


# ------------------------------------------------------------------ the typed output
def test_run_output_matches_forward_and_frozen_clip(tiny, images):
    x, _ = images
    torch.manual_seed(0)
    model = create_model("promptsrc", tiny, CLASSES, PHOTO, depth_text=2, depth_image=2)
    zs = create_model("zeroshot", tiny, CLASSES, PHOTO)
    with torch.no_grad():
        out = model.run(x, need={"zero_shot_logits"})
        assert torch.allclose(out.logits, model(x), atol=1e-5)
        # frozen entries are frozen CLIP: the zero-shot model's features of the same images
        assert torch.allclose(out.frozen_image_features, zs.encode_image(x), atol=1e-6)
        ens = model.frozen_text_features()
    assert ens is model.frozen_text_features()  # cached per class set
    assert ens.shape == (3, tiny.embed_dim)
    # the ensemble is the mean of *unnormalised* per-template features, then normalised
    raw = []
    for t in IMAGENET_TEMPLATES:
        tok = model.method.frozen_prompts(tiny, CLASSES, t)
        raw.append(model._text_tower(tok.embeds, tok.eot, None))
    assert torch.allclose(ens, F.normalize(torch.stack(raw).mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(
        out.zero_shot_logits, tiny.logit_scale * out.frozen_image_features @ ens.t(), atol=1e-4
    )
    model.set_classnames(["tree", "boat"])
    assert model.frozen_text_features().shape[0] == 2  # recomputed for the new class set
    with pytest.raises(VlpromptError, match="unknown model output"):
        model.run(x, need={"teacher"})


# ------------------------------------------------------------------ KgCoOp
def test_kgcoop_term_zero_at_init_from_the_handcrafted_words(tiny, images):
    x, y = images
    model = create_model("kgcoop", tiny, CLASSES, PHOTO)
    _, loss, terms = _terms(model, x, y)
    assert abs(terms["kg"].item()) < 1e-6  # "a photo of a {}." learned == hand-crafted at init
    assert torch.allclose(loss, terms["ce"] + 8.0 * terms["kg"])
    with torch.no_grad():
        model.method.ctx.add_(0.5 * torch.randn_like(model.method.ctx))
    _, loss, terms = _terms(model, x, y)
    assert terms["kg"].item() > 1e-3
    assert (loss - terms["ce"]).item() == pytest.approx(8.0 * terms["kg"].item(), rel=1e-5)


def test_kgcoop_uses_its_own_template_where_it_differs(tiny):
    model = create_model("kgcoop", tiny, CLASSES, "{} texture.")
    assert model.method.frozen_templates("{} texture.") == ["a photo of a {}, a type of texture."]
    assert model.method.frozen_templates(PHOTO) == [PHOTO]


# ------------------------------------------------------------------ ProGrad
def test_prograd_context_starts_as_the_handcrafted_prompt(tiny):
    template = "a photo of a {}, a type of pet."  # ProGrad's: "a type of pet, a photo of a {}."
    model = create_model("prograd", tiny, CLASSES, template)
    m = model.method
    phrase = "a type of pet, a photo of a"
    w = len(phrase.split(" "))  # 8 words but 9 tokens ("pet," is two): the last token stays frozen text
    assert torch.equal(m.ctx[: 16 - w], torch.zeros(16 - w, tiny.text.width))
    frozen = m.frozen_prompts(tiny, CLASSES, "a type of pet, a photo of a {}.")
    n_tok = int(frozen.eot[0]) - 1  # tokens between [SOS] and [EOT] of the hand-crafted prompt
    filled = m.text_inputs().embeds
    # after the 16 - w zero slots, the learned prompt reads exactly the hand-crafted prompt
    got = filled[:, 1 + 16 - w : 1 + 16 - w + n_tok]
    assert torch.allclose(got, frozen.embeds[:, 1 : 1 + n_tok])


def test_projection_removes_the_conflicting_component():
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])  # a . b < 0
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = a.clone()
    project_gradients([p], [b], 1.0)
    assert torch.allclose(p.grad, torch.tensor([1.0, 0.0]))  # a - (a . b_hat) b_hat
    p.grad = torch.tensor([1.0, 1.0])  # agrees with b: untouched
    project_gradients([p], [b], 1.0)
    assert torch.equal(p.grad, torch.tensor([1.0, 1.0]))


def test_prograd_update_never_opposes_the_kl_gradient(tiny, images):
    x, _ = images
    torch.manual_seed(0)
    model = create_model("prograd", tiny, CLASSES, PHOTO, ctx_init="")
    params = [p for p in model.trainable_parameters()]
    projected = 0
    for seed in range(4):
        with torch.no_grad():
            zs = model.run(x, need={"zero_shot_logits"}).zero_shot_logits
        # labels the zero-shot model rejects pull CE against the KL gradient
        y = (
            zs.argmin(-1)
            if seed % 2 == 0
            else torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(seed))
        )
        out, loss, terms = _terms(model, x, y)
        g_kl = torch.autograd.grad(terms["kl"], params, retain_graph=True)
        g_ce = torch.autograd.grad(terms["ce"], params, retain_graph=True)
        for p in params:
            p.grad = None
        model.method.backward(
            loss, terms, params, lambda t, retain_graph=False: t.backward(retain_graph=retain_graph)
        )
        for p, a, b in zip(params, g_ce, g_kl, strict=True):
            dot = float(torch.dot(p.grad.flatten(), b.flatten()))
            assert dot >= -1e-6 * float(a.norm() * b.norm())
            if float(torch.dot(a.flatten(), b.flatten())) < 0:
                projected += 1
                assert not torch.allclose(p.grad, a)
            else:
                assert torch.equal(p.grad, a)
        with torch.no_grad():  # move, so the next round sees another geometry
            for p in params:
                p.sub_(0.5 * p.grad)
    assert projected >= 1  # the conflicting case was exercised


# ------------------------------------------------------------------ PromptSRC
def test_promptsrc_l1_terms_zero_when_prompts_reproduce_frozen_clip(tiny, images):
    x, y = images
    # shallow text prompt initialised from the words, no image prompts, the data set's template as the
    # frozen reference: the prompted model *is* frozen CLIP, so every self-regulating term vanishes
    model = create_model(
        "promptsrc", tiny, CLASSES, PHOTO, depth_text=1, depth_image=0, frozen_templates_set="dataset"
    )
    _, loss, terms = _terms(model, x, y)
    for k in ("l1_text", "l1_image", "kl"):
        assert abs(terms[k].item()) < 1e-6, k
    assert loss.item() == pytest.approx(terms["ce"].item(), abs=1e-5)
    # the official recipe (deep random prompts, 60-template ensemble) is away from frozen CLIP
    full = create_model("promptsrc", tiny, CLASSES, PHOTO, depth_text=2, depth_image=2)
    _, loss, terms = _terms(full, x, y)
    assert terms["l1_text"].item() > 1e-4 and terms["l1_image"].item() > 1e-5
    w = {"l1_text": 25.0, "l1_image": 10.0, "kl": 1.0}
    assert loss.item() == pytest.approx(terms["ce"].item() + sum(w[k] * terms[k].item() for k in w), rel=1e-5)


def test_gpa_weights_sum_to_one_and_peak_at_the_mean():
    for epochs, mean, std in [(20, 15, 1), (20, 6, 10), (50, 30, 30), (1, 15, 1), (5, 2, 0.5)]:
        w = gpa_weights(epochs, mean, std)
        assert len(w) == epochs and math.fsum(w) == pytest.approx(1.0, abs=1e-12)
        assert max(range(epochs), key=w.__getitem__) + 1 == min(max(round(mean), 1), epochs)
    assert gpa_weights(20, 15, 1)[14] == pytest.approx(0.39894, abs=1e-4)  # 1 / sqrt(2 pi), normalised
    with pytest.raises(VlpromptError, match="gpa_std"):
        gpa_weights(5, 2, 0)


TRAIN = {"lr": 0.05, "batch_size": 2, "eval_batch_size": 4, "epochs": 3, "warmup_epochs": 1}


def _src(tiny, **kw):
    torch.manual_seed(0)
    return create_model("promptsrc", tiny, CLASSES, PHOTO, depth_text=2, depth_image=2, **kw)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 224, 224, generator=g), i % 3) for i in range(4)]


def test_promptsrc_resume_mid_run_equals_uninterrupted(tiny, data, tmp_path):
    cfg = RunConfig.from_dict({"train": TRAIN, "data": {"seed": 1}}, partial=True)
    straight = _src(tiny)
    ref = fit(straight, data, cfg, RunDir(tmp_path / "a"), progress=False)
    first = fit(_src(tiny), data, cfg, RunDir(tmp_path / "b"), progress=False, stop_after_epoch=2)
    assert first["stopped"]
    resumed = _src(tiny)
    with torch.no_grad():  # weights and the aggregate must both come from the checkpoint
        for p in resumed.method.parameters():
            p.add_(1.0)
    res = fit(resumed, data, cfg, RunDir(tmp_path / "b"), resume=True, progress=False)
    a, b = straight.prompt_state_dict(), resumed.prompt_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in ref["history"]]
    # each loss term is logged per step
    rec = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    step = next(r for r in rec if r["kind"] == "step")
    assert {"loss_ce", "loss_l1_text", "loss_l1_image", "loss_kl"} <= set(step)


def test_promptsrc_aggregate_replaces_the_last_prompt(tiny, data, tmp_path):
    cfg = RunConfig.from_dict({"train": TRAIN, "data": {"seed": 1}}, partial=True)
    seen: list[dict] = []
    model = _src(tiny, gpa_mean=1.0, gpa_std=0.05)  # all weight on epoch 1
    fit(
        model,
        data,
        cfg,
        RunDir(tmp_path / "g"),
        progress=False,
        callbacks=[lambda s: seen.append(model.prompt_state_dict())],
    )
    plain = _src(tiny, gpa=False)
    fit(plain, data, cfg, RunDir(tmp_path / "p"), progress=False)
    final, ep1, last = model.prompt_state_dict(), seen[0], plain.prompt_state_dict()
    assert all(torch.allclose(final[k], ep1[k], atol=1e-6) for k in final)  # the epoch-1 prompt
    assert not all(torch.allclose(final[k], last[k]) for k in final)


def test_resume_rejects_foreign_hook_state(tiny):
    with pytest.raises(VlpromptError, match="hook state"):
        create_model("coop", tiny, CLASSES).method.load_hook_state_dict({"gpa.ctx": torch.zeros(1)})
    with pytest.raises(VlpromptError, match="aggregation state"):
        _src(tiny).method.load_hook_state_dict({"gpa.nope": torch.zeros(1)})


# ------------------------------------------------------------------ official counts (ViT-B/16)
def test_official_parameter_counts_vit_b16():
    vitb16 = load_backbone("ViT-B-16")
    counts = {m: create_model(m, vitb16, CLASSES).num_trainable() for m in ("kgcoop", "prograd", "promptsrc")}
    assert counts == {
        "kgcoop": 4 * 512,  # KgCoOp: 4 context vectors (bias_vectors / meta_net in its code are frozen)
        "prograd": 16 * 512,
        "promptsrc": 9 * 4 * 512 + 9 * 4 * 768,  # 46,080: IVLP 4+4 at depth 9
    }


def test_text_strategy_runs_the_class_prompts(tiny, images):
    x, _ = images
    model = create_model("coop", tiny, CLASSES, n_ctx=4)
    with torch.no_grad():
        ref = model(x)

    class Reversed:  # encodes the classes in reverse order and puts them back: same features
        calls = 0

        def encode(self, m, inputs):
            Reversed.calls += 1
            feats = m.run_text(inputs.embeds.flip(0), inputs.eot.flip(0), inputs.plan)
            return feats.flip(0)

    model.set_text_strategy(Reversed())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    assert Reversed.calls == 1
