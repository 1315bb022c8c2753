"""DePT (Decoupled Prompt Tuning, Zhang et al., CVPR 2024): a plug-in over a prompt method.

Official code: github.com/Koorye/DePT, ``trainers/elp_coop.py`` (and ``elp_kgcoop.py``,
``elp_maple.py``, ``elp_cocoop.py``: the same head on the other bases), ``train.py`` (``extend_cfg``:
the recipe).  The base method keeps its prompts, its objective and its similarity logits; DePT adds a
*channel-wise transformation* (cwT, the official ``FiLM``: ``x * scale + bias``, scale 1 and bias 0 at
the start) on each tower's **unnormalised** features and a linear-probe head ``Linear(e, C_train)``
(PyTorch's default init) over the training classes, trained on the text features of each image's
label and the image features together:

    lp   = head(cat([cwT_text(t_y), cwT_img(f)]))          labels cat([y, y])
    loss = base objective with its CE replaced by (1 - w) CE(similarity logits) + w CE(lp), w = 0.7

(the base's other terms, e.g. KgCoOp's w_kg (1 - cos), are kept).  At evaluation on the training
classes the logits are ``(1 - w) similarity + w head(cwT_img(f))``; on other classes (new classes,
other data sets) the base's similarity logits alone.  "Training classes" generalises the official
rule (subsample "base", or a data set whose name contains "ImageNet"): when every evaluated class
is one of the training classes (ImageNet-V2/-Sketch/-A/-R after ImageNet), the head's rows of those
classes are used, as the official ``load_model`` clips them for ImageNet-A/-R; otherwise none.
The head and the cwT layers learn at ``head_lr_mult`` (6.5) x ``train.lr`` (the official
``STAGED_LR`` with ``LR_EXP`` 6.5 on ``NEW_LAYERS = ['linear_probe', 'film']``); the warm-up epoch
runs every group at the constant warm-up lr (Dassl's ``ConstantWarmupScheduler``).

Composition: ``--method coop+dept`` / ``cocoop+dept`` / ``kgcoop+dept`` / ``maple+dept`` (the
official combinations; others are refused).  Parameters keep the official names
(``film_lp_img.*``, ``film_lp_text.*``, ``linear_probe_proj.*``) beside the base's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import (
    MethodConfig,
    PlugIn,
    PromptMethod,
    compose,
    opt,
    register_method,
    register_plugin,
)
from vlprompt.methods.official import PL, Mapped, OfficialLayout, Signature
from vlprompt.methods.output import ModelOutput

HEAD = "linear_probe_proj"
#: the official names of DePT's own tensors (ours are the same)
OWN = ("film_lp_img.", "film_lp_text.", HEAD + ".")


@dataclass
class DePTConfig(MethodConfig):
    lp_weight: float = opt(
        0.7, "w: weight of the linear-probe head in the loss and the fused logits", minimum=0, maximum=1
    )
    fusion: bool = opt(
        True, "fuse (1 - w) similarity + w head logits on the training classes (else: head only)"
    )
    cwt: bool = opt(True, "channel-wise transformation (FiLM scale + bias) on both features before the head")
    head_lr_mult: float = opt(6.5, "lr of the head and cwT layers = head_lr_mult * train.lr", above=0)


class FiLM(nn.Module):
    """Channel-wise transformation ``x * scale + bias`` (identity at the start)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.unsqueeze(0).to(x.dtype) * x + self.bias.unsqueeze(0).to(x.dtype)


