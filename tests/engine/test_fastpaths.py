"""Every fast path is exact: it gives the slow (reference-style) path's logits within float tolerance.

Fast paths: truncation after the longest EOT (also with deep text prompts), text features once per
evaluation, fused SDPA vs explicit softmax attention, text chunking, activation checkpointing, the
frozen image-feature cache, padded (compile-guarded) batches, and no gradient buffers on CLIP.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import load_backbone
from vlprompt.engine import ALL, LayerOps, TowerPlan, encode_text, plain_attention
from vlprompt.methods import ModelOptions, create_model, get_method, list_methods
from vlprompt.train.config import RunConfig
from vlprompt.train.features import FeatureCache, backbone_fingerprint, frozen_image_features, image_features

CLASSES = ["golden retriever", "tabby cat", "red fox", "hammerhead shark", "pizza"]
ATOL = 1e-4  # logits are logit_scale (about 14 at init) x cosine: 1e-4 is ~1e-5 on the cosine


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("vlp-tiny")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _options(name: str, backbone) -> dict:
    """Official defaults, with depths and block indices (``*_start`` / ``*_end``) clamped to the tiny
    backbone's 4 layers."""
    depth = min(backbone.text.layers, backbone.image.layers)
    cfg = get_method(name).Config()
    return {
        f.name: depth
        for f in dataclasses.fields(cfg)
        if ("depth" in f.name or f.name.endswith(("_start", "_end")))
        and isinstance(getattr(cfg, f.name), int)
        and getattr(cfg, f.name) > depth
    }


def _model(name: str, backbone, **execution):
    torch.manual_seed(3)
    model = ModelOptions(**execution)  # the run configuration's `model` section
    opts = _options(name, backbone)
    if "teacher_width" in {f.name for f in dataclasses.fields(get_method(name).Config)}:
        opts["teacher_width"] = backbone.embed_dim  # the teacher below: zero-shot CLIP, same backbone
    out = create_model(name, backbone, CLASSES, **opts, model=model)
    if out.method.needs_teacher:  # a method that learns from a frozen teacher: zero-shot CLIP as one
        out.set_teacher(create_model("zeroshot", backbone, CLASSES))
    return out


def _logits(model, images) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


METHODS = list_methods()


def test_all_baselines_and_ours_are_covered():
    assert {"zeroshot", "coop", "cocoop", "ivlp", "vpt", "maple", "mpl", "dpl"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_truncation_and_reference_path_are_exact(name, backbone, images):
    """Fast logits == truncation off == the full reference computation (77 tokens, explicit softmax
    attention, text recomputed per batch)."""
    model = _model(name, backbone, truncate_text=True)
    if model.method.text_from_teacher:
        pytest.skip(f"{name} runs no text tower of its own (its class features are its teacher's)")
    fast = _logits(model, images)
    feats = F.normalize(torch.randn(2, backbone.embed_dim), dim=-1)
    inputs = model.method.text_inputs(feats if model.method.image_conditioned_text else None)
    assert int(inputs.eot.max()) + 1 < backbone.context_length  # truncation really drops tokens here
    model.options.truncate_text = False
    torch.testing.assert_close(_logits(model, images), fast, atol=ATOL, rtol=0)
    model.options.cache_text, model.options.attention, model.options.share_prefix = False, "plain", False
    torch.testing.assert_close(_logits(model, images), fast, atol=ATOL, rtol=0)


def test_plain_attention_matches_sdpa_with_prompts_and_masks(backbone):
    """The explicit-softmax mode honours the causal mask and the prompts' key_valid mask like SDPA."""
    from vlprompt.engine import AttnContext, standard_attention

    mha = backbone.clip.transformer.resblocks[0].attn
    x = torch.randn(4, 9, backbone.text.width)
    key_valid = torch.arange(7).unsqueeze(0) <= torch.tensor([2, 4, 6, 3]).unsqueeze(1)
    for ctx in [
        AttnContext(n_inst=9, causal=True),
        AttnContext(n_inst=7, causal=True, key_valid=key_valid),
        AttnContext(n_inst=9, causal=False),
    ]:
        torch.testing.assert_close(
            plain_attention(mha, x, ctx), standard_attention(mha, x, ctx), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("replace_at", [1, 3])
def test_truncation_with_deep_text_prompts_and_appended_prompts(backbone, replace_at):
    """Deep prompts replacing slots (also behind the shortest EOT) and appended prompts: still exact."""
    d, n = backbone.text.width, 3
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 1000, (n, backbone.context_length), generator=g)
    embeds = backbone.token_embed(ids)
    eot = torch.tensor([4, 6, 5])
    plan = TowerPlan(
        layers={
            1: LayerOps(replace=torch.randn(2, d, generator=g), replace_at=replace_at),
            2: LayerOps(
                replace=torch.randn(n, 2, d, generator=g),
                replace_at=replace_at,
                append=torch.randn(2, d, generator=g),
            ),
            3: LayerOps(remove=ALL, append=torch.randn(n, 1, d, generator=g)),
        }
    )
    with torch.no_grad():
        fast = encode_text(backbone.clip, embeds, eot, plan, truncate=True)
        slow = encode_text(backbone.clip, embeds, eot, plan, truncate=False)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["coop", "maple", "mpl", "ivlp", "zeroshot"])
