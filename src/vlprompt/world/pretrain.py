"""Pretrain the bundled ``vlp-world`` CLIP on the generated world, bit-for-bit reproducibly on a CPU.

open_clip's own pieces do the modelling: the ``vlp-world`` architecture is an open_clip model config,
the model is ``open_clip.create_model``'s CLIP, the loss is ``open_clip.loss.ClipLoss`` and the tokenizer
is open_clip's ``SimpleTokenizer``.  Our loop replaces open_clip's training entry point (which wants
webdataset/CSV shards and a distributed launcher) with one that draws image-caption pairs straight from
:mod:`vlprompt.world.scene` by index, so a run depends only on the recipe (seed included).

Reproducibility: the recipe fixes the torch thread count and enables deterministic algorithms; the
data stream is ``scene.sample_batch(seed, step * batch, batch)``; nothing reads a clock or the global
RNG state left by someone else.  Same recipe + same torch build + same CPU kind -> same bytes, which
``vlprompt world pretrain --check`` verifies against the recorded sha256.

The checkpoint is compact: weights in fp16, and of the 49,408-row token table only the rows of tokens
the world's text can produce are stored (``token_ids`` + ``token_rows``); the loader puts them back into
a zero table (:mod:`vlprompt.backbones.bundled`, which holds the format's key names).  Tokens that
never occur were never trained.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

from vlprompt.backbones.bundled import COMPACT_IDS, COMPACT_ROWS, EMBED_KEY, RECIPE_KEY, sha256_file
from vlprompt.backbones.loading import METADATA_KEY, register_configs
from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write
from vlprompt.world import scene as world

log = logging.getLogger(__name__)

ARCH = "vlp-world"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the checkpoint (stored in its metadata)."""

    arch: str = ARCH
    seed: int = 0  # model init and the world stream
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    #: ours: the logit scale's lr is 10x the others' so that it can reach CLIP's range (>= 50) in a
    #: budget of a thousand steps (CLIP's own takes ~100k steps to reach its clamp of 100)
    logit_scale_lr_mult: float = 10.0
    #: ours: weight of an auxiliary cross-entropy on the image embedding predicting the first object's
    #: shape, colour, texture, size and the background (linear heads, discarded after pretraining).
    #: Without it the image tower of a ViT this small, trained from scratch on 10^5 pairs, learns
    #: colour, background and size but not shape or texture (world v2: shape 10 %, texture 24 %).
    aux_weight: float = 5.0
    threads: int = 1  # one thread: bit-for-bit across machines, and fastest on a shared CPU
    image_size: int = world.IMAGE_SIZE
    world_version: int = 3


RECIPES: dict[str, Recipe] = {
    "full": Recipe(),
    "short": Recipe(steps=4, batch_size=16, warmup_steps=2),  # a reproducibility check in seconds
}


def _lr_at(r: Recipe, step: int) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    t = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * t))