@register_plugin
class DePT(PlugIn):
    name = "dept"
    display_name = "DePT"
    Config = DePTConfig
    summary = "DePT: channel-wise transform + linear-probe head on the features, fused on base classes"
    supports = frozenset({"coop", "cocoop", "kgcoop", "maple"})
    # Koorye/DePT: trainers/elp_*.py register ExtrasLinearProbe<Base> (ExtrasLinearProbeCoOp ...)
    dassl_trainer_prefix = "ExtrasLinearProbe"
    raw_features = True
    trainable_note = "the head adds 4·e + C·(e + 1) for C training classes (ViT-B/16, C = 2: 3,074)"

    @classmethod
    def official_added(cls, embed_dim: int, n_classes: int) -> int:
        return 4 * embed_dim + n_classes * (embed_dim + 1)

    @classmethod
    def official_layout(cls, base: type[PromptMethod]) -> OfficialLayout | None:
        """DePT's trainers save the whole CustomCLIP (``PromptLearner`` / ``MultiModalPromptLearner``
        folder): the base's prompt learner under ``prompt_learner.``, the head beside it."""
        lay = base.official
        if lay is None:
            return None
        sig = lay.signature
        prefixed = all(k.startswith(PL) for k in sig.has)  # the base's own file is the whole model too

        def pre(keys: tuple[str, ...]) -> tuple[str, ...]:
            return keys if prefixed else tuple(PL + k for k in keys)

        signature = Signature(
            has=pre(sig.has) + (HEAD + ".weight",),
            has_prefix=pre(sig.has_prefix),
            lacks=pre(sig.lacks),
            lacks_prefix=pre(sig.lacks_prefix),
            checkpoint_lacks=sig.checkpoint_lacks,
            frozen_words=sig.frozen_words,
        )

        def convert(sd, method: str) -> Mapped:  # type: ignore[no-untyped-def]
            own = {k: v for k, v in sd.items() if k.startswith(OWN)}
            if HEAD + ".weight" not in own:
                raise ValueError(f"no {HEAD}.weight: not a DePT checkpoint")
            rest = sd if prefixed else {k[len(PL) :]: v for k, v in sd.items() if k.startswith(PL)}
            m = lay.convert(rest, method)
            for k, v in own.items():
                m.state[k] = v.detach().to(torch.float32).contiguous()
            m.sources = {k: (v if prefixed or k in own else PL + v) for k, v in m.sources.items()}
            m.sources.update({k: k for k in own})
            m.options["cwt"] = "film_lp_img.scale" in own
            return m

        return OfficialLayout(
            "Koorye/DePT",
            "MultiModalPromptLearner" if prefixed else "PromptLearner",
            signature,
            convert,
            notes=("the head's rows are the checkpoint's training classes: pass those class names",),
        )

    def __init__(self, cfg: DePTConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        e = backbone.embed_dim
        self._embed_dim = e
        self.film_lp_img = FiLM(e) if cfg.cwt else nn.Identity()
        self.film_lp_text = FiLM(e) if cfg.cwt else nn.Identity()
        # the head's rows are the training classes: built on the first prepare_text (their count)
        self.linear_probe_proj: nn.Linear | None = None
        self._head_classes: list[str] = []
        self._rows: torch.Tensor | None = None  # head rows of the current classes (None: no fusion)

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        super().prepare_text(backbone, classnames, template)
        if self.linear_probe_proj is None:
            self.linear_probe_proj = nn.Linear(self._embed_dim, len(classnames)).to(backbone.device)
            self._head_classes = list(classnames)
        index = {c: i for i, c in enumerate(self._head_classes)}
        if all(c in index for c in classnames):
            self._rows = torch.tensor([index[c] for c in classnames], dtype=torch.long)
        else:
            self._rows = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        w = state_dict.get(prefix + HEAD + ".weight")
        head = self.linear_probe_proj
        if w is not None and head is not None and w.shape != head.weight.shape:
            raise VlpromptError(
                f"the saved DePT head has {w.shape[0]} classes but this model was built on "
                f"{head.weight.shape[0]}; "
                "load the prompt with its training classes first (load_run does), then switch classes"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lr_multipliers(self) -> dict[str, float]:
        m = float(self.cfg.head_lr_mult)
        return {
            n: m
            for n, p in self.named_parameters()
            if p.requires_grad and n.split(".")[0] in (HEAD, "film_lp_img", "film_lp_text")
        }

    def head_logits(self, raw_image: torch.Tensor) -> torch.Tensor:
        """The head's logits over the training classes for unnormalised image features."""
        assert self.linear_probe_proj is not None
        return self.linear_probe_proj(self.film_lp_img(raw_image.float()))

    def output_head(
        self, logits: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        logits = super().output_head(logits, image_features, text_features)
        if self.training or self._rows is None:  # training: the objective uses the head itself
            return logits
        lp = self.head_logits(image_features)[:, self._rows.to(logits.device)]
        if not self.cfg.fusion:
            return lp
        w = self.cfg.lp_weight
        return (1 - w) * logits + w * lp

    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms = super().objective(out, labels)
        if "ce" not in terms:
            raise VlpromptError(
                f"DePT needs the base's cross-entropy term 'ce'; '{self.name}' gives {sorted(terms)}"
            )
        if self._rows is None or len(self._rows) != len(self._head_classes):
            raise VlpromptError("DePT trains its head on the classes it was built on; train on those classes")
        img, txt = out.raw_image_features, out.raw_text_features
        assert img is not None and txt is not None and self.linear_probe_proj is not None
        rows = self._rows.to(labels.device)
        if txt.dim() == 3:  # image-conditioned text (CoCoOp): each image's own label row
            t = txt[torch.arange(len(labels), device=labels.device), labels]
        else:
            t = txt[labels]
        feats = torch.cat([self.film_lp_text(t.float()), self.film_lp_img(img.float())])
        lp_logits = self.linear_probe_proj(feats)[:, rows]
        ce_lp = F.cross_entropy(lp_logits, torch.cat([labels, labels]))
        ce = terms["ce"]
        w = self.cfg.lp_weight
        total = (loss - ce) + (1 - w) * ce + w * ce_lp  # the base's other terms kept as they are
        return total, {**terms, "ce_lp": ce_lp}


# the official combinations, listed by `vlprompt methods` and covered by the method battery
for _base in ("coop", "cocoop", "kgcoop", "maple"):
    register_method(compose(f"{_base}+dept"))
