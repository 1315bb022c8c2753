"""PromptKD: a frozen teacher in the objective (frozen, cached, never saved with the student), the KL
term by hand, the transductive label on every artefact, no test image in training, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

from vlprompt.backbones import load_backbone
from vlprompt.data import get_dataset
from vlprompt.data.subsample import UNLABELLED, subsample
from vlprompt.engine import encode_image
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.run import train as run_train
from vlprompt.run.backbone import portable_section
from vlprompt.run.load import load_run
from vlprompt.run.train import save_prompt, train_run
from vlprompt.train.config import BackboneConfig, RunConfig

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return load_backbone("vlp-small")  # the teacher: wider (256) and deeper (12) than the student


@pytest.fixture(scope="module")
def teacher_dir(small, tmp_path_factory) -> Path:
    """A saved PromptSRC prompt on vlp-small (random prompts moved off their init): the teacher."""
    torch.manual_seed(2)
    t = create_model("promptsrc", small, CLASSES)
    with torch.no_grad():
        for p in t.method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("teacher") / "run"
    manifest = {
        "format": "vlprompt-prompt",
        "format_version": 1,
        "method": "promptsrc",
        "options": t.method.cfg.to_dict(),
        "backbone": portable_section(BackboneConfig(name="vlp-small"), small),
        "classnames": CLASSES,
        "template": t.template,
    }
    save_prompt(out, t.prompt_state_dict(), manifest)
    return out


@pytest.fixture()
def images(tiny):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 224, 224, generator=g)


def _student(tiny, small, teacher_dir, classes=CLASSES, **opts):
    torch.manual_seed(0)
    m = create_model("promptkd", tiny, classes, depth_image=3, teacher_width=256, **opts)
    m.set_teacher(load_run(teacher_dir, backbone=small))
    return m


def test_count_matches_the_official_code_at_vit_b16_to_vit_l14():
    vitb16 = load_backbone("ViT-B-16")
    m = create_model("promptkd", vitb16, ["a", "b"])
    # 9 x 4 x 768 image prompts + Conv(512->768) + BN(768) + Conv(768->768), as the official trainer counts
    assert m.num_trainable() == 9 * 4 * 768 + (512 * 768 + 768) + 2 * 768 + (768 * 768 + 768) == 1_013_760


def test_logits_are_the_projected_student_against_the_teachers_text(tiny, small, teacher_dir, images):
    m = _student(tiny, small, teacher_dir).eval()
    with torch.no_grad():
        feats = encode_image(tiny.clip.visual, images, m.method.image_plan()).float()
        f = F.normalize(m.method.projector(feats), dim=-1)
        t = m.teacher.encode_text()
        want = tiny.logit_scale.float() * f @ t.T
        got = m(images)
    assert f.shape[-1] == 256 and got.shape == (6, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # the teacher's logits: its own prompts, its own scale
        torch.testing.assert_close(m.teacher_logits(images), m.teacher(images), atol=1e-5, rtol=0)


def test_kl_term_by_hand(tiny, small, teacher_dir, images):
    m = _student(tiny, small, teacher_dir, temperature=2.0, kd_weight=7.0).train()
    out = m.run(images, need=m.method.needs)
    loss, terms = m.method.objective(out, torch.full((6,), UNLABELLED))
    s, t = out.logits.detach().double() / 2.0, out.teacher_logits.double() / 2.0
    p = t.softmax(1)
    kl = (p * (p.log() - s.log_softmax(1))).sum() * 4.0 / s.numel()
    assert abs(float(terms["kd"].detach()) - float(kl)) < 1e-6 and float(kl) > 0
    assert abs(float(loss.detach()) - 7.0 * float(kl)) < 1e-5


def test_teacher_is_frozen_cached_and_not_saved(tiny, small, teacher_dir, images):
    m = _student(tiny, small, teacher_dir)
    teacher = m.teacher
    calls = []
    real = teacher._text_tower
    teacher._text_tower = lambda *a, **k: calls.append(1) or real(*a, **k)
    params = m.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    m.train()
    for _ in range(3):
        out = m.run(images, need=m.method.needs)
        loss, _ = m.method.objective(out, torch.full((6,), UNLABELLED))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(calls) == 1  # the teacher's class features: once per class set, not per step
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    ids = {id(p) for p in teacher.parameters()}
    assert not ids & {id(p) for p in params}  # no optimiser state for the teacher
    assert set(m.prompt_state_dict()) == {
        "image_prompts",
        *(f"projector.{i}.{k}" for i in (0, 3) for k in ("weight", "bias")),
        *(
            f"projector.1.{k}"
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ),
    }
    assert int(m.prompt_state_dict()["projector.1.num_batches_tracked"]) == 3  # BatchNorm trained
    m.set_classnames(["cat", "dog"])  # a new class set: computed once more
    m.eval()
    with torch.no_grad():
        m(images)
        m(images)
    assert len(calls) == 2 and teacher.classnames == ["cat", "dog"]


def test_a_missing_or_mismatched_teacher_is_one_line(tiny, small, teacher_dir, images):
    m = create_model("promptkd", tiny, CLASSES, depth_image=3)
    with pytest.raises(VlpromptError, match="learns from a teacher and none is set"):
        m(images)
    with pytest.raises(VlpromptError, match="options.teacher_width=256"):
        m.set_teacher(load_run(teacher_dir, backbone=small))


# ------------------------------------------------------------------ runs: transductive, resume
def _cfg(teacher_dir: Path, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "method": "promptkd",
            "protocol": "base2new",
            "options": {"depth_image": 2, "teacher": str(teacher_dir), "teacher_width": 256},
            "backbone": {"name": "vlp-tiny"},
            "data": {"dataset": "demo", "shots": 2, "seed": 1, "subsample": "base"},
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "device": "cpu", **train},
        }
    )


@pytest.fixture(scope="module")
def kd_run(teacher_dir, tmp_path_factory):
    seen = {}
    real_fit = run_train.fit

    def spy(model, data, cfg, *a, **k):
        seen["items"] = list(data)
        seen["classnames"] = list(model.classnames)
        seen["eval_classnames"] = k.get("eval_classnames")
        return real_fit(model, data, cfg, *a, **k)

    out = tmp_path_factory.mktemp("kd") / "run"
    run_train.fit = spy
    try:
        res = train_run(_cfg(teacher_dir), out, progress=False)
    finally:
        run_train.fit = real_fit
    return out, res, seen


def test_training_sees_train_images_of_every_class_and_no_test_image(kd_run):
    out, res, seen = kd_run
    full = get_dataset("demo", None)
    base = subsample(full, "base")
    test_paths = {d.relpath for d in full.test} | {d.relpath for d in full.val}
    trained = [d.relpath for d in seen["items"]]
    assert trained and not set(trained) & test_paths  # no test (or val) image reached training
    train_paths = {d.relpath for d in full.train}
    assert set(trained) <= train_paths
    by_path = {d.relpath: d.label for d in full.train}
    assert {by_path[p] for p in trained} == set(range(len(full.classnames)))  # base AND new classes
    assert all(d.label == UNLABELLED for d in seen["items"])  # no label reaches the method
    assert seen["classnames"] == [c.replace("_", " ") for c in full.classnames]
    assert seen["eval_classnames"] == list(base.classnames)
    split = json.loads((out / "split.json").read_text())
    assert split["unlabelled_train"] == trained
    assert res["evaluation"]["n_classes"] == len(base.classnames) and res["evaluation"]["subsample"] == "base"


def _transductive(d: dict) -> bool:
    return (
        d.get("transductive") is True
        and "unlabelled" in str(d.get("transductive_note"))
        and "no test image" in str(d.get("transductive_saw"))
        and "base and new" in str(d.get("transductive_saw"))
    )


def test_every_artefact_says_transductive_and_what_it_saw(kd_run, tmp_path):
    from vlprompt.protocols.display import method_label
    from vlprompt.run.load import evaluate_run, export_run

    out, _, _ = kd_run
    assert _transductive(json.loads((out / "manifest.json").read_text()))
    assert _transductive(json.loads((out / "metrics.json").read_text()))
    assert _transductive(json.loads((out / "env.json").read_text()))
    assert _transductive(yaml.safe_load((out / "config.yaml").read_text())["provenance"])
    with safe_open(str(out / "prompt.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["transductive"] == "true" and "no test image" in meta["transductive_saw"]
    exp = export_run(out, tmp_path / "exp")
    assert _transductive(json.loads((exp / "manifest.json").read_text()))
    evaluate_run(out, device="cpu")  # the new classes: still labelled
    metrics = json.loads((out / "metrics.json").read_text())
    assert _transductive(metrics) and {e["subsample"] for e in metrics["evaluations"]} == {"base", "new"}
    assert "transductive" in method_label("promptkd")  # report rows, plots, grid summaries


def test_teacher_not_in_the_prompt_file_and_the_run_reloads_to_the_same_logits(kd_run, teacher_dir, images):
    out, _, _ = kd_run
    with safe_open(str(out / "prompt.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k == "image_prompts" or k.startswith("projector.") for k in keys)
    a = load_run(out, device="cpu")
    b = load_run(out, device="cpu")
    assert a.teacher is not None and not any(p.requires_grad for p in a.teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(a(images), b(images), atol=0, rtol=0)
    fp = json.loads((out / "fingerprint.json").read_text())["identity"]
    assert len(fp["teacher"]["prompt_sha256"]) == 64 and "teacher" not in fp["options"]  # bytes, not path


def test_resume_is_bitwise(teacher_dir, tmp_path):
    cfg = _cfg(teacher_dir, epochs=2)
    whole = tmp_path / "whole"
    train_run(cfg, whole, progress=False)
    cut = tmp_path / "cut"
    assert train_run(cfg, cut, progress=False, stop_after_epoch=1)["status"] == "stopped"
    assert train_run(cfg, cut, progress=False, resume=True)["status"] == "trained"
    a = load_run(whole, device="cpu").prompt_state_dict()
    b = load_run(cut, device="cpu").prompt_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_a_teacher_is_refused_before_writing(tmp_path, teacher_dir):
    cfg = _cfg(teacher_dir).but(options={"teacher": ""})
    with pytest.raises(VlpromptError, match="options.teacher=PATH"):
        train_run(cfg, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------ official checkpoint import
def _official_student_state(model) -> dict:
    """The tensor names the official trainer saves for its student (CustomCLIP: image encoder with IVLP
    prompts + VPT_image_trans, 1x1 convolutions), from our model's values."""
    st = model.prompt_state_dict()
    p = st["image_prompts"]
    sd = {"image_encoder.VPT": p[0].clone(), "logit_scale": torch.tensor(4.6052)}
    sd["image_encoder.conv1.weight"] = model.backbone.clip.visual.conv1.weight.detach().clone()  # frozen
    for i in range(1, p.shape[0]):
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = p[i].clone()
    for i in (0, 3):
        w = st[f"projector.{i}.weight"]
        sd[f"VPT_image_trans.conv1.{i}.weight"] = w.clone()[:, :, None, None]
        sd[f"VPT_image_trans.conv1.{i}.bias"] = st[f"projector.{i}.bias"].clone()
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        sd[f"VPT_image_trans.conv1.1.{k}"] = st[f"projector.1.{k}"].clone()
    return sd


