"""Fixtures of the method tests: the random tiny backbone (real architecture, 4 layers), one per module."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import load_backbone


@pytest.fixture
def cli_round_trip(tmp_path):
    """``(method, *extra) -> (trained, exported, manifest)``: ``vlprompt train`` for one epoch on the demo
    set (2 shots, vlp-tiny, batch 4, ``extra`` arguments added), ``vlprompt export``, both loaded with
    ``vlprompt.load_prompt``; the two give the same logits on random images (checked here)."""
    import json

    import vlprompt
    from vlprompt.cli.main import main

    def run(method: str, *extra: str):
        out, exp = tmp_path / method, tmp_path / f"{method}-export"
        args = ["train", "--method", method, "--dataset", "demo", "--shots", "2", "--model", "vlp-tiny"]
        args += ["--no-progress", "--epochs", "1", "--set", "train.batch_size=4", "--out", str(out), *extra]
        assert main(args) == 0
        assert main(["export", str(out), str(exp)]) == 0
        a, b = vlprompt.load_prompt(out), vlprompt.load_prompt(exp)
        a.eval()
        b.eval()
        size = a.backbone.preprocess_cfg["size"]
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(a(x), b(x))
        return a, b, json.loads((out / "manifest.json").read_text())

    return run


@pytest.fixture
def world_gain():
    """``(method, train, zs_template, **options) -> (zero-shot %, trained %)``: ``method`` trained with the
    ``train`` section on world-shape-texture's base classes (4 shots, seed 1, vlp-world), both scored on
    those training shots with the eval transform (on held-out images vlp-world's features leave little
    for a few-shot method to add: docs/world.md)."""
    from vlprompt.data import build_loader, build_transform, fewshot, get_dataset, subsample
    from vlprompt.methods import create_model
    from vlprompt.train import fit
    from vlprompt.train.config import RunConfig
    from vlprompt.train.evaluate import evaluate

    def run(method: str, train: dict, zs_template: str, **options):
        torch.set_num_threads(1)
        backbone = load_backbone("vlp-world")
        splits = subsample(fewshot(get_dataset("world-shape-texture"), shots=4, seed=1), "base")
        tf = build_transform(False, **backbone.preprocess_cfg)
        test = build_loader(splits.train, tf, 256, shuffle=False)
        zs = create_model("zeroshot", backbone, splits.classnames, template=zs_template)
        torch.manual_seed(0)
        m = create_model(method, backbone, splits.classnames, **options)
        fit(
            m,
            splits.train,
            RunConfig.from_dict({"train": train, "data": {"seed": 1}}, partial=True),
            progress=False,
        )
        return evaluate(zs, test)["accuracy"], evaluate(m, test)["accuracy"]

    return run
