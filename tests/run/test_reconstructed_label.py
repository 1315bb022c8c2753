"""Every artefact of a DPL run says it is reconstructed from the paper's abstract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from vlprompt.cli.main import main

NOTE = "reconstructed from the paper's abstract"
DPL_TINY = ["--set", "options.depth_image=2", "--set", "options.depth_text=2", "--set", "train.batch_size=4"]


def _train(method: str, out: Path, *extra: str) -> int:
    argv = ["train", "--method", method, "--dataset", "demo", "--shots", "1", "--model", "vlp-tiny"]
    return main([*argv, "--epochs", "1", "--no-progress", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def dpl_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpl") / "run"
    assert _train("dpl", out, *DPL_TINY) == 0
    return out


def _labelled(d: dict) -> bool:
    return d.get("reconstructed") is True and NOTE in str(d.get("note", ""))


def test_run_files_carry_the_label(dpl_run):
    assert _labelled(json.loads((dpl_run / "manifest.json").read_text()))
    assert _labelled(json.loads((dpl_run / "metrics.json").read_text()))
    assert _labelled(json.loads((dpl_run / "env.json").read_text()))
    assert _labelled(yaml.safe_load((dpl_run / "config.yaml").read_text())["provenance"])
    with safe_open(str(dpl_run / "prompt.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["reconstructed"] == "true" and NOTE in meta["note"]
    assert _labelled(json.loads(meta["vlprompt_manifest"]))


def test_export_carries_the_label(dpl_run, tmp_path):
    out = tmp_path / "exp"
    assert main(["export", str(dpl_run), str(out)]) == 0
    assert _labelled(json.loads((out / "manifest.json").read_text()))
    assert _labelled(yaml.safe_load((out / "config.yaml").read_text())["provenance"])
    with safe_open(str(out / "prompt.safetensors"), framework="pt") as f:
        assert f.metadata()["reconstructed"] == "true"


def test_other_methods_carry_no_label(tmp_path):
    out = tmp_path / "coop"
    assert _train("coop", out, "--set", "train.batch_size=4") == 0
    assert "reconstructed" not in json.loads((out / "manifest.json").read_text())
    assert "provenance" not in yaml.safe_load((out / "config.yaml").read_text())
