"""Backbone weights that ship inside the package, loaded by name (``load_backbone("vlp-world")``).

``vlp-world`` is a small CLIP that vlprompt pretrained itself on its generated world
(:mod:`vlprompt.world.pretrain`, docs/world.md).  It is *not* CLIP: it knows coloured, textured
shapes and nothing else, but it is pretrained, so prompt learning on the ``world-*`` data sets moves
accuracies that mean something.  Its pretrained tag is ``bundled``; ``weights/<name>.json`` records the
recipe, the command that reproduces the file and the file's sha256, which is checked on every load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP
from safetensors import safe_open
from safetensors.torch import load_file

from vlprompt.backbones.backbone import METADATA_KEY
from vlprompt.errors import VlpromptError
from vlprompt.utils import read_json, sha256_file

WEIGHTS_DIR = Path(__file__).parent / "weights"
TAG = "bundled"
#: a bundled file keeps only the token-embedding rows its world's words use: their ids and the rows
COMPACT_IDS = "token_ids"
COMPACT_ROWS = "token_rows"
EMBED_KEY = "token_embedding.weight"
#: the metadata key of a checkpoint written by ``vlprompt world pretrain``: its recipe
RECIPE_KEY = "vlprompt_world_recipe"
WORLD_PRETRAINED_ON = "vlprompt's generated world (`vlprompt world pretrain`): not CLIP, not natural images"


@dataclass(frozen=True)
class Bundled:
    name: str
    file: Path
    record: dict[str, Any]  # the JSON next to the file: recipe, sha256, command, measured numbers


def bundled_names() -> list[str]:
    """Architectures with weights in the package (each loads pretrained when no tag or file is given)."""
    return sorted(
        p.stem for p in WEIGHTS_DIR.glob("*.safetensors") if (WEIGHTS_DIR / f"{p.stem}.json").is_file()
    )


def find_bundled(name: str | None, pretrained: Any) -> Bundled | None:
    """The bundled weights ``load_backbone(name, pretrained)`` should use, or None for the usual paths.

    A bundled name with ``pretrained`` None or ``"bundled"`` gets its shipped weights; any other tag for
    it is refused in one line (no other weights exist for these architectures).
    """
    if name is None or name not in bundled_names():
        return None
    if pretrained is not None and str(pretrained) != TAG:
        p = Path(str(pretrained))
        if p.suffix or "/" in str(pretrained) or "\\" in str(pretrained):
            return None  # a local file: the usual path
        raise VlpromptError(
            f"unknown pretrained tag '{pretrained}' for {name}; its only weights are the bundled ones "
            f"(pretrained='{TAG}', or leave it out)"
        )
    file = WEIGHTS_DIR / f"{name}.safetensors"
    record = json.loads((WEIGHTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return Bundled(name, file, record)


def find_world_checkpoint(path: Path) -> Bundled | None:
    """A checkpoint of ``vlprompt world pretrain`` given as a weights file (its recipe in the metadata, a
    compact token table), to be loaded as the bundled one is; None for any other file.  Its record is
    the JSON written beside it, when there is one (its sha256 is then checked)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file: the usual path says why, in one line
        return None
    if RECIPE_KEY not in meta:
        return None
    if METADATA_KEY not in meta:
        raise VlpromptError(f"{path} has a pretraining recipe but no model config; pretrain it again")
    side = path.with_suffix(".json")
    record = read_json(side) if side.is_file() else {}
    if not isinstance(record, dict):
        raise VlpromptError(
            f"{side} is not the record `vlprompt world pretrain` writes; remove it or pretrain again"
        )
    sha256 = sha256_file(path)
    if record.get("sha256") not in (None, sha256):
        raise VlpromptError(
            f"{path} does not match the sha256 recorded in {side}; the file changed after `vlprompt world "
            f"pretrain` wrote them: pretrain again, or remove {side.name} to load the file as it is"
        )
    try:
        config, recipe = json.loads(meta[METADATA_KEY]), json.loads(meta[RECIPE_KEY])
    except json.JSONDecodeError:
        raise VlpromptError(
            f"{path} has damaged metadata; pretrain it again (`vlprompt world pretrain`)"
        ) from None
    record = {"pretrained_on": WORLD_PRETRAINED_ON, **record, "config": config, "sha256": sha256}
    return Bundled(str(recipe.get("arch") or path.stem), path, {**record, "format": "vlprompt-world"})


@lru_cache(maxsize=4)
def _verified(path: str, sha256: str) -> bool:
    return sha256_file(path) == sha256


def read_bundled_state_dict(b: Bundled) -> dict[str, torch.Tensor]:
    """The full fp32 state dict: the compact token table is expanded into zeros (unused tokens)."""

    if not _verified(str(b.file), b.record.get("sha256", "")):
        raise VlpromptError(
            f"bundled weights {b.file} do not match their recorded sha256; reinstall vlprompt "
            f"(or rebuild them: {b.record.get('command', 'vlprompt world pretrain')})"
        )
    sd = load_file(str(b.file))
    ids, rows = sd.pop(COMPACT_IDS), sd.pop(COMPACT_ROWS)
    vocab = int(b.record["config"]["text_cfg"]["vocab_size"])
    table = torch.zeros(vocab, rows.shape[1], dtype=torch.float32)
    table[ids] = rows.float()
    sd[EMBED_KEY] = table
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def build_bundled(b: Bundled) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The open_clip CLIP with the bundled weights, plus the backbone meta (says: pretrained, by whom)."""

    cfg = dict(b.record["config"])
    model = CLIP(**{k: v for k, v in cfg.items() if k != "quick_gelu"}, quick_gelu=False)
    missing, unexpected = model.load_state_dict(read_bundled_state_dict(b), strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise VlpromptError(
            f"bundled weights {b.file} do not fit {b.name} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); reinstall vlprompt"
        )
    meta = {
        "source": str(b.file),
        "format": b.record.get("format", "vlprompt-bundled"),
        "config": {**cfg, "quick_gelu": False},
        "quick_gelu": False,
        "random_init": False,
        "pretrained_on": b.record.get("pretrained_on"),
        # knows only vlprompt's generated world: runs on other data get a banner (run/backbone.py)
        "toy_world": "generated world" in str(b.record.get("pretrained_on") or ""),
        "sha256": b.record.get("sha256"),
        # 32-px images whose objects fill 10-40% of the frame: CoOp's (0.08, 1) crops would mostly
        # cut the object out, so training crops keep at least half the image (ours; docs/world.md)
        "train_crop_scale": (0.5, 1.0),
    }
    return model, meta
