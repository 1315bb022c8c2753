"""With no prompts, the engine reproduces open_clip's own forward (fp32, max abs diff <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.engine import ALL, LayerOps, TowerPlan, encode_image, encode_text, prompt_lengths

TEXTS = [
    "a photo of a dog.",
    "X X X a photo of a very long and complicated thing indeed, a type of pet.",
    "hi",
]


@pytest.fixture(scope="module", params=["ViT-B-16", "ViT-B-32", "ViT-B-16-quickgelu", "vlp-tiny"])
def backbone(request):
    torch.manual_seed(0)
    return vlprompt.load_backbone(request.param)


def test_text_tower_matches_open_clip(backbone):
    clip = backbone.clip
    toks = backbone.tokenize(TEXTS)
    with torch.no_grad():
        ref = clip.encode_text(toks)
        for truncate in (True, False):
            out = encode_text(clip, clip.token_embedding(toks), toks.argmax(-1), truncate=truncate)
            assert (out - ref).abs().max().item() <= 1e-5


def test_image_tower_matches_open_clip(backbone):
    torch.manual_seed(1)
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = backbone.clip.encode_image(img)
        out = encode_image(backbone.clip.visual, img)
    assert (out - ref).abs().max().item() <= 1e-5
    if "quickgelu" in (backbone.name or ""):
        assert backbone.meta["quick_gelu"] is True


def test_zeroshot_model_matches_open_clip_logits(backbone):
    names = ["dog", "cat", "golden retriever"]
    model = vlprompt.create_model("zeroshot", backbone, names, template="a photo of a {}, a type of pet.")
    assert model.num_trainable() == 0
    torch.manual_seed(2)
    img = torch.randn(2, 3, 224, 224)
    clip = backbone.clip
    with torch.no_grad():
        t = torch.nn.functional.normalize(
            clip.encode_text(backbone.tokenize([f"a photo of a {c}, a type of pet." for c in names])), dim=-1
        )
        i = torch.nn.functional.normalize(clip.encode_image(img), dim=-1)
        ref = clip.logit_scale.exp() * i @ t.t()
        assert (model(img) - ref).abs().max().item() <= 1e-4  # logits are 100x cosines


def test_image_ops_change_sequence_length_and_trace():
    bb = vlprompt.load_backbone("vlp-tiny")
    d = bb.image.width
    seen = []
    hooks = [
        blk.ln_1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        for blk in bb.clip.visual.transformer.resblocks
    ]
    plan = TowerPlan(
        shallow=torch.randn(1, d),
        layers={
            1: LayerOps(remove=1, append=torch.randn(2, d)),
            2: LayerOps(append=torch.randn(3, 2, d)),
            3: LayerOps(remove=ALL),
        },
    )
    with torch.no_grad():
        encode_image(bb.clip.visual, torch.randn(3, 3, 224, 224), plan)
    for h in hooks:
        h.remove()
    n = bb.num_image_tokens
    assert seen == [n + 1, n + 2, n + 4, n] == prompt_lengths(n, plan, 4)


def test_impossible_ops_raise():
    bb = vlprompt.load_backbone("vlp-tiny")
    d = bb.image.width
    with pytest.raises(ValueError, match="cannot remove 2 prompt tokens, only 1 present"):
        encode_image(
            bb.clip.visual,
            torch.randn(1, 3, 224, 224),
            TowerPlan(shallow=torch.zeros(1, d), layers={1: LayerOps(remove=2)}),
        )
    with pytest.raises(ValueError, match="tower has 4 layers"):
        encode_image(bb.clip.visual, torch.randn(1, 3, 224, 224), TowerPlan(layers={7: LayerOps()}))


def test_text_slot_replacement_is_exact_under_truncation():
    bb = vlprompt.load_backbone("vlp-tiny")
    toks = bb.tokenize(TEXTS)
    deep = torch.randn(2, bb.text.width)
    plan = TowerPlan(
        layers={1: LayerOps(replace=deep, replace_at=1), 3: LayerOps(replace=deep * 2, replace_at=1)}
    )
    emb = bb.clip.token_embedding(toks)
    with torch.no_grad():
        a = encode_text(bb.clip, emb, toks.argmax(-1), plan, truncate=True)
        b = encode_text(bb.clip, emb, toks.argmax(-1), plan, truncate=False)
    assert (a - b).abs().max().item() <= 1e-5


def test_predict_accepts_paths_and_pil(tmp_path):
    from PIL import Image

    bb = vlprompt.load_backbone("vlp-tiny")
    model = vlprompt.create_model("zeroshot", bb, ["cat", "dog"])
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    img.save(tmp_path / "a.png")
    p_path, i_path = model.predict([str(tmp_path / "a.png")], ["red", "green", "blue"], topk=3)
    p_pil, i_pil = model.predict(img, topk=3)
    assert p_path.shape == (1, 3) and torch.allclose(p_path, p_pil) and torch.equal(i_path, i_pil)
    with pytest.raises(vlprompt.VlpromptError, match="image not found"):
        model.predict([str(tmp_path / "missing.png")])
