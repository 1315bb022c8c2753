"""One battery over every registered method (parametrised over the registry, so a new method is
tested by adding it): it builds, has the official code's parameter count at ViT-B/16 where its
registry entry names one, runs forward, its loss falls on a toy task, its prompt survives
save -> export -> load, and `config show` documents every option."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlprompt.cli.main import main
from vlprompt.methods import create_model, get_method, registered_methods
from vlprompt.run.backbone import portable_section
from vlprompt.run.load import export_run, load_run
from vlprompt.run.train import provenance, save_prompt
from vlprompt.train.config import BackboneConfig

METHODS = [cls.name for cls in registered_methods()]
CLASSES = ["cat", "dog", "car", "tree"]


def _tiny_options(name: str, backbone) -> dict:
    """The method's defaults with every depth or block index (``*_start`` / ``*_end``) clamped to the
    tiny backbone's layers."""
    cls = get_method(name)
    layers = min(backbone.text.layers, backbone.image.layers)
    out = {}
    for f in dataclasses.fields(cls.Config):
        v = getattr(cls.Config(), f.name)
        blockish = "depth" in f.name or f.name.endswith(("_start", "_end"))
        if blockish and isinstance(v, int) and not isinstance(v, bool) and v > layers:
            out[f.name] = layers
    return out


def _build(name: str, backbone, seed: int = 0):
    torch.manual_seed(seed)
    opts = _tiny_options(name, backbone)
    teacher = _teacher(name, backbone)
    if teacher is not None and "teacher_width" in {
        f.name for f in dataclasses.fields(get_method(name).Config)
    }:
        opts["teacher_width"] = teacher.backbone.embed_dim
    model = create_model(name, backbone, CLASSES, **opts)
    model.set_teacher(teacher)
    return model


def _teacher(name: str, backbone):
    """A method that learns from a frozen teacher gets zero-shot CLIP on the same backbone as one."""
    cls = get_method(name)
    if not (cls.text_from_teacher or "teacher_logits" in cls.needs):
        return None
    return create_model("zeroshot", backbone, CLASSES)


@pytest.fixture(scope="module")
def images(tiny) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = tiny.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    return torch.randn(8, 3, size, size, generator=g), torch.arange(8) % len(CLASSES)


@pytest.fixture(scope="module")
def vitb16():
    from vlprompt.backbones import load_backbone

    return load_backbone("ViT-B-16")  # random weights of the real architecture: only widths matter


@pytest.mark.parametrize("name", METHODS)
def test_official_parameter_count_vit_b16(name, vitb16):
    cls = get_method(name)
    if cls.official_parameters is None:
        pytest.skip(f"{name}: no official code to count (registry entry names no official_parameters)")
    assert create_model(name, vitb16, ["a", "b"]).num_trainable() == cls.official_parameters


@pytest.mark.parametrize("name", METHODS)
def test_builds_and_runs_forward(name, tiny, images):
    model = _build(name, tiny)
    x, _ = images
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(x), len(CLASSES)) and bool(torch.isfinite(logits).all())
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())  # fp32 master weights
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_on_a_toy_task(name, tiny, images):
    model = _build(name, tiny)
    params = list(model.trainable_parameters())
    if not params:
        if model.method.builds_from_data:  # nothing trainable until built from a training set
            pytest.skip(f"{name} is built from the training set: its own tests build and train it")
        assert get_method(name).official_parameters == 0  # zero-shot: nothing to learn
        return
    x, y = images
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss, _terms = model.method.objective(model.run(x, need=model.method.needs), y)
        opt.zero_grad()
        model.method.backward(
            loss, _terms, params, lambda t, retain_graph=False: t.backward(retain_graph=retain_graph)
        )
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_prompt_survives_save_export_load(name, tiny, images, tmp_path):
    a = _build(name, tiny, seed=1)
    x, _ = images
    with torch.no_grad():
        for p in a.method.parameters():  # move every learnable value off its initialisation
            p.add_(0.01 * torch.randn_like(p))
        want = a.eval()(x)
    options = dataclasses.asdict(a.method.cfg)
    manifest = {
        "format": "vlprompt-prompt",
        "format_version": 1,
        "method": name,
        **provenance(name),
        "options": options,
        "backbone": portable_section(BackboneConfig(name="vlp-tiny"), tiny),
        "classnames": CLASSES,
        "template": a.template,
    }
    save_prompt(tmp_path / "run", a.prompt_state_dict(), manifest)
    export_run(tmp_path / "run", tmp_path / "export")
    b = load_run(tmp_path / "export", backbone=tiny, teacher=a.teacher)
    with torch.no_grad():
        torch.testing.assert_close(b(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_config_show_documents_every_option(name, capsys):
    assert main(["config", "show", "--method", name]) == 0
    shown = capsys.readouterr().out
    for f in dataclasses.fields(get_method(name).Config):
        assert f"options.{f.name}" in shown, f.name
        assert str(f.metadata.get("help", "")).split(";")[0][:20] in shown, f.name  # its help is printed
