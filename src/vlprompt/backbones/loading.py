"""Load a frozen CLIP backbone through open_clip: name + tag, local file, or random init.

Sources, in the order they are recognised:

* ``pretrained=None`` -- the real architecture with random weights (tests, benchmarks, offline demo);
* ``pretrained=<path>`` (or ``name=<path>``) -- a local file: an OpenAI CLIP archive (TorchScript or
  plain state dict), an open_clip checkpoint (``.pt``/``.bin``, optionally wrapped in ``state_dict``,
  optionally ``module.``-prefixed) or ``.safetensors``.  The architecture is inferred from the weights
  when no name is given;
* ``pretrained=<tag>`` -- an open_clip pretrained tag, downloaded when a network exists.  Offline we
  check the caches first and fail in one line instead of waiting on retries.

QuickGELU: OpenAI-trained weights need it and nothing in a state dict says so.  We use it when the
weights are in OpenAI's archive format (TorchScript, or the ``input_resolution``/``context_length``
entries OpenAI's archives carry, or fp16 tensors in OpenAI's key layout without a wrapper), when the
open_clip name or tag says so (``-quickgelu`` configs, ``openai`` tags), when a vlprompt-written file
records it, or when the caller passes ``quick_gelu=True``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import hf_hub_download
from open_clip.model import CLIP
from safetensors import safe_open
from safetensors.torch import load_file

from vlprompt import torchfile
from vlprompt.backbones.backbone import METADATA_KEY, Backbone
from vlprompt.backbones.bundled import TAG as BUNDLED_TAG
from vlprompt.backbones.bundled import build_bundled, find_bundled, find_world_checkpoint
from vlprompt.errors import VlpromptError, unknown_name

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "configs"
_REGISTERED = False
OPENAI_ARCHIVE_KEYS = ("input_resolution", "context_length", "vocab_size")


def register_configs() -> None:
    """Make vlprompt's small test/demo architectures known to open_clip (``vlp-tiny``, ``vlp-small``)."""
    global _REGISTERED
    if not _REGISTERED:
        open_clip.add_model_config(str(_CONFIG_DIR))
        _REGISTERED = True


class _NoRandomInitNotice(logging.Filter):
    """open_clip says "No pretrained weights loaded" on the root logger; random init is asked for here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "No pretrained weights loaded" not in msg and "Model initialized randomly" not in msg


@contextlib.contextmanager
def quiet_open_clip():
    """Silence open_clip's random-init notice (vlprompt prints its own banner where it matters)."""
    flt = _NoRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def list_architectures() -> list[str]:
    """open_clip model names usable as backbones (plus vlprompt's small test architectures)."""

    register_configs()
    return list(open_clip.list_models())


_OPENAI = re.compile(r"^(ViT-[A-Za-z]+)/(\d+)(?:@(\d+)px)?$", re.I)


def canonical_model_name(name: str | None) -> str | None:
    """open_clip's spelling of ``name``: ``ViT-B/16`` -> ``ViT-B-16``, ``ViT-L/14@336px`` ->
    ``ViT-L-14-336``, ``vit-b-16`` -> ``ViT-B-16``; anything unknown is returned unchanged."""
    if name is None:
        return None
    text = str(name).strip()
    m = _OPENAI.match(text)
    if m:
        text = f"{m.group(1)}-{m.group(2)}" + (f"-{m.group(3)}" if m.group(3) else "")
    known = _known_names()
    if text in known:
        return text
    folded = {n.lower(): n for n in known}
    return folded.get(text.lower(), text if m else str(name))


def _known_names() -> list[str]:
    return list_architectures()


def _is_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    try:  # a 2-second probe instead of huggingface_hub's long retry loop
        with socket.create_connection(("huggingface.co", 443), timeout=2):
            return False
    except OSError:
        return True


