"""MMA: official count, the adapters' forward and the objective by hand on the tiny model, the official
gradient scaling (adapter weights get 1/scale of their true gradient), zero adapters == zero-shot CLIP,
gradients only into the adapters, one-line option errors, official checkpoint names, exact resume,
save/export/load and learning on the world."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import load_backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method
from vlprompt.run import RunDir
from vlprompt.run.dassl_import import build_model, convert_state_dict
from vlprompt.train import fit
from vlprompt.train.config import RunConfig

CLASSES = ["cat", "dog", "car"]
OPTS = {"adapter_start": 2, "adapter_end": 4}  # blocks 2-4 of the tiny model's 4


@pytest.fixture(scope="module")
def images(tiny):
    size = tiny.preprocess_cfg["size"]
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 0])


def _model(tiny, seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("mma", tiny, CLASSES, **{**OPTS, **kw})


def _act(m, seed=1):
    """Adapter weights large enough that the adapters change the logits visibly (scale 0.001)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.method.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)


def _branch(h, own, shared, s):
    y = F.relu(F.linear(h, own.down[0].weight, own.down[0].bias))
    y = F.relu(F.linear(y, shared[0].weight, shared[0].bias))
    return s * F.linear(y, own.up.weight, own.up.bias)


def _by_hand(m, x):
    """MMA's logits written out with open_clip's own blocks (no engine)."""
    clip, meth, s = m.backbone.clip, m.method, m.method.cfg.adapter_scale
    v = clip.visual
    h = v.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([v.class_embedding.view(1, 1, -1).expand(len(h), -1, -1), h], 1) + v.positional_embedding
    h = v.ln_pre(h)
    for k, block in enumerate(v.transformer.resblocks, start=1):
        out = block(h)
        if str(k) in meth.visual_adapter:
            out = out + _branch(block.ln_1(h), meth.visual_adapter[str(k)], meth.shared_adapter[str(k)], s)
        h = out
    img = v.ln_post(h[:, 0]) @ v.proj
    p = meth.prompts
    t = p.embeds + clip.positional_embedding
    for k, block in enumerate(clip.transformer.resblocks, start=1):
        out = block(t, attn_mask=clip.attn_mask)
        if str(k) in meth.text_adapter:
            out = out + _branch(block.ln_1(t), meth.text_adapter[str(k)], meth.shared_adapter[str(k)], s)
        t = out
    txt = clip.ln_final(t[torch.arange(len(t)), p.eot]) @ clip.text_projection
    return clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()


def test_counts_and_official_names(tiny):
    m = _model(tiny)
    d, r = tiny.text.width, 32
    assert tiny.image.width == d
    per_block = 2 * (d * r + r + r * d + d) + (r * r + r)  # down + up per tower, one shared projection
    assert m.num_trainable() == 3 * per_block
    names = set(m.prompt_state_dict())
    assert "text_adapter.2.down.0.weight" in names and "shared_adapter.4.0.bias" in names
    assert "visual_adapter.4.up.weight" in names and not any(".1." in n for n in names)
    assert names == {k for k, _ in m.named_trainable_parameters()}


def test_official_count_vit_b16():
    """Official vit_b16_ep5 on ViT-B/16: blocks 5-12, r 32: 8 x (33,312 + 49,952 + 1,056) = 674,560."""
    m = create_model("mma", load_backbone("ViT-B-16"), CLASSES)
    per_block = (512 * 32 + 32 + 32 * 512 + 512) + (768 * 32 + 32 + 32 * 768 + 768) + (32 * 32 + 32)
    assert m.num_trainable() == 8 * per_block == 674_560 == get_method("mma").official_parameters


def test_forward_and_objective_by_hand(tiny, images):
    x, y = images
    m = _model(tiny)
    _act(m)
    m.train()
    out = m.run(x)
    want = _by_hand(m, x)
    assert (out.logits - want).abs().max().item() < 1e-4
    zs = create_model("zeroshot", tiny, CLASSES, template="a photo of a {}.")
    with torch.no_grad():
        assert (out.logits - zs(x)).abs().max().item() > 1e-2  # the adapters act
    loss, terms = m.method.objective(out, y)
    assert set(terms) == {"ce"}
    assert abs(loss.item() - F.cross_entropy(want, y).item()) < 1e-5