def world_token_ids(tokenizer: Any) -> list[int]:
    """Token ids the world's captions, class names and templates can produce (plus start/end/padding)."""
    ids = {0, tokenizer.sot_token_id, tokenizer.eot_token_id}
    for w in [*world.vocabulary(), ".", ":", ","]:
        ids.update(tokenizer.encode(w))
    return sorted(ids)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)``, as the eval transform does it."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    """open_clip's split: no decay on gains, biases, embeddings, logit scale (all <2-D tensors + tables).

    The logit scale gets a group of its own (``lr_mult``: the recipe's ``logit_scale_lr_mult``).
    """
    decay, no_decay, scale = [], [], []
    for name, p in model.named_parameters():
        if "logit_scale" in name:
            scale.append(p)
            continue
        skip = p.ndim < 2 or "embedding" in name or name.endswith("class_embedding")
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": wd, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": scale, "weight_decay": 0.0, "lr_mult": None},
    ]


@torch.no_grad()
def _train_with_compact_table(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    """Swap the 49,408-row token table for the world's rows; returns the id -> row lookup table.

    Equivalent to training the full table (rows of tokens that never occur get no gradient and no
    weight decay) at a fraction of the optimizer's cost.  Ids are kept in order, so the end-of-text
    token is still the largest id and open_clip's argmax pooling finds the same position.
    """
    ids = torch.tensor(world_token_ids(tokenizer))
    full = model.token_embedding
    lut = torch.zeros(full.num_embeddings, dtype=torch.long)
    lut[ids] = torch.arange(len(ids))
    compact = torch.nn.Embedding(len(ids), full.embedding_dim)
    compact.weight.copy_(full.weight[ids])
    model.token_embedding = compact
    return lut


@torch.no_grad()
def _restore_full_table(model: torch.nn.Module, tokenizer: Any) -> None:
    """Back to the full table: trained rows in place, zeros for tokens the world never produces."""
    ids = torch.tensor(world_token_ids(tokenizer))
    compact = model.token_embedding
    vocab = int(model.vocab_size)
    full = torch.nn.Embedding(vocab, compact.embedding_dim)
    full.weight.zero_()
    full.weight[ids] = compact.weight
    model.token_embedding = full


#: one attribute at a time: prompts of the form "a photo of a {value} shape" and the values probed
PROBE_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "colour": ("a photo of a {} shape.", tuple(world.COLOURS)),
    "shape": ("a photo of a {}.", world.SHAPES),
    "texture": ("a photo of a {} shape.", world.TEXTURES),
    "background": ("a photo of a shape on a {} background.", world.BACKGROUNDS),
    "size": ("a photo of a {} shape.", world.NAMED_SIZES),
}


def probe_scenes(attribute: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh one-object photos whose ``attribute`` is drawn uniformly (labels: index in the values)."""
    values = PROBE_PROMPTS[attribute][1]
    rng = np.random.default_rng([seed, list(PROBE_PROMPTS).index(attribute)])
    labels = rng.integers(len(values), size=n)
    imgs = []
    for y in labels:
        fixed = {attribute: values[y]}
        background = fixed.pop("background", None)
        imgs.append(world.render(world.sample_scene(rng, 1, background=background, **fixed), rng))
    return np.stack(imgs), labels


@torch.no_grad()
def attribute_probes(
    model: torch.nn.Module, tokenizer: Any, n: int = 512, seed: int = 12345, batch: int = 256
) -> dict[str, float]:
    """Zero-shot accuracy (%) per attribute on ``n`` fresh scenes each (chance: 1 / number of values)."""
    was = model.training
    model.eval()
    out = {}
    for attribute, (template, values) in PROBE_PROMPTS.items():
        imgs, labels = probe_scenes(attribute, n, seed)
        txt = model.encode_text(tokenizer([template.format(v) for v in values]), normalize=True)
        preds = []
        for i in range(0, n, batch):
            img = model.encode_image(images_to_tensor(imgs[i : i + batch]), normalize=True)
            preds.append((img @ txt.T).argmax(1).numpy())
        out[attribute] = round(float((np.concatenate(preds) == labels).mean() * 100), 2)
    model.train(was)
    return out


def _aux_loss(heads: torch.nn.ModuleList, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the attribute heads on the (unnormalised) image embedding."""
    losses = [torch.nn.functional.cross_entropy(h(features), labels[:, i]) for i, h in enumerate(heads)]
    return torch.stack(losses).mean()


def pretrain(
    recipe: Recipe,
    on_step: Callable[[int, float, float], None] | None = None,
    probe: bool = True,
    on_probe: Callable[[int, dict[str, float]], None] | None = None,
    probe_every: int = 0,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the world CLIP from scratch by ``recipe``; returns the fp32 model and a training summary.

    ``probe=False`` skips the attribute probes of the summary; ``probe_every`` > 0 calls ``on_probe``
    with probes on 128 scenes every so many steps.  Neither changes the weights (no gradient, no
    draw from torch's generator).
    """
    register_configs()
    cfg = open_clip.get_model_config(recipe.arch)
    if cfg is None:
        raise VlpromptError(f"unknown architecture {recipe.arch!r} in the pretraining recipe")
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = open_clip.create_model(recipe.arch, pretrained=None)
            tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
            loss_fn = ClipLoss()
            lut = _train_with_compact_table(model, tokenizer)
            heads = torch.nn.ModuleList(
                torch.nn.Linear(cfg["embed_dim"], len(v)) for v in world.LABELLED.values()
            )
            groups = _param_groups(model, recipe.weight_decay)
            if recipe.aux_weight:
                groups[0]["params"] += [h.weight for h in heads]
                groups[1]["params"] += [h.bias for h in heads]
            opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
            model.train()
            t0 = time.perf_counter()
            losses = []
            for step in range(recipe.steps):
                for g in opt.param_groups:
                    g["lr"] = _lr_at(recipe, step) * (g["lr_mult"] or recipe.logit_scale_lr_mult)
                imgs, caps, labels = world.sample_batch(
                    recipe.seed, step * recipe.batch_size, recipe.batch_size, labels=True
                )
                raw = model.encode_image(images_to_tensor(imgs))  # as CLIP.forward, unnormalised first
                text_features = model.encode_text(lut[tokenizer(caps)], normalize=True)
                scale = model.logit_scale.exp()
                loss = loss_fn(torch.nn.functional.normalize(raw, dim=-1), text_features, scale)
                if recipe.aux_weight:
                    loss = loss + recipe.aux_weight * _aux_loss(heads, raw, torch.from_numpy(labels))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(loss.item())
                if on_step is not None:
                    on_step(step, losses[-1], time.perf_counter() - t0)
                if on_probe is not None and probe_every and (step + 1) % probe_every == 0:
                    probes = attribute_probes(model, lambda t: lut[tokenizer(t)], n=128)
                    on_probe(step, {**probes, "scale": round(float(scale.detach()), 2)})
            _restore_full_table(model, tokenizer)
            model.eval()
            summary = {
                "final_loss": float(np.mean(losses[-20:])),
                "train_seconds": round(time.perf_counter() - t0, 1),
                "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
                "attribute_probes_512": attribute_probes(model, tokenizer) if probe else None,
            }
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    return model, summary


def compact_state_dict(model: torch.nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    """fp16 weights with the token table cut down to the world's rows (see the module docstring)."""
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    sd.pop("attn_mask", None)
    ids = torch.tensor(world_token_ids(tokenizer), dtype=torch.int64)
    table = sd.pop(EMBED_KEY)
    sd[COMPACT_IDS] = ids
    sd[COMPACT_ROWS] = table[ids].contiguous()
    return sd


def save_checkpoint(model: torch.nn.Module, recipe: Recipe, path: str | Path) -> str:
    """Write the compact checkpoint with the recipe in its metadata; returns its sha256."""
    cfg = open_clip.get_model_config(recipe.arch)
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    meta = {
        METADATA_KEY: json.dumps({**cfg, "quick_gelu": False}, sort_keys=True),
        RECIPE_KEY: json.dumps(asdict(recipe), sort_keys=True),
    }

    def write(tmp: str) -> None:
        save_file(compact_state_dict(model, tokenizer), tmp, metadata=meta)
        canonical_header(tmp)

    atomic_write(str(path), write)
    return sha256_file(path)


def canonical_header(path: str | Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place.

    safetensors writes the metadata in hash-map order, which differs from one write to the next, so
    the same tensors and metadata could give files with different bytes; sorting makes the file (and
    its sha256) a function of its content alone.  The header keeps its length, so the tensor data and
    its offsets are untouched.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n).decode("utf-8"))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        if len(text) > n:  # cannot happen for a header safetensors wrote (same content, same length)
            raise VlpromptError(f"cannot canonicalise the header of {path}")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def recipe_from_name(name: str, **overrides: Any) -> Recipe:
    if name not in RECIPES:
        raise VlpromptError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    r = asdict(RECIPES[name])
    r.update({k: v for k, v in overrides.items() if v is not None})
    r["betas"] = tuple(r["betas"])
    return Recipe(**r)


def record_for(recipe: Recipe, sha256: str, summary: dict[str, Any], recipe_name: str) -> dict[str, Any]:
    """The JSON record written beside a checkpoint: what reproduces it and what it was measured to do."""
    cfg = open_clip.get_model_config(recipe.arch)
    flags = "" if recipe_name == "full" else f" --recipe {recipe_name}"
    defaults = asdict(RECIPES[recipe_name])
    for k in ("seed", "steps"):
        if getattr(recipe, k) != defaults[k]:
            flags += f" --{k} {getattr(recipe, k)}"
    return {
        "name": recipe.arch,
        "sha256": sha256,
        "command": f"vlprompt world pretrain --out {recipe.arch}.safetensors{flags}",
        "recipe": asdict(recipe),
        "config": {**cfg, "quick_gelu": False},
        "pretrained_on": "vlprompt's generated world v3 (vlprompt.world): not CLIP, not natural images",
        "summary": summary,
        "built_with": {
            "torch": torch.__version__,
            "open_clip": getattr(open_clip, "__version__", None),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }
