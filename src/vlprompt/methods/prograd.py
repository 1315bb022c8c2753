"""ProGrad: CoOp whose cross-entropy gradient is projected so it never opposes zero-shot CLIP's.

Official code: github.com/BeierZhu/Prompt-align, ``ProGrad.public/trainers/prograd.py`` and
``prograd_backward_and_update`` in its Dassl fork (``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``;
KgCoOp's repository carries identical copies).  Per step, with ``p_zs = softmax(zero-shot logits / T)``:

* ``ce = CE(logits, y)`` and ``kl = T^2 * mean_b sum_c -p_zs log softmax(logits / T)`` (the official
  "kl_loss": a cross-entropy to the zero-shot distribution, equal to KL up to a constant);
* ``g_kl = grad(kl)``, ``g_ce = grad(ce)`` per parameter tensor; where ``cos(g_ce, g_kl) < 0`` the
  update uses ``g_ce - lambda * (g_ce . g_kl_hat) g_kl_hat`` (with lambda = 1 its dot product with
  ``g_kl`` is 0), else ``g_ce``.  Only ``ce`` is minimised; ``kl`` only steers.

Prompt: ``n_ctx`` = 16 slots whose last ``w`` start from the words of the data set's hand-crafted
prompt before the class name (ProGrad's ``CUSTOM_TEMPLATES``, ``w`` = their word count), the first
``16 - w`` from zeros; the template's remaining tokens stay frozen text.  Ours where the code is
silent: a zero gradient (either one) is left unprojected (the official division would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import Backprop, MethodConfig, PromptMethod, opt, register_method
from vlprompt.methods.common import ClassPrompts, HandCraftedContext, words_ctx
from vlprompt.methods.official import OfficialLayout, Signature, map_prograd
from vlprompt.methods.output import ModelOutput

#: ProGrad's CUSTOM_TEMPLATES where they differ from the data set's CoOp template (keyed by the latter)
PROGRAD_TEMPLATES = {
    "a photo of a {}, a type of pet.": "a type of pet, a photo of a {}.",
    "a photo of a {}, a type of flower.": "a type of flower, a photo of a {}.",
    "a photo of a {}, a type of aircraft.": "a type of aircraft, a photo of a {}.",
    "{} texture.": "a texture of {}.",
    "a photo of {}, a type of food.": "a type of food, a photo of {}.",
}


@dataclass
class ProGradConfig(MethodConfig):
    n_ctx: int = opt(16, "number of learnable context vectors", minimum=1)
    ctx_init: str = opt(
        "template",
        "'template': the hand-crafted prompt's words before the class name (official CTX_INIT=True); "
        "a phrase; or '' for N(0, 0.02^2)",
    )
    lam: float = opt(1.0, "lambda: how much of the conflicting component is removed (official LOSS.LAMBDA)")
    temperature: float = opt(1.0, "T of the distillation to zero-shot CLIP (official LOSS.T)", above=0)
    frozen_template: str = opt(
        "", "hand-crafted prompt of zero-shot CLIP; '' = ProGrad's template for the data set"
    )


@register_method
class ProGrad(HandCraftedContext, PromptMethod):
    name = "prograd"
    display_name = "ProGrad"
    official_parameters = 8_192
    dassl_trainers = ("ProGrad",)
    dassl_keys = {"N_CTX": "n_ctx", "CTX_INIT": "ctx_init", "LOSS.LAMBDA": "lam", "LOSS.T": "temperature"}
    official = OfficialLayout(
        "BeierZhu/Prompt-align",
        "prompt_learner",
        Signature(
            has=("ctx",), lacks=("meta_net.linear1.weight", "bias_vectors"), checkpoint_lacks=("val_result",)
        ),
        map_prograd,
    )
    Config = ProGradConfig
    summary = "ProGrad: CoOp with its CE gradient projected to agree with zero-shot CLIP's KL gradient"
    needs = frozenset({"zero_shot_logits"})
    official_templates = PROGRAD_TEMPLATES

    def __init__(self, cfg: ProGradConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        # the context depends on the data set's template when ctx_init='template': built on the
        # first prepare_text (PromptModel calls it at construction, before any optimizer exists)
        self.ctx: nn.Parameter | None = None

    def _phrase(self, template: str) -> str:
        if self.cfg.ctx_init != "template":
            return self.cfg.ctx_init
        t = self.frozen_templates(template)[0]
        if not t.endswith(" {}."):
            raise VlpromptError(
                f"ctx_init='template' needs a hand-crafted prompt ending in ' {{}}.', got '{t}'; "
                "set options.ctx_init to a phrase"
            )
        return t[: -len(" {}.")]

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        ctx, segments = words_ctx(backbone, self.cfg.n_ctx, self._phrase(template))
        if self.ctx is None:
            self.ctx = nn.Parameter(ctx)
        self.prompts = ClassPrompts(backbone, classnames, segments)

    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = out.logits.float()
        t = self.cfg.temperature
        ce = F.cross_entropy(logits, labels)
        p_zs = F.softmax(out.zero_shot_logits.float() / t, dim=-1)
        kl = (-p_zs * F.log_softmax(logits / t, dim=-1) * t * t).sum(1).mean()
        return ce, {"ce": ce, "kl": kl}

    def backward(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        params: list[nn.Parameter],
        backprop: Backprop,
    ) -> None:
        backprop(terms["kl"], retain_graph=True)
        kl_grads = [None if p.grad is None else p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        backprop(terms["ce"])
        project_gradients(params, kl_grads, self.cfg.lam)


def project_gradients(params: list[nn.Parameter], guide: list[torch.Tensor | None], lam: float) -> None:
    """ProGrad's projection, per parameter tensor: where ``p.grad`` points against ``guide``, remove
    ``lam`` times its component along ``guide`` (in place on ``p.grad``)."""
    for p, b in zip(params, guide, strict=True):
        a = p.grad
        if a is None or b is None:
            continue
        b_norm, a_norm = torch.linalg.norm(b), torch.linalg.norm(a)
        if b_norm == 0 or a_norm == 0:
            continue
        b_hat = b / b_norm
        if torch.dot((a / a_norm).flatten(), b_hat.flatten()) < 0:
            p.grad = a - lam * torch.dot(a.flatten(), b_hat.flatten()) * b_hat
