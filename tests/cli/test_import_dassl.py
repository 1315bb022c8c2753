"""`vlprompt import`: official-layout checkpoints give the same logits as the prompts they hold.

Each test writes a checkpoint exactly as the official code saves it -- Dassl's
``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}`` in ``<learner>/model.pth.tar-N``,
with the official parameter names (CoOp/CoCoOp: the PromptLearner's own state dict with its
``token_prefix``/``token_suffix`` buffers; IVLP/VPT/MaPLe/MPL: the whole CustomCLIP, frozen CLIP
included) and a scheduler object pickled as Dassl's -- then imports it and compares logits.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import vlprompt
from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.run import dassl_import

CLASSES = ["cat", "dog", "sea turtle"]


@pytest.fixture(scope="module")
def backbone():
    return vlprompt.load_backbone("vlp-tiny", init_seed=5)


class ConstantWarmupScheduler:  # pickled under Dassl's module path, as in the official checkpoints
    def __init__(self):
        self.last_epoch, self.base_lrs, self.successor = 3, [0.002], {"T_max": 5}


@pytest.fixture(autouse=True)
def _dassl_module(monkeypatch):
    mod = types.ModuleType("dassl.optim.lr_scheduler")
    ConstantWarmupScheduler.__module__ = "dassl.optim.lr_scheduler"
    mod.ConstantWarmupScheduler = ConstantWarmupScheduler
    for name in ("dassl", "dassl.optim"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "dassl.optim.lr_scheduler", mod)


def _randomised(method, backbone, **opts):
    torch.manual_seed(0)
    model = create_model(method, backbone, CLASSES, **opts)
    with torch.no_grad():
        for p in model.method.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _half(t):
    return t.detach().clone().half()  # the official trainers keep CLIP (and the prompts) in fp16


def _official(method, model, backbone):
    """The state dict the official trainer of ``method`` saves, built from our model's prompts."""
    m = model.method
    sd = {}
    clip = backbone.clip.state_dict()
    whole = {  # a CustomCLIP state dict also carries the frozen CLIP
        "image_encoder.conv1.weight": _half(clip["visual.conv1.weight"]),
        "text_encoder.ln_final.weight": _half(clip["ln_final.weight"]),
        "logit_scale": clip["logit_scale"].clone(),
    }
    c, d = len(CLASSES), backbone.text.width
    if method in ("coop", "cocoop"):
        n = m.ctx.shape[-2]
        sd = {"ctx": _half(m.ctx), "token_prefix": torch.zeros(c, 1, d).half()}
        sd["token_suffix"] = torch.zeros(c, 77 - 1 - n, d).half()
        if method == "cocoop":
            sd["meta_net.linear1.weight"] = _half(m.meta_net[0].weight)
            sd["meta_net.linear1.bias"] = _half(m.meta_net[0].bias)
            sd["meta_net.linear2.weight"] = _half(m.meta_net[2].weight)
            sd["meta_net.linear2.bias"] = _half(m.meta_net[2].bias)
        return sd
    sd.update(whole)
    if method == "ivlp":
        sd["prompt_learner.ctx"] = _half(m.ctx)
        sd["prompt_learner.token_prefix"] = torch.zeros(c, 1, d).half()
        for i, t in enumerate(m.text_deep, start=1):
            sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = _half(t)
    if method in ("ivlp", "vpt"):
        sd["image_encoder.VPT"] = _half(m.image_prompts[0])
        for i in range(1, m.image_prompts.shape[0]):
            sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = _half(m.image_prompts[i])
    if method in ("maple", "mpl"):
        sd["prompt_learner.ctx"] = _half(m.ctx)
        sd["prompt_learner.token_prefix"] = torch.zeros(c, 1, d).half()
        proj = m.proj if method == "maple" else m.proj0
        sd["prompt_learner.proj.weight"], sd["prompt_learner.proj.bias"] = (
            _half(proj.weight),
            _half(proj.bias),
        )
        deep = m.compound_prompts_text if method == "maple" else m.text_deep
        for j, t in enumerate(deep):
            sd[f"prompt_learner.compound_prompts_text.{j}"] = _half(t)
    if method == "maple":
        for j, lin in enumerate(m.compound_prompt_projections):
            sd[f"prompt_learner.compound_prompt_projections.{j}.weight"] = _half(lin.weight)
            sd[f"prompt_learner.compound_prompt_projections.{j}.bias"] = _half(lin.bias)
    if method == "mpl":
        for k in range(m.cfg.add):
            for j in range(m.cfg.depth - 1):
                lin = m.projection(k, j + 1)
                sd[f"prompt_learner.txt2img_proj.{k}.{j}.weight"] = _half(lin.weight)
                sd[f"prompt_learner.txt2img_proj.{k}.{j}.bias"] = _half(lin.bias)
    return sd


