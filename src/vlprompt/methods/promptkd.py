"""PromptKD: a small prompted student distilled from a large frozen prompted teacher, without labels.

Official code: github.com/zhengli97/PromptKD, ``trainers/promptkd.py`` (trainer ``PromptKD``),
``configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml`` (base-to-new) and
``..._cross_datasets.yaml``, run by ``scripts/promptkd/base2new_train.sh`` (``KD_WEIGHT 1000``,
``TEMPERATURE 1``, ``DATASET.NUM_SHOTS 0``).  What it computes:

* **teacher**: a CLIP ViT-L/14 with PromptSRC/IVLP prompts (4 + 4 tokens, depth 9 on both towers),
  trained beforehand with labels on the base classes and released by the authors; frozen, eval mode.
  Its text features of *all* classes (base and new) are the class features of both models ("pre-stored
  teacher text features"; the official code recomputes them every step under ``no_grad`` -- the same
  numbers, we compute them once per class set).
* **student**: CLIP ViT-B/16 with IVLP deep *image* prompts only (4 tokens appended at layers 0..8,
  N(0, 0.02^2)); the student runs no text tower.  Its image features (the tower's 512-d output) go
  through a learned projector into the teacher's width, ``Conv1x1(512->768) - BatchNorm - ReLU -
  Conv1x1(768->768)`` (official ``Feature_Trans_Module_two_layer``; ours: the same as Linear /
  BatchNorm1d, identical numbers), then are normalised: ``logits = scale_student * f @ t_teacher.T``.
* **loss** (no label is read): ``kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) summed /
  (B * C)``, ``z_t`` the teacher's logits on the same augmented images (its own logit scale).
* **images**: the training split of every class, unlabelled -- in base-to-new the *new* classes'
  training images too, which makes the setting **transductive** (PromptKD issue #27); never a test
  image.  Which images a transductive method may see is the protocol's rule
  (:func:`vlprompt.data.subsample.unlabelled_pool`).

Trainable: the image prompts and the projector (1,013,760 values at ViT-B/16 -> ViT-L/14); the
BatchNorm's running statistics are buffers saved with the prompt.  The teacher is never saved with the
student's prompt: the run layer loads it from ``options.teacher`` (a saved prompt, e.g. the official
release imported with ``vlprompt import``) and its file's sha256 is part of the run's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import deep_image_plan, normal_prompts, validate_depth
from vlprompt.methods.official import OfficialLayout, Signature, map_promptkd
from vlprompt.methods.output import ModelOutput

TRANSDUCTIVE = (
    "PromptKD distils on unlabelled training images of every class it is tested on "
    "(base-to-new: base and new classes; never test images)"
)


@dataclass
class PromptKDConfig(MethodConfig):
    n_ctx_image: int = opt(4, "learnable image tokens per layer", minimum=1)
    depth_image: int = opt(9, "image layers with their own prompts (1 = shallow)", minimum=1)
    teacher: str = opt(
        "",
        "the frozen teacher's saved prompt (run dir, prompt.safetensors, export or hf-hub: reference), "
        "e.g. the official ViT-L/14 teacher brought in with `vlprompt import`; '{dataset}', '{shots}' "
        "and '{seed}' in it are replaced by the run's (one teacher per data set or run in a grid)",
    )
    teacher_width: int = opt(
        768, "the teacher's feature width: the projector's output (ViT-L/14: 768)", minimum=1
    )
    temperature: float = opt(1.0, "distillation temperature T (official script: 1)", above=0)
    kd_weight: float = opt(
        1000.0,
        "weight of the KL term (official script: 1000; 200 for FGVCAircraft, Flowers102, DTD)",
        above=0,
    )


@register_method
class PromptKD(PromptMethod):
    name = "promptkd"
    display_name = "PromptKD (transductive)"
    paper_name = "PromptKD"
    official_parameters = 1_013_760
    # not timed by default: timing it needs its ViT-L/14 teacher, which the bench does not build
    bench_batch_size = None
    transductive_note = TRANSDUCTIVE
    Config = PromptKDConfig
    summary = "PromptKD: image prompts + projector distilled (KL) from a frozen ViT-L/14 teacher, unlabelled"
    needs = frozenset({"teacher_logits"})
    text_from_teacher = True
    official = OfficialLayout(
        "zhengli97/PromptKD",
        "VLPromptLearner",
        Signature(has=("image_encoder.VPT",), has_prefix=("VPT_image_trans.",)),
        map_promptkd,
        notes=(
            "the teacher is not in the student's checkpoint: import it separately and pass options.teacher",
        ),
    )

    def __init__(self, cfg: PromptKDConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        validate_depth(cfg.depth_image, backbone.image.layers, "image")
        self.image_prompts = normal_prompts(cfg.depth_image, cfg.n_ctx_image, backbone.image.width)
        d_in, d_out = int(backbone.embed_dim), int(cfg.teacher_width)
        # official: Conv1x1 -> BatchNorm2d -> ReLU -> Conv1x1 on (B, d, 1, 1); Linear/BatchNorm1d are the
        # same maps with the same default initialisation
        self.projector = nn.Sequential(
            nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(), nn.Linear(d_out, d_out)
        )

    @classmethod
    def teacher_source(cls, cfg: MethodConfig) -> str:
        return str(getattr(cfg, "teacher", "") or "")

    def check_teacher(self, teacher: Any) -> None:
        width = int(teacher.backbone.embed_dim)
        if width != self.cfg.teacher_width:
            raise VlpromptError(
                f"the teacher's features are {width} wide, options.teacher_width={self.cfg.teacher_width}; "
                f"set --set options.teacher_width={width}"
            )

    # --- towers: image prompts + projector; the class features are the teacher's --------------------
    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        pass  # no text tower of its own (text_from_teacher)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        raise VlpromptError("PromptKD's class features are its teacher's; it runs no text tower")

    def image_plan(self) -> TowerPlan | None:
        return deep_image_plan(self.image_prompts)

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features.float())

    # --- objective ------------------------------------------------------------------------------
    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self.cfg.temperature
        student, teacher = out.logits.float(), out.teacher_logits.float()
        kl = (
            F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="sum")
            * (t * t)
            / student.numel()
        )
        return self.cfg.kd_weight * kl, {"kd": kl}
