"""The backbone of a run: loaded from its config section, recorded portably (name / tag / file + sha256).

A shared prompt names its weights by file *name* and sha256, never by an absolute path; whoever
uses it passes their own copy (``--weights`` / ``backbone=``) and vlprompt checks the sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlprompt.backbones import load_backbone
from vlprompt.errors import VlpromptError
from vlprompt.run.identity import weights_sha256
from vlprompt.train.config import BackboneConfig

log = logging.getLogger(__name__)

UNTRAINED_BANNER = "untrained weights: pipeline check only, accuracy is chance"


WORLD_BANNER = (
    "this backbone was pretrained on vlprompt's generated world only (coloured, textured shapes): "
    "on other data its accuracy is near chance; use real CLIP weights (--weights / --pretrained)"
)


def world_mismatch(backbone: Any, dataset: str) -> bool:
    """True when a world-pretrained backbone (vlp-world) is used on data outside the world."""
    return bool((backbone.meta or {}).get("toy_world")) and not str(dataset).startswith("world-")


def is_untrained(backbone: Any) -> bool:
    """True for a random-init backbone (no pretrained tag, no weights file, no bundled weights)."""
    return (backbone.meta or {}).get("source") == "random-init"


def recorded_random_backbone(cfg: dict[str, Any], manifest: Any, env: Any) -> bool:
    """True when a run's files (config, manifest, env) say its backbone weights were randomly initialised:
    an explicit flag anywhere (``random_init`` as :func:`portable_section` records it), else a backbone
    section with neither a pretrained tag nor a weights file."""

    def flags(obj: Any) -> Iterable[bool]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("random_init", "random_weights", "untrained") and isinstance(v, bool):
                    yield v
                elif k == "source" and v == "random-init":
                    yield True
                else:
                    yield from flags(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from flags(v)

    explicit = [f for obj in (manifest, env) for f in flags(obj)]
    if explicit:
        return any(explicit)
    bb = cfg.get("backbone") or {}
    if isinstance(manifest, dict) and isinstance(manifest.get("backbone"), dict):
        bb = {**bb, **manifest["backbone"]}
    return not bb.get("pretrained") and not bb.get("weights")


def load_backbone_from(
    section: BackboneConfig | dict[str, Any], device: Any = None, *, banner: bool = True
) -> Any:
    """The frozen backbone a config section names (one-line errors for missing files)."""

    if isinstance(section, dict):
        section = BackboneConfig(**{k: section.get(k) for k in ("name", "pretrained", "weights")})
    if section.weights and not Path(section.weights).is_file():
        raise VlpromptError(
            f"backbone weights file not found: {section.weights}; pass --weights PATH to a local copy"
        )
    bb = load_backbone(section.name, pretrained=section.weights or section.pretrained, device=device)
    if banner and is_untrained(bb):
        log.warning(UNTRAINED_BANNER)
    return bb


def portable_section(cfg_backbone: BackboneConfig, backbone: Any) -> dict[str, Any]:
    """How a manifest names the backbone: architecture, tag, weights file name + sha256 (no paths)."""
    weights = cfg_backbone.weights
    source = (backbone.meta or {}).get("source")
    bundled = None
    if not weights and not cfg_backbone.pretrained and source and Path(str(source)).is_file():
        bundled = weights_sha256(str(source))  # weights shipped with a registered name (vlp-world)
    return {
        **({"bundled_weights_sha256": bundled} if bundled else {}),
        "name": cfg_backbone.name or backbone.name,
        "architecture": (backbone.meta or {}).get("config", {}).get("name") or backbone.name,
        "pretrained": cfg_backbone.pretrained,
        "weights_file": Path(weights).name if weights else None,
        "weights_sha256": weights_sha256(weights) if weights else None,
        "quick_gelu": bool((backbone.meta or {}).get("quick_gelu", False)),
        "random_init": is_untrained(backbone),
    }


def backbone_for_manifest(
    manifest: dict[str, Any], local: dict[str, Any], weights: str | None, device: Any
) -> Any:
    """Load the backbone a saved prompt needs: ``weights`` if given, else the recorded local path."""
    section = manifest.get("backbone") or {}
    want = section.get("weights_sha256")
    if weights is None and want:
        weights = (local.get("backbone") or {}).get("weights") if local else None
        if not weights or not Path(weights).is_file():
            raise VlpromptError(
                f"this prompt was trained with weights '{section.get('weights_file')}' "
                f"(sha256 {want[:12]}…), "
                "which are not at their recorded place; pass --weights PATH (backbone= in Python)"
            )
    if weights is not None:
        check_weights(weights, want, section.get("weights_file"))
        return load_backbone_from(
            {"name": section.get("name"), "pretrained": None, "weights": weights}, device=device, banner=False
        )
    return load_backbone_from(
        {"name": section.get("name"), "pretrained": section.get("pretrained"), "weights": None}, device=device
    )


def check_weights(path: str, want: str | None, name: str | None) -> None:
    """Warn clearly when ``path`` is not the weights file a prompt was trained with."""
    if not Path(path).is_file():
        raise VlpromptError(f"weights file not found: {path}; check the path")
    if want and weights_sha256(path) != want:
        log.warning(
            "warning: %s is not the weights file this prompt was trained with ('%s', sha256 %s…); "
            "its accuracy may not carry over",
            path,
            name,
            want[:12],
        )
