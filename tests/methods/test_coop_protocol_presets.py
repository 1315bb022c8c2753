"""CoOp's recipe per protocol equals the reference scripts (CoOp/CoCoOp repositories' configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlprompt.methods import create_model
from vlprompt.train.config import resolve_config

PRESET = Path(__file__).resolve().parents[2] / "src" / "vlprompt" / "methods" / "presets" / "coop.yaml"

# (options, train) of the reference configs, as Dassl/CoOp's train.py resolves them:
# configs/trainers/CoOp/{vit_b16, vit_b16_ctxv1, vit_b16_ep50_ctxv1}.yaml + CoOp defaults (N_CTX 16, CSC
# False, class token "end") + Dassl defaults (momentum 0.9, weight decay 5e-4)
COMMON = {"optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 32}
COMMON |= {"warmup_epochs": 1, "warmup_lr": 1e-5, "warmup_type": "constant", "scheduler": "cosine"}
CTXV1 = {"n_ctx": 4, "ctx_init": "a photo of a", "csc": False, "class_token_position": "end"}
RANDOM16 = {"n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end"}
REFERENCE = {
    # protocol, dataset, shots -> options, epochs
    ("base2new", "caltech101", 16): (CTXV1, 200),  # base2new_train.sh: CFG=vit_b16_ctxv1
    ("base2new", "caltech101", 4): (CTXV1, 200),  # the config does not depend on the shots
    ("base2new", "imagenet", 16): (CTXV1, 50),  # vit_b16_ep50_ctxv1 for ImageNet
    ("cross-dataset", "imagenet", 16): (CTXV1, 50),  # xd_train.sh: CFG=vit_b16_ep50_ctxv1
    ("dg", "imagenet", 16): (CTXV1, 50),  # the same trained model, evaluated on the variants
    ("fewshot", "caltech101", 16): (RANDOM16, 200),  # coop/main.sh with vit_b16
    ("fewshot", "caltech101", 1): (RANDOM16, 50),  # README: 1 shot uses vit_b16_ep50
    ("fewshot", "caltech101", 4): (RANDOM16, 100),  # 2/4 shots: vit_b16_ep100
    ("fewshot", "imagenet", 16): (RANDOM16, 50),
}


@pytest.mark.parametrize(("protocol", "dataset", "shots"), sorted(REFERENCE))
def test_resolved_coop_recipe_equals_reference_script(protocol, dataset, shots):
    options, epochs = REFERENCE[(protocol, dataset, shots)]
    cfg = resolve_config("coop", dataset, shots=shots, protocol=protocol)
    assert cfg.options.to_dict() == options
    assert cfg.train.epochs == epochs
    assert {k: getattr(cfg.train, k) for k in COMMON} == COMMON


def test_preset_names_its_sources():
    text = PRESET.read_text()
    for src in ("base2new_train.sh", "xd_train.sh", "vit_b16_ctxv1", "vit_b16_ep50_ctxv1", "main.sh"):
        assert src in text, src


def test_ctxv1_context_is_the_words_embeddings():
    from vlprompt.backbones import load_backbone

    tiny = load_backbone("vlp-tiny")
    m = create_model("coop", tiny, ["cat"], **CTXV1).method
    ids = tiny.encode_words("a photo of a")
    with torch.no_grad():
        assert torch.equal(m.ctx.detach().float(), tiny.token_embed(torch.tensor(ids)).float())
