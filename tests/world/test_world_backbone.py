"""The bundled vlp-world backbone: loads pretrained by name, verified by sha256, reproducible recipe."""

from __future__ import annotations

import shutil

import pytest
import torch

from vlprompt.backbones import bundled, load_backbone
from vlprompt.backbones.pretrain import Recipe, pretrain, save_checkpoint
from vlprompt.errors import VlpromptError


@pytest.fixture(scope="module")
def world_bb():
    return load_backbone("vlp-world")


def test_vlp_world_loads_bundled_weights(world_bb) -> None:
    assert "vlp-world" in bundled.bundled_names()
    assert world_bb.pretrained == "bundled" and world_bb.meta["random_init"] is False
    assert world_bb.meta["sha256"] == bundled.find_bundled("vlp-world", None).record["sha256"]
    assert world_bb.preprocess_cfg["size"] == 32 and world_bb.context_length == 24
    again = load_backbone("vlp-world", pretrained="bundled")
    for (k, a), b in zip(world_bb.clip.state_dict().items(), again.clip.state_dict().values()):
        assert torch.equal(a, b), k
    random = load_backbone("vlp-demo")
    assert random.meta["source"] == "random-init"


def test_unused_tokens_are_zero_and_world_tokens_trained(world_bb) -> None:
    table = world_bb.clip.token_embedding.weight
    red = world_bb.encode_words("red")[0]
    assert table[red].abs().sum() > 0
    outside = world_bb.encode_words("zebra")[0]  # never in the world's text
    assert table[outside].abs().sum() == 0


def test_other_tag_and_corrupt_file_fail_in_one_line(tmp_path, monkeypatch) -> None:
    with pytest.raises(VlpromptError, match="only weights are the bundled"):
        load_backbone("vlp-world", pretrained="openai")
    for f in bundled.WEIGHTS_DIR.glob("vlp-world.*"):
        shutil.copy(f, tmp_path / f.name)
    blob = bytearray((tmp_path / "vlp-world.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "vlp-world.safetensors").write_bytes(bytes(blob))
    monkeypatch.setattr(bundled, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(VlpromptError, match="do not match their recorded sha256"):
        load_backbone("vlp-world")


def test_pretraining_is_bit_for_bit_reproducible(tmp_path) -> None:
    recipe = Recipe(steps=2, batch_size=8, warmup_steps=1)
    shas = []
    for i in range(2):
        model, summary = pretrain(recipe, probe=False)
        shas.append(save_checkpoint(model, recipe, tmp_path / f"run{i}.safetensors"))
        assert summary["final_loss"] > 0
    assert shas[0] == shas[1]
    other, _ = pretrain(Recipe(steps=2, batch_size=8, warmup_steps=1, seed=1), probe=False)
    assert save_checkpoint(other, recipe, tmp_path / "other.safetensors") != shas[0]
