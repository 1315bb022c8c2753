"""Issue 25 item 1: OpenAI / papers' model spellings, and the catalogue of loadable models."""

from __future__ import annotations

import pytest

import vlprompt
from vlprompt.backbones import canonical_model_name, load_backbone
from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("ViT-B/16", "ViT-B-16"),
        ("ViT-B/32", "ViT-B-32"),
        ("ViT-L/14", "ViT-L-14"),
        ("ViT-L/14@336px", "ViT-L-14-336"),
        ("RN50", "RN50"),
        ("RN50x16", "RN50x16"),
        ("vit-b-16", "ViT-B-16"),
        ("VLP-WORLD", "vlp-world"),
        ("no-such-model", "no-such-model"),
    ],
)
def test_openai_spellings_map_to_open_clip_names(given, canonical):
    assert canonical_model_name(given) == canonical


def test_load_backbone_accepts_the_papers_spelling(monkeypatch):
    """Offline, ViT-B/16 + openai reaches the tag lookup (not 'weights file not found: ViT-B/16')."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-vlprompt-test-cache")
    with pytest.raises(VlpromptError, match=r"pretrained weights ViT-B-16/openai are not in the local cache"):
        load_backbone("ViT-B/16", pretrained="openai")


def test_load_backbone_papers_spelling_random_init_small():
    bb = load_backbone("VLP-Tiny")  # case folded to the registered name, random init
    assert bb.name == "vlp-tiny"


def test_list_models_says_what_each_needs():
    rows = vlprompt.list_models(check_cache=False)
    by = {(r.architecture, r.tag): r for r in rows}
    world = by[("vlp-world", "bundled")]
    assert world.needs == "nothing" and world.source == "bundled"
    assert by[("vlp-tiny", None)].needs == "file"
    openai = by[("ViT-B-16", "openai")]
    assert openai.needs == "download" and openai.openai_name == "ViT-B/16"
    assert by[("ViT-L-14-336", "openai")].openai_name == "ViT-L/14@336px"
    assert {r.architecture for r in vlprompt.list_models("ViT-B/16", check_cache=False)} >= {"ViT-B-16"}


def test_models_command_lists_tags_and_needs(capsys):
    assert main(["models", "ViT-L/14@336px", "--no-cache-check"]) == 0
    out = capsys.readouterr().out
    assert "ViT-L-14-336" in out and "openai" in out and "download" in out and "ViT-L/14@336px" in out
    assert main(["models", "vlp-world"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:4] == ["vlp-world", "bundled", "bundled", "nothing"]
    assert main(["models", "zzz-none"]) == 2
    assert "no architecture matches 'zzz-none'" in capsys.readouterr().err


def test_cli_model_flag_takes_the_papers_spelling(capsys, tmp_path):
    """`--model ViT-B/16 --pretrained openai` offline: one line about the cache, named the open_clip way."""
    rc = main(["eval", "--model", "ViT-B/16", "--pretrained", "openai", "--dataset", "world-shapes",
               "--method", "zeroshot", "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "ViT-B-16/openai" in err and "weights file not found" not in err