def test_shared_prefix_is_exact_for_logits_and_gradients(name, backbone, images):
    """[SOS] + shared context computed once for all classes: same logits and prompt gradients."""
    from vlprompt.engine import shared_prefix_length

    model = _model(name, backbone)
    inputs = model.method.text_inputs(None)
    x = inputs.embeds + backbone.clip.positional_embedding
    assert shared_prefix_length(x, inputs.plan) >= 2  # the shared path is really taken
    out = []
    for share in (True, False):
        model.options.share_prefix = share
        logits = _logits(model, images)
        model.train()
        model.zero_grad(set_to_none=True)
        grads = {}
        if model.trainable_parameters():
            F.cross_entropy(model(images), torch.tensor([0, 4])).backward()
            grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters() if p.grad is not None}
        out.append((logits, grads))
    torch.testing.assert_close(out[0][0], out[1][0], atol=ATOL, rtol=0)
    assert out[0][1].keys() == out[1][1].keys()
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], atol=1e-5, rtol=1e-4)


def test_shared_prefix_engine_cases(backbone):
    """Deep slots inside, straddling and after the shared prefix; appended prompts fall back."""
    from vlprompt.engine import shared_prefix_length

    d, n = backbone.text.width, 4
    g = torch.Generator().manual_seed(7)
    embeds = backbone.token_embed(torch.randint(1, 1000, (n, backbone.context_length), generator=g))
    embeds[:, :6] = embeds[:1, :6]  # six shared leading tokens
    eot = torch.tensor([7, 9, 8, 10])
    pos = backbone.clip.positional_embedding
    cases = [
        (None, 6),
        (TowerPlan(layers={1: LayerOps(replace=torch.randn(2, d, generator=g), replace_at=2)}), 6),
        (TowerPlan(layers={2: LayerOps(replace=torch.randn(3, d, generator=g), replace_at=4)}), 4),
        (TowerPlan(layers={3: LayerOps(replace=torch.randn(1, d, generator=g), replace_at=8)}), 6),
        (TowerPlan(layers={1: LayerOps(append=torch.randn(2, d, generator=g))}), 0),
        (TowerPlan(layers={1: LayerOps(replace=torch.randn(n, 2, d, generator=g), replace_at=1)}), 0),
    ]
    for plan, expected in cases:
        assert shared_prefix_length((embeds + pos)[:, :11], plan) == expected
        with torch.no_grad():
            shared = encode_text(backbone.clip, embeds, eot, plan, share_prefix=True)
            plain = encode_text(backbone.clip, embeds, eot, plan, share_prefix=False)
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)


