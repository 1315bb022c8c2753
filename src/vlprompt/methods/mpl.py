"""MPL -- Modular Prompt Learning: add / remove / carry image prompts layer by layer.

Deep prompting usually *replaces* every prompt at each layer and so throws away what the prompt
outputs gathered.  MPL keeps a prompt context in the image tower and, before each block
``l = 1..depth-1``, **removes** the last ``remove`` prompt outputs, **adds** ``p = add * n_ctx`` new
prompts and **carries** the rest.  The new prompts are MaPLe-style projections of the text side:

* text: ``[SOS] ctx "a photo of a {class}." [EOT]`` -- ``n_ctx`` learnable slots (initialised from
  the word "X") replaced by fresh deep prompts ``T_l`` (N(0, 0.02^2)) at layers ``1..depth-1``;
* image, layer 0: a shallow prompt ``W0(ctx)`` (Linear d_txt -> d_img) appended after the
  positional embedding, before ``ln_pre``;
* image, layer ``l >= 1``: remove ``r``, then append ``F_{1,l}(T_l); ...; F_{add,l}(T_l)`` (one Linear
  d_txt -> d_img per added token and layer, all started from identical weights with ``tie_init``,
  as the official code's ``_get_clones`` does).

``remove="all"`` is VPT-deep-like replacement; ``depth=1`` carries the shallow prompt through every
layer (VPT-shallow-like).  Every setting is checked up front against the towers' depths; removing
more prompts than are present is refused (the official code drops image patches then; docs/mpl.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import ALL, LayerOps, TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts, init_ctx, linear_stack, normal_prompts
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_mpl


@dataclass
class MPLConfig(MethodConfig):
    n_ctx: int = opt(1, "learnable text context tokens (also the tokens each projection produces)", minimum=1)
    add: int = opt(
        2, "projections per layer: p = add * n_ctx image prompts appended at layers 1..depth-1", minimum=0
    )
    remove: int | str = opt(
        1,
        "prompt tokens removed from the tail before appending; 'all' (or -1) = every one; never more than "
        "are present (the official code would drop image patches then; refused, see docs/mpl.md)",
    )
    depth: int = opt(9, "layers 0..depth-1 get prompts (both towers)")
    tie_init: bool = opt(True, "all add*(depth-1) projections start as copies of one Linear (official quirk)")
    ctx_init: str = opt("X", "a one-token word repeated n_ctx times, an n_ctx-token phrase, or '' (random)")
    text: str = opt("a photo of a {}.", "frozen text after the context; '' = the data set's template")


def parse_remove(value: int | str) -> int:
    """``remove`` as an int, with ``"all"`` / ``-1`` mapped to the engine's :data:`ALL`."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "all":
            return ALL
        try:
            value = int(v)
        except ValueError:
            raise VlpromptError(f"MPL remove='{value}' is not a number; use a count >= 0 or 'all'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < ALL:
        raise VlpromptError(f"MPL remove={value!r} is invalid; use a count >= 0 or 'all' (-1)")
    return value


def image_prompt_counts(n_ctx: int, add: int, remove: int, depth: int, layers: int) -> list[int]:
    """Prompt tokens entering each image block (after that layer's ops), validated.

    ``n_0 = n_ctx`` (the shallow prompt); for ``l = 1..depth-1``: ``n_l = n_{l-1} - r + add * n_ctx``
    (``r = n_{l-1}`` for ``ALL``); later layers carry ``n_{depth-1}``.  With a fixed ``r`` this is
    ``n_ctx - r + (l-1)(p - r) + p``.
    """
    p = add * n_ctx
    counts = [n_ctx]
    for layer in range(1, layers):
        present = counts[-1]
        if layer < depth:
            r = present if remove == ALL else remove
            if r > present:  # the official code slices the sequence here and drops image patches
                raise VlpromptError(
                    f"MPL remove={remove} exceeds the {present} image prompt tokens present before layer "
                    f"{layer} (n_ctx={n_ctx}, add={add}); use remove <= {present} or remove='all' (the "
                    f"official code would silently drop the last {r - present} image patch token(s) "
                    "instead; vlprompt refuses, see docs/mpl.md)"
                )
            present = present - r + p
        counts.append(present)
    return counts


@register_method
class MPL(PromptMethod):
    name = "mpl"
    display_name = "MPL"
    bench_batch_size = 4
    #: the official trainers/mpl.py, configs/trainers/MPL/vit_b4_c1_add2_rm1.yaml on ViT-B/16: ctx 512,
    #: proj 393,984, compound_prompts_text 8 x 512, txt2img_proj 2 x 8 x 393,984 (docs/mpl.md)
    official_parameters = 6_702_336
    dassl_trainers = ("MPL",)  # Zhenhan-Huang/Modular-Prompt-Learning registers class MPL
    dassl_keys = {
        "N_CTX": "n_ctx",
        "CTX_INIT": "ctx_init",
        "PROMPT_DEPTH": "depth",
        "N_ADD_OP": "add",
        "N_RM_OP": "remove",
    }
    official = OfficialLayout(
        "Zhenhan-Huang/Modular-Prompt-Learning",
        "MultiModalPromptLearner",
        Signature(has=(PL + "ctx",), has_prefix=(PL + "txt2img_proj.",)),
        map_mpl,
    )
    Config = MPLConfig
    summary = "Modular Prompt Learning: add / remove / carry text-projected image prompts per layer"

    def __init__(self, cfg: MPLConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        n_ctx, add, depth = cfg.n_ctx, cfg.add, cfg.depth
        max_depth = min(backbone.text.layers, backbone.image.layers)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= max_depth:
            raise VlpromptError(
                f"MPL depth={depth!r} is outside [1, {max_depth}] (text tower {backbone.text.layers} layers, "
                f"image tower {backbone.image.layers}); use 1 <= depth <= {max_depth}"
            )
        self.remove = parse_remove(cfg.remove)
        self.prompt_counts = image_prompt_counts(n_ctx, add, self.remove, depth, backbone.image.layers)

        d_txt, d_img = backbone.text.width, backbone.image.width
        self.ctx = nn.Parameter(self._init_ctx(backbone, cfg.ctx_init, n_ctx, d_txt))
        self.proj0 = nn.Linear(d_txt, d_img)  # W0: shallow image prompt from the text context
        # deep text prompts T_1..T_{depth-1}; text_deep[l-1] is T_l
        self.text_deep = nn.ParameterList([normal_prompts(n_ctx, d_txt) for _ in range(depth - 1)])
        # F_{k,l} = proj[k * (depth-1) + (l-1)]: one list of depth-1 projections per added token k
        n_proj = add * (depth - 1)
        self.proj = linear_stack(n_proj, d_txt, d_img, tie_init=cfg.tie_init) if n_proj else nn.ModuleList()
        self._slot = 1

    @staticmethod
    def _init_ctx(backbone: Backbone, words: str, n_ctx: int, width: int) -> torch.Tensor:
        words = words.strip()
        if words and len(backbone.encode_words(words)) == 1:
            return init_ctx(backbone, 1, words, width).repeat(n_ctx, 1)  # "X" -> X X ... X
        return init_ctx(backbone, n_ctx, words, width)

    def projection(self, k: int, layer: int) -> nn.Linear:
        """``F_{k,l}``: the projection making added token ``k`` (0-based) at image layer ``layer`` (>= 1)."""
        return self.proj[k * (self.cfg.depth - 1) + layer - 1]

    # --- text tower ---------------------------------------------------------------------------
    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        text = self.cfg.text or template
        self.prompts = ClassPrompts(backbone, classnames, [("ctx", self.cfg.n_ctx), ("text", text)])
        self._slot = int(self.prompts.slots[0, 0])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        layers = {
            layer: LayerOps(replace=self.text_deep[layer - 1], replace_at=self._slot)
            for layer in range(1, self.cfg.depth)
        }
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot, TowerPlan(layers=layers))

    # --- image tower --------------------------------------------------------------------------
    def image_plan(self) -> TowerPlan:
        layers = {}
        for layer in range(1, self.cfg.depth):
            t = self.text_deep[layer - 1]
            new = (
                torch.cat([self.projection(k, layer)(t) for k in range(self.cfg.add)])
                if self.cfg.add
                else None
            )
            if new is not None or self.remove != 0:
                layers[layer] = LayerOps(remove=self.remove, append=new)
        return TowerPlan(shallow=self.proj0(self.ctx), layers=layers)

    def token_trace(self) -> list[dict[str, object]]:
        """Per image layer: the op, prompt tokens before/after it, and which prompts are alive.

        Token names: ``v0`` is the shallow prompt, ``a3`` the first projection's token added at
        layer 3, ``b3`` the second, ...; with ``n_ctx > 1`` each gets a ``.j`` suffix.
        """
        n_ctx, add, depth = self.cfg.n_ctx, self.cfg.add, self.cfg.depth

        def names(stem: str) -> list[str]:
            return [stem] if n_ctx == 1 else [f"{stem}.{j}" for j in range(n_ctx)]

        alive = names("v0")
        rows: list[dict[str, object]] = [
            {"layer": 0, "op": "shallow", "before": 0, "after": len(alive), "alive": list(alive)}
        ]
        for layer in range(1, len(self.prompt_counts)):
            before = len(alive)
            if layer < depth:
                r = before if self.remove == ALL else self.remove
                alive = alive[: before - r]
                for k in range(add):
                    alive += names(f"{_letter(k)}{layer}")
                op = f"remove {'all' if self.remove == ALL else r}, add {add * n_ctx}"
            else:
                op = "carry"
            rows.append(
                {"layer": layer, "op": op, "before": before, "after": len(alive), "alive": list(alive)}
            )
        return rows

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out["image_prompt_counts"] = list(self.prompt_counts)
        return out


def _letter(k: int) -> str:
    return chr(ord("a") + k) if k < 26 else f"t{k}_"