def test_official_student_checkpoint_imports_to_the_same_logits(tiny, small, teacher_dir, images, tmp_path):
    from vlprompt.cli.main import main
    from vlprompt.run.dassl_import import detect_method
    from vlprompt.run.load import load_prompt

    src = _student(tiny, small, teacher_dir)
    with torch.no_grad():
        for p in src.method.parameters():
            p.add_(0.05 * torch.randn_like(p))
        src.method.projector[1].running_mean.normal_(0, 0.1)
        src.method.projector[1].num_batches_tracked.fill_(40)
    sd = _official_student_state(src)
    assert detect_method(sd) == "promptkd"  # not VPT, though it holds image_encoder.VPT
    ckpt = tmp_path / "VLPromptLearner" / "model.pth.tar-20"
    ckpt.parent.mkdir()
    torch.save({"state_dict": sd, "epoch": 20, "optimizer": None, "scheduler": None}, ckpt)
    out = tmp_path / "imported"
    argv = ["import", str(ckpt), "--out", str(out), "--model", "vlp-tiny", "--classes", ",".join(CLASSES)]
    assert main([*argv, "--option", f"teacher={teacher_dir}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["depth_image"] == 3 and manifest["options"]["teacher_width"] == 256
    assert manifest["transductive"] is True
    got = load_prompt(out, backbone=tiny)
    assert got.teacher is not None
    got.teacher.backbone.clip.load_state_dict(small.clip.state_dict())  # the same random teacher weights
    src.eval()
    with torch.no_grad():
        torch.testing.assert_close(got(images), src(images), atol=1e-5, rtol=0)
    assert int(got.prompt_state_dict()["projector.1.num_batches_tracked"]) == 40


def test_report_rows_and_summary_say_transductive(kd_run, tmp_path):
    from vlprompt.cli.main import main

    out, _, _ = kd_run
    rep = tmp_path / "report"
    assert main(["report", str(out.parent), "--no-plots", "--out", str(rep)]) == 0
    text = "\n".join(p.read_text() for p in rep.rglob("*") if p.suffix in (".md", ".csv", ".txt"))
    assert "PromptKD (transductive)" in text and "**Transductive:**" in text


def test_one_teacher_per_data_set_through_a_dataset_field(teacher_dir, tmp_path):
    import shutil

    from vlprompt.run.identity import request_fingerprint

    shutil.copytree(teacher_dir, tmp_path / "teachers" / "demo")
    cfg = _cfg(teacher_dir, epochs=1).but(options={"teacher": str(tmp_path / "teachers" / "{dataset}")})
    res = train_run(cfg, tmp_path / "run", progress=False)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["options"]["teacher"]
    assert recorded == str(tmp_path / "teachers" / "demo")
    assert res["fingerprint"] == request_fingerprint(cfg)["fingerprint"]  # a grid finds the run again
    cfg_other = cfg.but(data={"dataset": "demo"}, options={"teacher": str(teacher_dir)})
    assert request_fingerprint(cfg_other)["fingerprint"] == res["fingerprint"]  # same bytes, other path


def test_the_protocols_unlabelled_pool_is_the_train_split_only():
    from vlprompt.data import fewshot
    from vlprompt.data.subsample import unlabelled_pool

    full = get_dataset("demo", None)
    items, classes = unlabelled_pool(full, "base")  # base-to-new: base and new classes' train images
    assert [d.relpath for d in items] == [d.relpath for d in full.train] and classes == list(full.classnames)
    assert {d.label for d in items} == {UNLABELLED}
    k2 = fewshot(full, 2, 1)
    items2, _ = unlabelled_pool(k2, "all")
    assert len(items2) == 2 * len(full.classnames)
    with pytest.raises(VlpromptError, match="subsampled"):
        unlabelled_pool(subsample(full, "base"), "base")
