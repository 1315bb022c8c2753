"""Inference: load_prompt, Prediction (names + probabilities), predict --format/--skip-bad/--weights."""

from __future__ import annotations

import csv
import io
import json
import logging

import pytest
import torch
from PIL import Image

import vlprompt
from vlprompt.cli.main import main
from vlprompt.run.dassl_import import write_prompt_dir

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def backbone():
    return vlprompt.load_backbone("vlp-tiny", init_seed=2)


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory, backbone):
    torch.manual_seed(0)
    model = vlprompt.create_model("coop", backbone, CLASSES, n_ctx=4)
    out = tmp_path_factory.mktemp("prompt") / "coop"
    manifest = {
        "method": "coop",
        "options": {"n_ctx": 4},
        "backbone": {"name": "vlp-tiny", "pretrained": None, "weights": None},
        "classnames": CLASSES,
        "template": model.template,
        "dataset": None,
    }
    write_prompt_dir(out, model, manifest)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    for name, rgb in [("r.png", (220, 10, 10)), ("g.png", (10, 220, 10))]:
        Image.new("RGB", (40, 30), rgb).save(d / name)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return d


def test_prediction_has_names_probabilities_and_tensors(prompt_dir, backbone, images):
    model = vlprompt.load_prompt(prompt_dir, backbone=backbone)
    pred = model.predict([images / "r.png", images / "g.png"], topk=2)
    assert pred.classnames == CLASSES and len(pred) == 2
    assert pred.probs.shape == (2, 3) and torch.allclose(pred.probs.sum(-1), torch.ones(2))
    top = pred.top()
    assert [len(r) for r in top] == [2, 2] and all(c in CLASSES for row in top for c, _ in row)
    assert top[0][0] == (pred.labels[0], pytest.approx(float(pred.probs[0].max())))
    values, indices = pred  # unpacks like torch.topk's result
    assert torch.equal(values, pred.probs.topk(2).values) and torch.equal(indices, pred.probs.topk(2).indices)
    assert pred.records()[1][0]["rank"] == 1 and pred.records()[1][0]["class"] == pred.labels[1]
    other = model.predict(images / "r.png", ["cat", "dog"])  # new class names: the point of prompts
    assert other.classnames == ["cat", "dog"] and other.probs.shape == (1, 2)


def test_load_prompt_takes_a_backbone_name(prompt_dir, backbone):
    a = vlprompt.load_prompt(prompt_dir, backbone="vlp-tiny")
    assert a.backbone.name == "vlp-tiny" and a.manifest["method"] == "coop"


def test_dir_shows_the_lazy_api_and_open_clip_stays_quiet(caplog):
    names = dir(vlprompt)
    for n in ("load_prompt", "load_backbone", "create_model", "train_run", "resolve_config", "Prediction"):
        assert n in names
    with caplog.at_level(logging.DEBUG):
        vlprompt.load_backbone("vlp-tiny")
    assert not [r for r in caplog.records if "pretrained weights" in r.getMessage()]


def test_predict_formats(prompt_dir, images, capsys):
    argv = ["predict", "--run", str(prompt_dir), "--topk", "2", str(images / "r.png"), str(images / "g.png")]
    assert main([*argv, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["image"].rsplit("/", 1)[-1] for d in doc] == ["r.png", "g.png"]
    assert [p["rank"] for p in doc[0]["predictions"]] == [1, 2]
    assert sum(p["probability"] for p in doc[0]["predictions"]) <= 1.0 + 1e-6
    assert main([*argv, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and set(rows[0]) == {"image", "rank", "class", "probability"}
    assert {r["class"] for r in rows} <= set(CLASSES)
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("r.png") and len(table) == 6


def test_predict_skip_bad(prompt_dir, images, capsys):
    argv = ["predict", "--run", str(prompt_dir), str(images / "broken.jpg"), str(images / "r.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--skip-bad" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--skip-bad", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert [d["image"].rsplit("/", 1)[-1] for d in json.loads(out)] == ["r.png"]
    assert "skipped" in err and "broken.jpg" in err


def test_predict_weights_file_alone(prompt_dir, backbone, images, tmp_path, capsys):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in backbone.clip.state_dict().items() if k != "attn_mask"}
    path = tmp_path / "clip.safetensors"
    save_file(sd, str(path))  # shapes only: the architecture is inferred
    argv = ["predict", "--run", str(prompt_dir), "--format", "json", str(images / "r.png")]
    assert main([*argv, "--weights", str(path)]) == 0
    with_file = json.loads(capsys.readouterr().out)
    assert main(argv) == 0  # the manifest's random-init vlp-tiny is a different backbone (seed 0)
    recorded = json.loads(capsys.readouterr().out)
    want = vlprompt.load_prompt(prompt_dir, backbone=backbone).predict(images / "r.png").records()[0]
    assert with_file[0]["predictions"] == want
    assert recorded[0]["predictions"] != want
