"""Issue 25 item 7: prompts shared like models (export --hub, hf-hub: loading, push).

The upload itself needs a network and a token, so it is not run here: everything up to
``HfApi.upload_folder`` is (the call is recorded by a stand-in).  Loading is tested offline from a
Hugging Face cache populated the way ``snapshot_download`` leaves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import vlprompt
from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError
from vlprompt.run import hub

TINY = ["--model", "vlp-tiny", "--epochs", "1", "--set", "train.batch_size=8", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hubrun") / "coop"
    assert (
        main(["train", "--method", "coop", "--dataset", "demo", "--shots", "1", "--out", str(out), *TINY])
        == 0
    )
    return out


def test_export_hub_writes_the_folder_and_a_model_card(run_dir, tmp_path, capsys):
    folder = tmp_path / "hub"
    assert main(["export", str(run_dir), "--hub", str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {
        "prompt.safetensors", "manifest.json", "config.yaml", "metrics.json", "README.md"
    }  # fmt: skip
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "vlprompt" and "coop" in front["tags"]
    acc = json.loads((run_dir / "metrics.json").read_text())["evaluations"][0]["accuracy"]
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == round(acc, 2)
    assert "(`coop`) |" in card and "vlp-tiny" in card and "Demo" in card  # display name: the registry's
    assert f"{acc:.2f}" in card
    assert "random-init backbone" in card  # vlp-tiny is random: the card says so
    assert "confusion" not in (folder / "metrics.json").read_text()
    # an earlier export is refreshed in place, as --hub or plain (which drops the stale card and metrics)
    assert main(["export", str(run_dir), "--hub", str(folder)]) == 0
    assert main(["export", str(run_dir), str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {"prompt.safetensors", "manifest.json", "config.yaml"}
    (folder / "README.md").write_text("# my notes\n")  # the user's own README: never deleted
    (folder / "metrics.json").write_text('{"mine": 1}')
    assert main(["export", str(run_dir), str(folder)]) == 2
    assert "is a folder that is not a vlprompt run" in capsys.readouterr().err
    assert (folder / "README.md").read_text() == "# my notes\n"
    (folder / "notes.txt").write_text("mine")  # a file of the user's: the folder is no export any more
    assert main(["export", str(run_dir), "--hub", str(folder)]) == 2
    assert "is a folder that is not a vlprompt run" in capsys.readouterr().err


def test_labels_reconstructed_and_transductive():
    assert hub.labels({"method": "coop", "backbone": {}}) == []
    dpl = hub.labels({"method": "dpl", "backbone": {}})
    assert dpl == ["DPL is reconstructed from the paper's abstract"]
    trans = hub.labels({"method": "coop", "backbone": {}}, {"options": {"transductive": True}})
    assert trans == ["transductive: it saw unlabelled images of the classes it is tested on"]
    card = hub.model_card({"method": "dpl", "backbone": {"name": "ViT-B-16"}, "options": {}}, [])
    assert "> **DPL is reconstructed from the paper's abstract**" in card


def _populate_cache(cache: Path, repo: str, folder: Path, revision: str = "0" * 40) -> None:
    """The layout snapshot_download leaves: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copyfile(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)


def test_load_prompt_from_the_hub_cache_offline(run_dir, tmp_path, monkeypatch):
    folder = hub.export_hub(run_dir, tmp_path / "hub")
    cache = tmp_path / "hf-cache"
    _populate_cache(cache, "someone/coop-demo", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = vlprompt.load_prompt("hf-hub:someone/coop-demo")
    local = vlprompt.load_prompt(folder)
    assert model.classnames == local.classnames
    for (n, p), (m, q) in zip(model.named_trainable_parameters(), local.named_trainable_parameters()):
        assert n == m and torch.equal(p, q)
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(model(x), local(x))
    with pytest.raises(VlpromptError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        vlprompt.load_prompt("hf-hub:someone/missing")
    with pytest.raises(VlpromptError, match="hf-hub:ORG/NAME"):
        vlprompt.load_prompt("hf-hub:no-slash")


def test_push_reaches_upload_folder(run_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    folder = hub.export_hub(run_dir, tmp_path / "hub")
    calls: dict[str, dict] = {}
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.setdefault("create", {"repo_id": repo_id, **kw}),
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(folder), "someone/coop-demo"]) == 2  # offline: refused in one line
    assert "pushing needs the network" in capsys.readouterr().err and not calls
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["push", str(folder), "someone/coop-demo", "--private"]) == 0
    assert calls["create"]["repo_id"] == "someone/coop-demo" and calls["create"]["private"] is True
    up = calls["upload"]
    assert up["repo_id"] == "someone/coop-demo" and Path(up["folder_path"]) == folder
    assert set(up["allow_patterns"]) >= {"prompt.safetensors", "manifest.json", "README.md"}
    assert "https://huggingface.co/someone/coop-demo" in capsys.readouterr().out
    plain = vlprompt.run.export_run(run_dir, tmp_path / "plain")  # no model card: not a Hub folder
    assert main(["push", str(plain), "someone/coop-demo"]) == 2
    assert "no model card" in capsys.readouterr().err