def _save_dassl(tmp_path, learner, sd, epoch=5):
    folder = tmp_path / "output" / learner
    folder.mkdir(parents=True)
    opt = {"state": {}, "param_groups": [{"lr": 0.002, "momentum": 0.9, "params": [0]}]}
    ck = {"state_dict": sd, "epoch": epoch, "optimizer": opt, "scheduler": ConstantWarmupScheduler()}
    ck["val_result"] = None
    path = folder / f"model.pth.tar-{epoch}"
    torch.save(ck, path)
    return path


CASES = [
    ("coop", "prompt_learner", {"n_ctx": 4}),
    ("cocoop", "prompt_learner", {"n_ctx": 4}),
    ("ivlp", "VLPromptLearner", {"n_ctx_text": 2, "n_ctx_image": 3, "depth_text": 3, "depth_image": 4}),
    ("vpt", "prompt_learner", {"n_ctx": 5, "depth": 3}),
    ("maple", "MultiModalPromptLearner", {"n_ctx": 2, "depth": 3}),
    ("mpl", "MultiModalPromptLearner", {"n_ctx": 1, "add": 2, "remove": 1, "depth": 3}),
]


@pytest.mark.parametrize("method,learner,opts", CASES, ids=[c[0] for c in CASES])
def test_official_checkpoint_roundtrips_to_the_same_logits(tmp_path, backbone, method, learner, opts):
    model = _randomised(method, backbone, **opts)
    path = _save_dassl(tmp_path, learner, _official(method, model, backbone))
    ck = dassl_import.read_checkpoint(path)  # tensors only: Dassl's scheduler becomes an inert stub
    assert (
        ck["scheduler"].stub_name == "dassl.optim.lr_scheduler.ConstantWarmupScheduler"
        and ck["scheduler"].state["last_epoch"] == 3
    )
    imp = dassl_import.import_checkpoint(path)
    assert imp.method == method and imp.epoch == 5
    extra = {"remove": 1} if method == "mpl" else {}  # no tensor records MPL's remove count
    got = dassl_import.build_model(imp, backbone, CLASSES, **extra)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, have = model(images), got(images)
    # the official files are fp16, so the prompts went through one fp16 rounding
    torch.testing.assert_close(have, want, rtol=2e-2, atol=2e-2)
    for k, v in got.prompt_state_dict().items():
        torch.testing.assert_close(v, model.prompt_state_dict()[k].half().float(), rtol=0, atol=0)


def test_cli_import_writes_a_prompt_that_load_prompt_and_predict_use(tmp_path, backbone, capsys):
    model = _randomised("maple", backbone, n_ctx=2, depth=3)
    path = _save_dassl(tmp_path, "MultiModalPromptLearner", _official("maple", model, backbone))
    out = tmp_path / "imported"
    rc = main(
        ["import", str(path.parent), "--out", str(out), "--classes", ",".join(CLASSES), "--model", "vlp-tiny",
         "--pretrained", "none"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "imported maple" in capsys.readouterr().out
    loaded = vlprompt.load_prompt(out, backbone=backbone)
    assert loaded.manifest["imported_from"]["format"] == "dassl"
    assert loaded.manifest["options"]["depth"] == 3
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=2e-2, atol=2e-2)
    both = [
        "import",
        str(path.parent),
        "--out",
        str(tmp_path / "both"),
        "--classes",
        "a,b",
        "--dataset",
        "demo",
    ]
    assert main(both) == 2  # --classes won without a word
    assert "pass either --dataset NAME" in capsys.readouterr().err and not (tmp_path / "both").exists()


def test_shape_mismatch_names_the_official_tensor(tmp_path, backbone):
    sd = _official("maple", _randomised("maple", backbone, n_ctx=2, depth=3), backbone)
    sd["prompt_learner.proj.weight"] = torch.zeros(768, 512).half()  # a ViT-B/16 checkpoint's shape
    path = _save_dassl(tmp_path, "MultiModalPromptLearner", sd)
    imp = dassl_import.import_checkpoint(path)
    with pytest.raises(VlpromptError) as e:
        dassl_import.build_model(imp, backbone, CLASSES)
    msg = str(e.value)
    assert "'prompt_learner.proj.weight' has shape (768, 512)" in msg and "(128, 128)" in msg


def test_not_a_checkpoint_and_unknown_layout_are_one_line(tmp_path):
    bad = tmp_path / "model.pth.tar-1"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VlpromptError, match="cannot read"):
        dassl_import.read_checkpoint(bad)
    with pytest.raises(VlpromptError, match="cannot tell which method"):
        dassl_import.convert_state_dict({"foo": torch.zeros(2)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlpromptError, match="no model.pth.tar-N"):
        dassl_import.read_checkpoint(tmp_path / "empty")
