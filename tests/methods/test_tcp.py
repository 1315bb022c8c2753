"""TCP: the parameter count, the class-aware tokens and the text tower by hand, the objective's terms,
gradients only into TCP's parameters, new classes, TCP's per-data-set prompts, learning on the world,
save/load/export round trip, exact resume and the import of an official-format checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from toy import make_toy_task

from vlprompt.backbones import load_backbone
from vlprompt.data.registry import get_spec
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method
from vlprompt.methods.tcp import tcp_prompt_text
from vlprompt.run import RunDir, dassl_import
from vlprompt.train import fit
from vlprompt.train.config import RunConfig

CLASSES = ["cat", "dog", "car"]
PHOTO = "a photo of a {}."
PETS = "a photo of a {}, a type of pet."
DEPTH = 3  # the tiny backbone has 4 text blocks: the tokens enter block 3 (official: block 9 of 12)
TRAIN = {"optimizer": "adam", "lr": 0.002, "eps": 1e-3, "batch_size": 4, "epochs": 3, "warmup_epochs": 1}


def _tcp(backbone, classes=CLASSES, template=PETS, seed=0, **opts):
    torch.manual_seed(seed)
    return create_model("tcp", backbone, classes, template, **{"class_depth": DEPTH, **opts})


@pytest.fixture(scope="module")
def images(tiny):
    g = torch.Generator().manual_seed(0)
    size = tiny.preprocess_cfg["size"]
    return torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 0])


def _count(e: int, d: int, n_ctx: int = 4, k: int = 4, r: int = 4) -> int:
    h = e // r
    return n_ctx * d + (e * h + h) + (h * k * d + k * d)


def test_counts(tiny):
    vitb16 = load_backbone("ViT-B-16")  # random weights: only the widths matter
    assert create_model("tcp", vitb16, CLASSES).num_trainable() == _count(512, 512) == 331_904
    assert get_method("tcp").official_parameters == 331_904
    e, d = tiny.embed_dim, tiny.text.width
    assert _tcp(tiny).num_trainable() == _count(e, d)
    assert _tcp(tiny, n_ctx=2, class_tokens=2, reduction=8).num_trainable() == _count(e, d, 2, 2, 8)


def _hand_text(model) -> torch.Tensor:
    """The text tower written out with open_clip's own blocks: the class-aware tokens overwrite the
    tokens after [SOS] at the input of block ``class_depth`` (1-based)."""
    m, clip = model.method, model.backbone.clip
    k, d = m.cfg.class_tokens, model.backbone.text.width
    frozen = model.frozen_text_features()
    tokens = m.meta_net.linear2(m.meta_net.relu(m.meta_net.linear1(frozen))).view(len(frozen), k, d)
    x = m.prompts.fill(m.ctx) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if i == m.cfg.class_depth - 1:
            x = torch.cat([x[:, :1], tokens, x[:, 1 + k :]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(x)), m.prompts.eot] @ clip.text_projection
    return F.normalize(x, dim=-1)


def test_text_tower_tokens_and_objective_by_hand(tiny, images):
    x, y = images
    model = _tcp(tiny)
    with torch.no_grad():
        for p in model.method.parameters():  # off the init, so every part matters
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.train()
    out = model.run(x, need=model.method.needs)
    hand = _hand_text(model)
    assert torch.allclose(out.text_features, hand, atol=1e-5)
    # the frozen reference is zero-shot CLIP's text of TCP's hand-crafted prompt for the data set
    zs = create_model("zeroshot", tiny, CLASSES, PETS)
    with torch.no_grad():
        assert torch.allclose(out.frozen_text_features, zs.encode_text(), atol=1e-6)
    assert torch.equal(model.method.class_features, model.frozen_text_features())
    loss, terms = model.method.objective(out, y)
    logits = tiny.logit_scale * F.normalize(model.encode_image(x), dim=-1) @ hand.t()
    ce = F.cross_entropy(logits, y)
    kg = 1 - (hand * out.frozen_text_features).sum(-1).mean()
    assert torch.allclose(terms["ce"], ce, atol=1e-5) and torch.allclose(terms["kg"], kg, atol=1e-6)
    assert torch.allclose(loss, ce + 8.0 * kg, atol=1e-5) and float(kg.detach()) > 1e-3
    # the tokens enter where class_depth says: another block gives other features
    other = _tcp(tiny, class_depth=1)
    other.load_prompt_state_dict(model.prompt_state_dict())
    with torch.no_grad():
        assert (other.encode_text() - hand).abs().max() > 1e-3
        assert torch.allclose(other.encode_text(), _hand_text(other), atol=1e-5)


def test_gradients_reach_only_tcp_parameters(tiny, images):
    x, y = images
    model = _tcp(tiny)
    model.train()
    loss, _ = model.method.objective(model.run(x, need=model.method.needs), y)
    loss.backward()
    names = {n for n, _ in model.named_trainable_parameters()}
    assert names == {"ctx", *(f"meta_net.linear{i}.{w}" for i in (1, 2) for w in ("weight", "bias"))}
    for n, p in model.named_trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert not any(p.requires_grad or p.grad is not None for p in model.backbone.parameters())
    assert "class_features" not in model.prompt_state_dict()  # from the class names, never saved


def test_new_classes_get_their_own_tokens(tiny, images):
    x, _ = images
    model = _tcp(tiny)
    state = {k: v.clone() for k, v in model.prompt_state_dict().items()}
    new = ["tree", "boat", "house", "lamp"]
    model.set_classnames(new)
    with torch.no_grad():
        zs = create_model("zeroshot", tiny, new, PETS).encode_text()
        assert torch.allclose(model.method.class_features, zs, atol=1e-6)
        assert model(x).shape == (4, 4)
    assert all(torch.equal(state[k], v) for k, v in model.prompt_state_dict().items())
    alone = get_method("tcp")(get_method("tcp").Config(class_depth=DEPTH), tiny)
    alone.prepare_text(tiny, CLASSES, PHOTO)
    with pytest.raises(VlpromptError, match="class text features.*PromptModel"):
        alone.text_inputs()


#: the official trainers/tcp.py tables, by our data set name: CUSTOM_TEMPLATES without "X X X X "
#: (the learnable prompt) and CUSTOM_TEMPLATES_ori (the frozen reference)
OFFICIAL = {
    "oxford_pets": ("{}, a type of pet.", "a photo of a {}, a type of pet."),
    "oxford_flowers": ("{}, a type of flower.", "a photo of a {}, a type of flower."),
    "fgvc_aircraft": ("{}, a type of aircraft.", "a photo of an aircraft {}."),
    "dtd": ("{} texture.", "a photo of a {}, a type of texture."),
    "eurosat": ("{}.", "a centered satellite photo of {}."),
    "food101": ("{}, a type of food.", "a photo of a {}, a type of food."),
    "sun397": ("{}.", "a photo of a {}."),
    "caltech101": ("{}.", "a photo of a {}."),
    "ucf101": ("person doing {}.", "a photo of a person doing {}."),  # "a photo of a" is the context
    "imagenet": ("{}.", "a photo of a {}."),
    "stanford_cars": ("{}, a type of car", "a photo of a {}."),  # ours: "{}." unless prompt_text says so
}


@pytest.mark.parametrize("dataset", sorted(OFFICIAL))
def test_prompts_of_each_data_set_are_tcps(tiny, dataset):
    template = get_spec(dataset).template
    text, frozen = OFFICIAL[dataset]
    model = _tcp(tiny, template=template, **({"prompt_text": text} if dataset == "stanford_cars" else {}))
    assert model.method.frozen_templates(template) == [frozen]
    assert tcp_prompt_text(template, text if dataset == "stanford_cars" else "") == text
    want = [tiny.sot_id, *tiny.encode_words("X") * 4, *tiny.encode_words(text.replace("{}", "cat"))]
    assert model.method.prompts.ids[0, : len(want) + 1].tolist() == [*want, tiny.eot_id]
    if dataset == "stanford_cars":
        assert tcp_prompt_text(template) == "{}."  # the same CoOp template as SUN397 / Caltech101


def test_presets_are_the_official_recipe():
    p = get_method("tcp").preset()
    assert p["options"]["n_ctx"] == 4 and p["options"]["ctx_init"] == "" and p["options"]["class_depth"] == 9
    t = p["train"]
    assert (t["optimizer"], t["lr"], t["eps"], t["weight_decay"], t["batch_size"], t["epochs"]) == (
        "adam", 0.002, 1e-3, 0.0005, 32, 50,
    )  # fmt: skip
    assert t["epochs_by_dataset"] == {"imagenet": 25, "sun397": 25}
    assert (t["warmup_epochs"], t["warmup_lr"], t["warmup_type"], t["scheduler"]) == (
        1,
        1e-5,
        "constant",
        "cosine",
    )


@pytest.fixture(scope="module")
def toy(tiny):
    x, y, names = make_toy_task(tiny, n_classes=4, n_per_class=4)
    return [(x[i], int(y[i])) for i in range(len(y))], names


def test_resume_mid_run_equals_uninterrupted(tiny, toy, tmp_path):
    data, names = toy
    cfg = RunConfig.from_dict({"train": TRAIN, "data": {"seed": 1}}, partial=True)
    ref = fit(_tcp(tiny, names), data, cfg, RunDir(tmp_path / "a"), progress=False)
    straight = _tcp(tiny, names)
    fit(straight, data, cfg, RunDir(tmp_path / "c"), progress=False)
    first = fit(_tcp(tiny, names), data, cfg, RunDir(tmp_path / "b"), progress=False, stop_after_epoch=1)
    assert first["stopped"]
    resumed = _tcp(tiny, names, seed=5)  # other init: everything must come from the checkpoint
    res = fit(resumed, data, cfg, RunDir(tmp_path / "b"), resume=True, progress=False)
    a, b = straight.prompt_state_dict(), resumed.prompt_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in ref["history"]]
    rec = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    step = next(r for r in rec if r["kind"] == "step")
    assert {"loss_ce", "loss_kg"} <= set(step)


def test_cli_train_save_load_export_round_trip(cli_round_trip):
    a, b, man = cli_round_trip("tcp", "--set", f"options.class_depth={DEPTH}")
    assert man["trainable_parameters"] == _count(64, 128)
    assert all(torch.equal(v, b.prompt_state_dict()[k]) for k, v in a.prompt_state_dict().items())
    size = a.backbone.preprocess_cfg["size"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.set_classnames(["zebra", "violin"])  # new classes: tokens from their own frozen features
        assert a(x).shape == (3, 2)


def _official_state(model) -> dict[str, torch.Tensor]:
    """What the official trainer saves: its PromptLearner's state dict (``text_features`` is a plain
    attribute, so never saved), the frozen [SOS] / suffix embeddings included."""
    m = model.method
    emb = m.prompts.embeds
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd.update(token_prefix=emb[:, :1].clone(), token_suffix=emb[:, 1 + m.cfg.n_ctx :].clone())
    return sd


def test_import_of_an_official_checkpoint_gives_the_same_logits(tiny, images, tmp_path):
    x, _ = images
    src = _tcp(tiny, template=PETS)
    with torch.no_grad():
        for p in src.method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": _official_state(src), "epoch": 50, "optimizer": {}, "scheduler": {}}, path)
    imp = dassl_import.import_checkpoint(path)  # told apart from CoCoOp by its meta-net's output width
    assert imp.method == "tcp" and imp.epoch == 50
    assert imp.options == {"n_ctx": 4, "ctx_init": "", "reduction": 4, "class_tokens": 4}
    got = dassl_import.build_model(imp, tiny, CLASSES, template=PETS, class_depth=DEPTH).eval()
    with torch.no_grad():
        assert torch.allclose(got(x), src.eval()(x), atol=1e-6)
    # a CoCoOp file (meta-net output = one token) is still CoCoOp's
    torch.manual_seed(0)
    coco = create_model("cocoop", tiny, CLASSES)
    sd = {"ctx": coco.method.ctx.detach(), "token_suffix": torch.randn(3, 60, tiny.text.width)}
    for i, j in ((1, 0), (2, 2)):
        sd[f"meta_net.linear{i}.weight"] = coco.method.meta_net[j].weight.detach()
        sd[f"meta_net.linear{i}.bias"] = coco.method.meta_net[j].bias.detach()
    assert dassl_import.detect_method(sd) == "cocoop"


def test_learns_on_the_world():
    """On the pretrained vlp-world backbone, 4 shots per base class of world-shape-texture, the official
    recipe's optimiser (Adam, lr 0.002, eps 1e-3): the objective falls by a clear margin."""
    from vlprompt.data import build_loader, build_transform, fewshot, get_dataset, subsample
    from vlprompt.train.evaluate import evaluate

    torch.set_num_threads(1)
    backbone = load_backbone("vlp-world")
    splits = subsample(fewshot(get_dataset("world-shape-texture"), shots=4, seed=1), "base")
    # accuracy on the training shots (eval transform): on held-out images vlp-world v3's features leave
    # little for a few-shot method to add (docs/world.md)
    test = build_loader(splits.train, build_transform(False, **backbone.preprocess_cfg), 256, shuffle=False)
    zs = create_model("zeroshot", backbone, splits.classnames, template=splits.template)
    torch.manual_seed(0)
    m = create_model("tcp", backbone, splits.classnames, template=splits.template, class_depth=DEPTH)
    train = {**TRAIN, "batch_size": 16, "epochs": 5}
    res = fit(
        m,
        splits.train,
        RunConfig.from_dict({"train": train, "data": {"seed": 1}}, partial=True),
        progress=False,
    )
    losses = [h["loss"] for h in res["history"]]
    acc_zs, acc = evaluate(zs, test)["accuracy"], evaluate(m, test)["accuracy"]
    # measured on vlp-world v3 (world-shape-texture base, 4 shots): the objective falls from 2.435 to
    # 1.726 (mean of the first / last epoch), yet accuracy on the shots goes 64.06 -> 60.94 (the
    # training crops differ from the eval view); reported, not tuned.  The test holds the fall.
    assert losses[-1] < losses[0] - 0.3, losses
    assert acc > 100 / len(splits.classnames), (acc_zs, acc)  # far from chance: the prompts still work


def test_published_numbers_are_under_the_papers_name():
    from vlprompt.protocols.reference import BASE2NEW_AVERAGE, BASE2NEW_BN, BASE2NEW_HM, paper_name

    assert paper_name("tcp") == "TCP"
    base, new, hm = BASE2NEW_AVERAGE["TCP"]
    assert (base, new, hm) == (84.13, 75.36, 79.51)
    # the printed HM is the harmonic mean of the printed (rounded) averages (transcription check)
    assert abs(2 * base * new / (base + new) - hm) < 0.01
    # per-data-set rows are not shipped: they could not be checked against the paper offline
    assert "TCP" not in BASE2NEW_HM and "TCP" not in BASE2NEW_BN