def test_adapter_weights_get_one_over_scale_of_their_gradient(tiny, images):
    """The official gradient-scale layers: forward unchanged, weight gradients x 1/scale (the input's
    gradient through the branch is the true one)."""
    x, y = images
    m = _model(tiny, adapter_scale=0.01)
    _act(m)
    m.train()
    F.cross_entropy(m.run(x).logits, y).backward()
    ours = {n: p.grad.clone() for n, p in m.method.named_parameters()}
    m.zero_grad()
    F.cross_entropy(_by_hand(m, x), y).backward()  # plain autograd: the true gradient
    for n, p in m.method.named_parameters():
        torch.testing.assert_close(ours[n] * 0.01, p.grad, rtol=2e-3, atol=1e-6, msg=n)
        assert p.grad.abs().sum() > 0, n


def test_zero_adapters_are_zero_shot_clip(tiny, images):
    x, _ = images
    m = _model(tiny)
    with torch.no_grad():
        for name, p in m.method.named_parameters():
            if ".up." in name:
                p.zero_()
        zs = create_model("zeroshot", tiny, CLASSES, template="a photo of a {}.")
        # exact per block (tests/engine/test_adapter_op.py); here zero-shot's text shares its prefix
        torch.testing.assert_close(m.eval()(x), zs(x), atol=1e-5, rtol=0)


def test_gradients_reach_only_the_adapters(tiny, images):
    x, y = images
    m = _model(tiny)
    m.train()
    loss, _ = m.method.objective(m.run(x), y)
    loss.backward()
    assert all(p.grad is None for p in tiny.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.method.parameters())


def test_invalid_options_are_one_line_errors(tiny):
    for opts, msg in [
        ({"adapter_start": 3, "adapter_end": 2}, "adapter_start <= adapter_end"),
        ({"adapter_end": 5}, "adapter_end <= 4"),
        ({"adapter_dim": tiny.text.width}, "adapter_dim"),
    ]:
        with pytest.raises(VlpromptError, match=msg):
            create_model("mma", tiny, CLASSES, **{**OPTS, **opts})
    with pytest.raises(VlpromptError, match="adapter_start"):
        create_model("mma", tiny, CLASSES, adapter_start=0)


def test_official_checkpoint_names_import_to_the_same_logits(tiny, images):
    """A state dict in the official AdapterLearner's layout (with its frozen buffers) imports exactly."""
    x, _ = images
    m = _model(tiny)
    _act(m)
    sd = {f"module.{k}": v.clone() for k, v in m.prompt_state_dict().items()}
    sd["token_embedding"], sd["tokenized_prompts"] = torch.randn(3, 77, 128), torch.zeros(3, 77).long()
    imp = convert_state_dict(sd)
    assert imp.method == "mma" and imp.options == {"adapter_start": 2, "adapter_end": 4, "adapter_dim": 32}
    b = build_model(imp, tiny, CLASSES)
    with torch.no_grad():
        assert torch.equal(b.eval()(x), m.eval()(x))
    bad = {k: v for k, v in sd.items() if not k.startswith("module.text_adapter.3.")}
    with pytest.raises(VlpromptError, match="text_adapter.3"):
        convert_state_dict(bad, "mma")


def test_preset_is_the_official_recipe():
    p = get_method("mma").preset()
    o, t = p["options"], p["train"]
    assert (o["adapter_start"], o["adapter_end"], o["adapter_dim"], o["adapter_scale"]) == (5, 12, 32, 0.001)
    assert o["ctx_init"] == "a photo of a"
    assert (t["optimizer"], t["lr"], t["batch_size"], t["epochs"], t["warmup_epochs"]) == (
        "sgd",
        0.0015,
        16,
        5,
        0,
    )