def _count_text_inputs(model, monkeypatch) -> list[int]:
    calls = [0]
    orig = model.method.text_inputs

    def counted(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(model.method, "text_inputs", counted)
    return calls


@pytest.mark.parametrize("name", ["coop", "mpl"])
def test_text_features_once_per_evaluation(name, backbone, images, monkeypatch):
    from vlprompt.train.evaluate import evaluate

    batches = [(images[i : i + 1], torch.tensor([i])) for i in range(2)] + [(images, torch.tensor([2, 3]))]
    model = _model(name, backbone)
    calls = _count_text_inputs(model, monkeypatch)
    fast = evaluate(model, batches, confusion=True)
    assert calls[0] == 1  # three batches, one text pass
    model.options.cache_text = False
    calls[0] = 0
    slow = evaluate(model, batches, confusion=True)
    assert calls[0] == 3
    assert fast["confusion"] == slow["confusion"]
    # a new evaluation (eval() again) recomputes once: never stale across evaluations
    model.options.cache_text = True
    calls[0] = 0
    evaluate(model, batches)
    evaluate(model, batches)
    assert calls[0] == 2


def test_text_cache_is_invalidated_when_prompts_change(backbone, images):
    model = _model("coop", backbone)
    model.eval()
    with torch.no_grad():
        before = model(images)
        model.method.ctx.add_(torch.randn_like(model.method.ctx))  # in-place: bumps the version
        after = model(images)
        model.options.cache_text = False
        fresh = model(images)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_text_chunking_is_exact(name, backbone, images):
    model = _model(name, backbone)
    whole = _logits(model, images)
    model.options.text_chunk = 2  # 5 classes (x 2 images for cocoop) in chunks of 2 sequences
    torch.testing.assert_close(_logits(model, images), whole, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["maple", "dpl"])
def test_activation_checkpointing_gives_the_same_gradients(name, backbone, images):
    labels = torch.tensor([0, 3])
    grads = []
    for ckpt in (False, True):
        model = _model(name, backbone, checkpoint_text=ckpt, checkpoint_image=ckpt)
        model.train()
        F.cross_entropy(model(images), labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_trainable_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_no_gradient_buffers_on_frozen_clip(name, backbone, images):
    model = _model(name, backbone)
    model.train()
    params = [p for p in model.trainable_parameters()]
    if not params:  # zero-shot: nothing learns, and no graph is built at all
        assert not model(images).requires_grad
        return
    F.cross_entropy(model(images), torch.tensor([0, 4])).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        assert not model(images).requires_grad


@pytest.mark.parametrize("name", ["zeroshot", "coop", "cocoop"])
def test_cached_frozen_image_features_give_the_same_logits(name, backbone, images):
    model = _model(name, backbone)
    assert not model.method.prompts_image
    model.eval()
    with torch.no_grad():
        direct = model(images)
        cached = model.logits_from_features(frozen_image_features(backbone, images))
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)


def test_feature_cache_keys_hits_and_disk_round_trip(backbone, tmp_path):
    from vlprompt.data import build_transform, get_dataset, load_rgb

    splits = get_dataset("demo")
    items = splits.test[:4]
    pc = backbone.preprocess_cfg
    tf = build_transform(False, pc["size"], pc["mean"], pc["std"], pc["interpolation"])
    cache = FeatureCache(tmp_path / "feats")
    f1, y1 = image_features(backbone, items, tf, dataset="demo", split="test", cache=cache, batch_size=3)
    assert (cache.hits, cache.misses) == (0, 1)
    f2, _ = image_features(backbone, items, tf, dataset="demo", split="test", cache=cache, batch_size=3)
    assert (cache.hits, cache.misses) == (1, 1) and f2 is f1  # served from memory, not recomputed
    assert f1.shape == (4, backbone.embed_dim) and y1.tolist() == [d.label for d in items]
    # a fresh process (new cache object, same folder) reads the file back bit-identically
    disk = FeatureCache(tmp_path / "feats")
    f3, _ = image_features(backbone, items, tf, dataset="demo", split="test", cache=disk)
    assert disk.hits == 1 and torch.equal(f3, f1)
    # the features are the model's own frozen image features
    x = torch.stack([tf(load_rgb(d.impath)) for d in items])
    torch.testing.assert_close(f1, frozen_image_features(backbone, x), atol=1e-6, rtol=0)
    # every ingredient is in the key
    key = FeatureCache.key(backbone, dataset="demo", split="test", transform=tf, items=items)
    train_tf = build_transform(False, pc["size"], (0.5, 0.5, 0.5), pc["std"], pc["interpolation"])
    others = {
        FeatureCache.key(backbone, dataset="demo", split="val", transform=tf, items=items),
        FeatureCache.key(backbone, dataset="other", split="test", transform=tf, items=items),
        FeatureCache.key(backbone, dataset="demo", split="test", transform=train_tf, items=items),
        FeatureCache.key(backbone, dataset="demo", split="test", transform=tf, items=items[:3]),
    }
    assert key not in others and len(others) == 4
    # a damaged file is recomputed, not trusted
    next((tmp_path / "feats").glob("*.pt")).write_bytes(b"garbage")
    again = FeatureCache(tmp_path / "feats")
    f4, _ = image_features(backbone, items, tf, dataset="demo", split="test", cache=again)
    assert again.misses == 1 and torch.allclose(f4, f1, atol=1e-6)


def test_backbone_fingerprint_follows_the_weights(backbone):
    same = load_backbone("vlp-tiny")  # random init is seeded (init_seed=0): identical weights
    other = load_backbone("vlp-tiny", init_seed=1)
    assert backbone_fingerprint(same) == backbone_fingerprint(backbone)
    assert backbone_fingerprint(other) != backbone_fingerprint(backbone)


def test_padded_last_batch_gives_the_same_logits(backbone, images):
    """The compile guard pads a short batch to the fixed size; the real rows are unchanged."""
    from vlprompt.bench.harness import pad_batch

    model = _model("mpl", backbone)
    short = images[:1]
    padded, n = pad_batch(short, 2)
    assert padded.shape[0] == 2 and n == 1
    torch.testing.assert_close(_logits(model, padded)[:n], _logits(model, short), atol=1e-5, rtol=0)


def test_evaluator_and_trainer_run_on_cached_features(backbone, tmp_path):
    """A feature dataset drops into evaluate()/fit() unchanged and gives the image path's results."""
    from vlprompt.data import ImageDataset, build_transform, get_dataset
    from vlprompt.train.evaluate import evaluate
    from vlprompt.train.features import feature_dataset

    splits = get_dataset("demo")
    items = splits.test[:6]
    tf = build_transform(False, **backbone.preprocess_cfg)
    torch.manual_seed(3)
    model = create_model("coop", backbone, splits.classnames, n_ctx=4)
    feats = feature_dataset(backbone, items, tf, dataset="demo", split="test", cache=FeatureCache())
    img_loader = torch.utils.data.DataLoader(ImageDataset(items, tf), batch_size=4)
    feat_loader = torch.utils.data.DataLoader(feats, batch_size=4)
    on_images = evaluate(model, img_loader, confusion=True)
    on_feats = evaluate(model, feat_loader, confusion=True)
    assert on_feats["confusion"] == on_images["confusion"] and on_feats["n"] == 6
    with torch.no_grad():
        x = next(iter(img_loader))[0]
        torch.testing.assert_close(model(frozen_image_features(backbone, x)), model(x), atol=1e-5, rtol=0)
    # training on features: the CoOp context learns, CLIP gets no gradient buffers
    from vlprompt.train import fit

    before = model.method.ctx.detach().clone()
    cfg = RunConfig.from_dict(
        {"train": {"epochs": 1, "batch_size": 2, "lr": 0.01, "device": "cpu", "warmup_epochs": 0}},
        partial=True,
    )
    fit(model, feats, cfg, files=None, progress=False)
    assert not torch.equal(model.method.ctx.detach(), before)
    assert all(p.grad is None for p in backbone.parameters())
    # image-prompted methods refuse features (they would silently skip the prompts)
    mpl = _model("mpl", backbone)
    with pytest.raises(Exception, match="prompts the image tower"):
        mpl(torch.randn(2, backbone.embed_dim))


def test_fit_uses_the_feature_cache_for_frozen_image_methods(backbone):
    """train.image_features_cache="train": Datum items become cached features (augmentation off)."""
    from vlprompt.data import get_dataset
    from vlprompt.train import fit

    splits = get_dataset("demo")
    items = splits.train[:4]
    runs = []
    for mode in ("train", "off"):
        torch.manual_seed(3)
        model = create_model("coop", backbone, splits.classnames, n_ctx=4)
        cfg = RunConfig.from_dict(
            {
                "train": {
                    "epochs": 1,
                    "batch_size": 2,
                    "lr": 0.01,
                    "device": "cpu",
                    "warmup_epochs": 0,
                    "image_features_cache": mode,
                },
                "data": {"dataset": "demo", "seed": 1},
            },
            partial=True,
        )
        res = fit(model, items, cfg, files=None, progress=False, eval_data=splits.test[:4])
        runs.append((model.method.ctx.detach().clone(), res["eval"]))
    assert not torch.equal(runs[0][0], runs[1][0])  # "off" trains on augmented views, "train" on fixed ones
    from vlprompt.utils import cache_dir

    assert len(list((cache_dir() / "features").glob("*.pt"))) >= 2  # train and eval features were cached
    assert runs[0][1]["n"] == runs[1][1]["n"] == 4
    with pytest.raises(Exception, match="image_features_cache"):
        fit(
            create_model("coop", backbone, splits.classnames, n_ctx=4),
            items,
            RunConfig.from_dict({"train": {"epochs": 1, "device": "cpu", "image_features_cache": "yes"}}),
            progress=False,
        )