def _cached_pretrained_file(pcfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """Path of the already-downloaded weights for an open_clip pretrained config, if any."""
    if pcfg.get("file"):
        return pcfg["file"] if os.path.exists(pcfg["file"]) else None
    hub = pcfg.get("hf_hub", "")
    if hub:
        model_id, filename = os.path.split(hub)
        candidates = [filename] if filename else []
        candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for fn in candidates:
            try:
                return hf_hub_download(model_id, fn, cache_dir=cache_dir, local_files_only=True)
            except Exception:  # not cached (or any hub error): try the next name
                continue
    url = pcfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.exists(path):
            return path
    return None


# --------------------------------------------------------------------------------------- local files


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file into a flat state dict plus what we learned about its format."""
    info: dict[str, Any] = {"format": None, "openai": False, "config": None}
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            sd = load_file(str(path))
            info["format"] = "safetensors"
            if METADATA_KEY in meta:
                info["config"] = json.loads(meta[METADATA_KEY])
        elif (tf := torchfile.read(path)).torchscript:  # OpenAI's archives: tensors only, no code run
            sd = torchfile.torchscript_state_dict(tf, path)
            info.update(format="openai-torchscript", openai=True)
        else:
            obj = tf.obj
            info["format"] = "torch"
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                if isinstance(obj.get(METADATA_KEY), str):
                    info["config"] = json.loads(obj[METADATA_KEY])
                obj = obj["state_dict"]
                info["format"] = "open_clip-checkpoint"
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise VlpromptError(
                    f"{path} holds no CLIP state dict (found {type(obj).__name__}); "
                    "pass an OpenAI CLIP .pt, an open_clip checkpoint or a .safetensors file"
                )
            sd = dict(obj)
    except torchfile.TorchFileError as e:
        raise VlpromptError(
            f"cannot read weights from {path} ({e.reason[:160]}); "
            "the file is corrupt or not a CLIP checkpoint -- re-download or re-export it"
        ) from None
    except VlpromptError:
        raise
    except Exception as e:  # corrupt / truncated / not a checkpoint at all
        raise VlpromptError(
            f"cannot read weights from {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "the file is corrupt or not a CLIP checkpoint -- re-download or re-export it"
        ) from None
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k in sd for k in OPENAI_ARCHIVE_KEYS):
        info["openai"] = True
    elif info["format"] == "torch" and "visual.proj" in sd and sd["visual.proj"].dtype == torch.float16:
        info["openai"] = True  # OpenAI distributes fp16 state dicts in exactly this layout
    for k in [k for k in sd if k in OPENAI_ARCHIVE_KEYS or k.endswith("attn_mask")]:
        sd.pop(k)  # archive metadata and the (recomputed) causal-mask buffer are not weights
    if "text.token_embedding.weight" in sd:  # open_clip CustomTextCLIP layout -> standard CLIP layout
        sd = {(k[len("text.") :] if k.startswith("text.") else k): v for k, v in sd.items()}
    if "visual.proj" not in sd or "token_embedding.weight" not in sd:
        raise VlpromptError(
            f"{path} is not a ViT CLIP checkpoint (no visual.proj / token_embedding.weight); "
            "vlprompt supports ViT-based CLIP weights"
        )
    return sd, info


def infer_clip_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture of a ViT CLIP from its weights' shapes.

    Head counts and the other switches no shape records (``no_ln_pre`` ...) come from the open_clip
    config that fits the shapes exactly (see :func:`match_architecture`); only when none fits do we fall
    back to a generic config with 64-wide heads, as OpenAI's and most open_clip ViTs use.
    """
    found = match_architecture(sd)
    if found is not None:
        return found[1]
    return _generic_config(sd)


def _generic_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    vision_width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    mlp_ratio_v = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width
    mlp_ratio_t = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width
    return {
        "embed_dim": int(sd["text_projection"].shape[1]),
        "vision_cfg": {
            "image_size": int(patch * grid),
            "layers": vision_layers,
            "width": int(vision_width),
            "head_width": 64,
            "patch_size": int(patch),
            "mlp_ratio": mlp_ratio_v,
        },
        "text_cfg": {
            "context_length": int(sd["positional_embedding"].shape[0]),
            "vocab_size": int(sd["token_embedding.weight"].shape[0]),
            "width": int(text_width),
            "heads": max(1, int(text_width) // 64),
            "layers": text_layers,
            "mlp_ratio": mlp_ratio_t,
        },
    }


def _is_plain_vit_clip(cfg: dict[str, Any]) -> bool:
    """A config open_clip builds as its plain ``CLIP`` with a ViT image tower (what vlprompt prompts)."""
    v, t = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    return (
        isinstance(v.get("layers"), int)
        and "patch_size" in v
        and not v.get("timm_model_name")
        and not t.get("hf_model_name")
        and "multimodal_cfg" not in cfg
    )


def _key_dims(cfg: dict[str, Any]) -> tuple:
    """The sizes a config fixes that are cheap to read from a state dict (a pre-filter)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (
        int(cfg["embed_dim"]),
        int(v["width"]),
        int(v["layers"]),
        int(v["patch_size"]),
        int(size) // int(v["patch_size"]),
        int(t.get("width", 512)),
        int(t.get("layers", 12)),
        int(t.get("context_length", 77)),
        int(t.get("vocab_size", 49408)),
    )


def _sd_key_dims(sd: dict[str, Any]) -> tuple | None:
    try:
        patch = int(sd["visual.conv1.weight"].shape[-1])
        return (
            int(sd["text_projection"].shape[1]),
            int(sd["visual.conv1.weight"].shape[0]),
            len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
            patch,
            round((int(sd["visual.positional_embedding"].shape[0]) - 1) ** 0.5),
            int(sd["ln_final.weight"].shape[0]),
            len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            int(sd["positional_embedding"].shape[0]),
            int(sd["token_embedding.weight"].shape[0]),
        )
    except (KeyError, IndexError, AttributeError):
        return None


def config_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict open_clip's CLIP has under ``cfg`` (built on the meta device)."""

    with torch.device("meta"):
        model = CLIP(**{k: v for k, v in cfg.items() if k not in ("quick_gelu", "custom_text")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("attn_mask")}


@functools.cache
def shipped_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """:func:`config_shapes` of a registered open_clip config, computed once per process."""

    return config_shapes(open_clip.get_model_config(name))


def _preference(name: str) -> tuple:
    """Among configs with identical shapes: the plain name first (QuickGELU is decided separately)."""
    return ("quickgelu" in name, any(s in name for s in ("CLIPA", "worldwide")), len(name), name)


def match_architecture(sd: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(name, config)`` of the shipped open_clip ViT config whose state dict has exactly ``sd``'s shapes.

    Configs that differ only in what no shape shows (``-quickgelu``, a tokenizer) tie; the plainest name
    wins and the others are named in a debug line.  ``None`` when no config fits.
    """

    register_configs()
    dims = _sd_key_dims(sd)
    if dims is None:
        return None
    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("attn_mask")}
    fits = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg is None or not _is_plain_vit_clip(cfg) or _key_dims(cfg) != dims:
            continue
        try:
            if shipped_shapes(name) == shapes:
                fits.append(name)
        except Exception as e:  # a config this open_clip cannot build: not a candidate
            log.debug("skipping open_clip config %s (%s)", name, e)
    if not fits:
        return None
    fits.sort(key=_preference)
    if len(fits) > 1:
        log.debug("weights fit %s; using %s (pass --model to choose another)", ", ".join(fits), fits[0])
    cfg = {k: v for k, v in open_clip.get_model_config(fits[0]).items() if k != "quick_gelu"}
    return fits[0], cfg


def _build_from_config(cfg: dict[str, Any], quick_gelu: bool) -> torch.nn.Module:
    cfg = {k: v for k, v in cfg.items() if k != "quick_gelu"}
    return CLIP(**cfg, quick_gelu=quick_gelu)


def _model_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise unknown_name("model", name, list_architectures(), see="`vlprompt models`")
    return cfg


def _load_local(path: Path, name: str | None, quick_gelu: bool | None) -> tuple[torch.nn.Module, dict]:
    sd, info = _read_weights(path)
    recorded = info["config"]
    if name is not None:  # an explicit architecture wins; the weights must fit it
        cfg = dict(_model_config(name))
        qg = bool(cfg.get("quick_gelu", False)) or info["openai"] or bool((recorded or {}).get("quick_gelu"))
    elif recorded is not None:
        cfg = dict(recorded)
        qg = bool(cfg.get("quick_gelu", False))
    else:
        found = match_architecture(sd)
        cfg = found[1] if found is not None else _generic_config(sd)
        info["inferred"] = found[0] if found is not None else None
        qg = info["openai"]
    if quick_gelu is not None:
        qg = quick_gelu
    model = _build_from_config(cfg, qg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    arch = f"architecture '{name}'" if name else "the architecture inferred from the file"
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise VlpromptError(
            f"weights in {path} do not fit {arch} ({_first_mismatch(str(e))}); "
            "pass the matching open_clip model name with --model"
        ) from None
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VlpromptError(
            f"weights in {path} do not fit {arch} ({what}); pass the matching open_clip model name"
        )
    cfg = {**cfg, "quick_gelu": qg}
    meta = {"source": str(path), "format": info["format"], "config": cfg, "quick_gelu": qg}
    if info.get("inferred"):
        meta["architecture"] = info["inferred"]
    return model, meta


def _first_mismatch(message: str) -> str:
    """The first size mismatch of a ``load_state_dict`` error, whole: key, file shape, model shape."""

    m = re.search(
        r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
        r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)",
        message,
    )
    if m:
        return f"{m.group(1)} has shape ({m.group(2)}) in the file, ({m.group(3)}) in the model"
    line = next((ln.strip() for ln in message.splitlines() if ln.strip()), "shapes differ")
    return line if len(line) <= 160 else line[: line.rfind(" ", 0, 157)] + " ..."


# --------------------------------------------------------------------------------------- entry point


class _Default(str):
    """``load_backbone``'s default name: ViT-B-16, unless a weights file is given (then inferred)."""


DEFAULT_ARCHITECTURE_SENTINEL = _Default("ViT-B-16")


def load_backbone(
    name: str | None = DEFAULT_ARCHITECTURE_SENTINEL,
    pretrained: str | os.PathLike | None = None,
    *,
    quick_gelu: bool | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    init_seed: int = 0,
):
    """Load a frozen CLIP backbone (eval mode, ``requires_grad=False``) as a :class:`Backbone`.

    Args:
        name: open_clip architecture name (``ViT-B-16``, ``ViT-B-32-quickgelu``, ``vlp-tiny`` ...), or a
            path to a local checkpoint.  May be ``None`` when ``pretrained`` is a file (inferred).
        pretrained: ``None`` (random init; the shipped weights for a bundled name such as ``vlp-world``),
            an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``)
            or a path to a local checkpoint file.
        quick_gelu: override the activation choice (see module docstring).
        device: where to put the model (default CPU).
        init_seed: seed of the random init (``pretrained=None``), drawn without touching the global
            RNG, so a prompt trained on a random backbone is evaluated on the same random backbone.
    """

    register_configs()
    if name is DEFAULT_ARCHITECTURE_SENTINEL:  # not given: inferred from a weights file, else ViT-B-16
        is_file = pretrained is not None and Path(str(pretrained)).suffix in {
            ".pt",
            ".pth",
            ".bin",
            ".safetensors",
        }
        name = None if is_file else "ViT-B-16"
    if name is not None and not Path(str(name)).exists():  # ViT-B/16, ViT-L/14@336px: OpenAI spellings
        name = canonical_model_name(name)
    if name is not None and pretrained is None and (os.sep in str(name) or Path(str(name)).suffix):
        name, pretrained = None, name  # a path passed as the name
    bundled = find_bundled(name, pretrained)  # weights shipped in the package (vlp-world)
    if bundled is not None:
        model, meta = build_bundled(bundled)
        return Backbone(model, name=name, pretrained=BUNDLED_TAG, meta=meta).to(device or "cpu")
    path = Path(pretrained) if pretrained is not None else None
    looks_like_path = pretrained is not None and (
        os.sep in str(pretrained) or path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}
    )
    if looks_like_path and not path.exists():
        raise VlpromptError(f"weights file not found: {path}; check the path (or pass an open_clip tag)")
    if name is not None and open_clip.get_model_config(name) is None:
        raise unknown_name("model", name, list_architectures(), see="`vlprompt models`")

    world = find_world_checkpoint(path) if path is not None else None  # `vlprompt world pretrain`
    if world is not None:
        if name is not None and name != world.name:  # the file says what it is: another name would label it
            raise VlpromptError(
                f"{path} is a `vlprompt world pretrain` checkpoint of {world.name}; drop --model {name} "
                f"(or pass --model {world.name})"
            )
        model, meta = build_bundled(world)
        tag = None
    elif path is not None and path.exists():
        model, meta = _load_local(path, name, quick_gelu)
        tag = None
    elif pretrained is None:
        if name is None:
            raise VlpromptError("no backbone given: pass a model name (e.g. ViT-B-16) or a weights file")
        qg = bool(quick_gelu)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            with quiet_open_clip():
                model = open_clip.create_model(name, pretrained=None, force_quick_gelu=qg)
        cfg = {**_model_config(name)}
        cfg["quick_gelu"] = bool(cfg.get("quick_gelu", False)) or qg
        meta = {
            "source": "random-init",
            "format": None,
            "config": cfg,
            "quick_gelu": cfg["quick_gelu"],
            "init_seed": init_seed,
        }
        tag = None
    else:
        tag = str(pretrained)
        if name is None:
            raise VlpromptError(f"pretrained tag '{tag}' needs a model name (e.g. --model ViT-B-16)")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            choices = ", ".join(tags) if tags else "none (use a local weights file)"
            raise VlpromptError(f"unknown pretrained tag '{tag}' for {name}; available tags: {choices}")
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        qg = bool(pcfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
        local = _cached_pretrained_file(pcfg, cache_dir)
        if local is None and _is_offline():
            raise VlpromptError(
                f"pretrained weights {name}/{tag} are not in the local cache and there is no network; "
                f"download them elsewhere and pass the file: --weights PATH (OpenAI .pt, open_clip .bin/.pt "
                f"or .safetensors)"
            )
        try:
            model = open_clip.create_model(
                name, pretrained=local or tag, force_quick_gelu=qg, cache_dir=cache_dir
            )
        except Exception as e:
            raise VlpromptError(
                f"could not load pretrained weights {name}/{tag} ({type(e).__name__}: {str(e)[:120]}); "
                "pass a local file with --weights PATH"
            ) from None
        cfg = {**_model_config(name), "quick_gelu": qg}
        meta = {"source": local or f"{name}/{tag}", "format": "open_clip", "config": cfg, "quick_gelu": qg}
    return Backbone(model, name=name, pretrained=tag or (str(path) if path else None), meta=meta).to(
        device or "cpu"
    )


def meta_backbone(name: str):
    """The architecture ``name`` with no data (the meta device): shapes only, built in milliseconds.

    Used to validate method settings against a model (prompt depth vs layers, widths) before any
    weights are read; nothing can be computed with it.
    """

    register_configs()
    if open_clip.get_model_config(name) is None:
        raise unknown_name("model", name, list_architectures(), see="`vlprompt models`")
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
        return Backbone(
            model, name=name, pretrained=None, meta={"source": "meta", "config": _model_config(name)}
        )


_register_configs = register_configs  # the former private name (tests and older callers)