TRAIN = {"optimizer": "sgd", "lr": 0.0015, "batch_size": 2, "epochs": 3, "warmup_epochs": 0}


def test_resume_is_exact_and_backbone_untouched(tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    size = tiny.preprocess_cfg["size"]
    data = [(torch.randn(3, size, size, generator=g), i % 3) for i in range(4)]
    cfg = RunConfig.from_dict({"train": TRAIN, "data": {"seed": 1}}, partial=True)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}

    def run(out, stop=None, resume=False):
        m = _model(tiny)
        fit(m, data, cfg, RunDir(out), resume=resume, progress=False, stop_after_epoch=stop)
        return m.prompt_state_dict()

    init = _model(tiny).prompt_state_dict()
    full = run(tmp_path / "a")
    run(tmp_path / "b", stop=1)
    resumed = run(tmp_path / "b", resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert any(not torch.equal(full[k], init[k]) for k in full)  # it trained
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_cli_round_trip_saves_only_the_adapters(cli_round_trip):
    a, _, man = cli_round_trip("mma", "--set", "options.adapter_start=3", "--set", "options.adapter_end=4")
    state = a.prompt_state_dict()
    assert set(state) == {k for k, _ in a.named_trainable_parameters()}
    assert sum(v.numel() for v in state.values()) == man["trainable_parameters"]


def test_learns_on_the_world(world_gain):
    layers = load_backbone("vlp-world").text.layers
    # The official recipe (lr 0.0015) moves this small world model's logits by <= 0.02 in 5 epochs (accuracy
    # unchanged): scale 0.001 with 1/scale weight gradients is lr * scale = 1.5e-6 on the branch output. To
    # test that the adapters learn we train with lr 0.15 (100x the recipe, our test's choice; 1.5 diverges on
    # vlp-world v3, whose logit scale is twice v2's).
    train = {**TRAIN, "lr": 0.15, "batch_size": 16, "epochs": 5}
    acc_zs, acc = world_gain("mma", train, "a photo of a {}.", adapter_end=layers)  # adapters 5..last
    # measured on the 64 shots: zero-shot 64.06, MMA 70.31
    assert acc > acc_zs, (acc_zs, acc)


def test_published_numbers_are_found_under_the_paper_name():
    from vlprompt.protocols.reference import BASE2NEW_AVERAGE, paper_name

    assert paper_name("mma") == "MMA" and BASE2NEW_AVERAGE["MMA"] == (83.20, 76.80, 79.87)


def test_cli_import_of_an_official_checkpoint_file(tiny, images, tmp_path, capsys):
    """The official trainer's file: Dassl's dict with the learner state, optimizer state and epoch."""
    import vlprompt
    from vlprompt.cli.main import main

    x, _ = images
    m = _model(tiny)
    _act(m)
    sd = {k: v.clone() for k, v in m.prompt_state_dict().items()}
    opt = torch.optim.SGD([torch.nn.Parameter(v.clone()) for v in sd.values()], lr=0.0015, momentum=0.9)
    sd["token_embedding"], sd["tokenized_prompts"] = torch.randn(3, 77, 128), torch.zeros(3, 77).long()
    (tmp_path / "ck" / "adapter_learner").mkdir(parents=True)
    ck = {"state_dict": sd, "epoch": 5, "optimizer": opt.state_dict(), "val_result": None}
    torch.save(ck, tmp_path / "ck" / "adapter_learner" / "model.pth.tar-5")
    out = tmp_path / "imported"
    args = ["import", str(tmp_path / "ck"), "--out", str(out), "--model", "vlp-tiny", "--pretrained", "none"]
    assert main([*args, "--classes", ",".join(CLASSES)]) == 0, capsys.readouterr().err
    assert "imported mma" in capsys.readouterr().out
    loaded = vlprompt.load_prompt(out, backbone=tiny)
    assert loaded.manifest["options"]["adapter_start"] == 2
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), m.eval()(x))
