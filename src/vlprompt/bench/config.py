"""What ``vlprompt bench`` measures: the settings (:class:`BenchConfig`), the variants' execution
options and the targets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "reference": {"truncate_text": False, "cache_text": False, "attention": "plain", "share_prefix": False},
    "fast": {"truncate_text": True, "cache_text": True, "attention": "auto", "share_prefix": True},
    "fast+features": {"truncate_text": True, "cache_text": True, "attention": "auto", "share_prefix": True},
}


TARGETS = {"mpl_train": 2.0, "maple_train": 2.0, "coop_train_features": 10.0, "eval": 1.3, "image_peak": 0.75}


@dataclass
class BenchConfig:
    """What ``vlprompt bench`` measures; the defaults fit ``make bench`` (< 15 min on 2 CPU cores)."""

    model: str = "ViT-B-16"
    methods: list[str] = field(default_factory=lambda: ["coop", "maple", "mpl"])
    classes: list[int] = field(default_factory=lambda: [100])
    repeats: int = 2
    warmup: int = 1
    reference: bool = True  # also time the reference computation (speed-ups need it)
    variants_fast_plain: bool = False  # also time "fast" (no feature cache) for cacheable methods
    eval_methods: list[str] = field(default_factory=lambda: ["zeroshot", "mpl"])
    eval_images: int = 16
    eval_batch: int = 8
    eval_warmup: int = 0  # kernels are warm from the training steps; an evaluation is long
    text_prompts: int = 32
    text_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 77])
    image_batch: int = 8
    memory_methods: list[str] = field(default_factory=lambda: ["mpl"])
    memory_classes: int = 1000
    profile: bool = True  # profile configurations that miss a target
    device: str = "auto"
    compile: bool = False
    threads: int | None = None
    out: str | None = None
    quick: bool = False

    @classmethod
    def quick_config(cls, **over: Any) -> BenchConfig:
        """Tiny settings (vlp-tiny, 10 classes, 1 repeat): a smoke test that finishes in seconds."""
        base = dict(
            model="vlp-tiny",
            methods=["coop", "mpl"],
            classes=[10],
            repeats=1,
            warmup=1,
            eval_methods=["zeroshot", "mpl"],
            eval_images=4,
            eval_batch=2,
            eval_warmup=1,
            text_prompts=8,
            text_lengths=[8, 77],
            image_batch=2,
            memory_methods=["mpl"],
            memory_classes=20,
            profile=False,
            quick=True,
        )
        base.update(over)
        return cls(**base)
