"""``inspect_prompts``: per-layer figures of what a model's prompts do on a few images.

Runs both towers once (no gradient) under :class:`vlprompt.engine.probe.TowerProbe` and compares the
prompted features with frozen CLIP's.  Per layer and tower (see the probe for the definitions):
prompt count, exact instance->prompt share ``lambda`` (all instance rows, and the pooled row), the
gate ``alpha`` where the layer has one, the carried-term ratio where prompts are blended (DPL's A2),
and prompt/instance norm ratio.  Every prompt token is counted, whatever the plan does with it
(:func:`prompt_counts`): ``inserted`` (appended at the layer, or the shallow prompts at layer 0),
``replaced`` (instance slots overwritten: CoOp-style text context at layer 0, deep text prompts
after), ``removed``, ``carried`` (prompts entering the block unchanged from earlier layers) and
``prompts`` (all prompt tokens the block sees), with the mean norm of the vectors set at the layer.

This is where docs/dpl.md's measured figures come from (``vlprompt inspect``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlprompt.engine import encode_image, encode_text
from vlprompt.engine.plan import ALL, TowerPlan
from vlprompt.engine.probe import TowerProbe
from vlprompt.methods.common import ClassPrompts
from vlprompt.methods.model import PromptModel


@torch.no_grad()
def inspect_prompts(model: PromptModel, images: torch.Tensor) -> dict[str, Any]:
    """Figures for ``model`` on ``images`` (a preprocessed ``(B, 3, H, W)`` batch).

    Returns ``{"method", "reconstructed", "note", "images", "image": {...}, "text": {...}}``; each tower
    holds ``layers`` (one dict per block) and ``cosine_to_frozen`` (mean cosine between prompted and
    frozen-CLIP features; 1.0 when the tower is not prompted).  Gates with ``alpha_init="auto"`` that
    have not been measured yet are measured on these images (as the first training batch would).
    """
    was = model.training
    model.eval()
    try:
        return _inspect(model, images.to(model.backbone.device))
    finally:
        model.train(was)


def _inspect(model: PromptModel, images: torch.Tensor) -> dict[str, Any]:
    bb, method = model.backbone, model.method
    visual, clip = bb.clip.visual, bb.clip
    out: dict[str, Any] = {
        "method": method.name,
        "reconstructed": bool(type(method).reconstruction_note),
        "note": type(method).reconstruction_note,
        "images": int(images.shape[0]),
        "classes": len(model.classnames),
    }
    plan = method.image_plan()
    frozen_img = F.normalize(encode_image(visual, images).float(), dim=-1)
    with TowerProbe(visual.transformer.resblocks, plan, pooled="first") as probe:
        img = F.normalize(encode_image(visual, images, probe.plan).float(), dim=-1)
    out["image"] = {
        "prompted": plan is not None,
        "cosine_to_frozen": float((img * frozen_img).sum(-1).mean()),
        "layers": _merge(probe.rows(), prompt_counts(plan, len(visual.transformer.resblocks))),
    }
    inputs = method.text_inputs(img if method.image_conditioned_text else None)
    ref = _frozen_text(model)
    with TowerProbe(clip.transformer.resblocks, inputs.plan, pooled="eot") as probe:
        txt = F.normalize(encode_text(clip, inputs.embeds, inputs.eot, probe.plan).float(), dim=-1)
    if method.image_conditioned_text:  # (B*C, e) image-major -> compare each image's C rows
        txt = txt.view(images.shape[0], -1, txt.shape[-1])
        cos = float((txt * ref.unsqueeze(0)).sum(-1).mean())
    else:
        cos = float((txt * ref).sum(-1).mean())
    counts = prompt_counts(inputs.plan, len(clip.transformer.resblocks), *_input_slots(method))
    out["text"] = {"cosine_to_frozen": cos, "layers": _merge(probe.rows(), counts)}
    return out


def _merge(rows: list[dict[str, Any]], counts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, **c} for r, c in zip(rows, counts)]


def _input_slots(method: torch.nn.Module) -> tuple[int, float | None]:
    """Learned context slots in the text tower's input (CoOp-style) and their mean vector norm."""
    for m in method.modules():
        if isinstance(m, ClassPrompts) and m.slots.shape[1] > 0:
            ctx = getattr(method, "ctx", None)
            norm = float(ctx.detach().float().norm(dim=-1).mean()) if isinstance(ctx, torch.Tensor) else None
            return int(m.slots.shape[1]), norm
    return 0, None


def _norm(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().float().norm(dim=-1).mean())


def prompt_counts(
    plan: TowerPlan | None, n_layers: int, input_slots: int = 0, input_norm: float | None = None
) -> list[dict[str, Any]]:
    """Per layer: prompt tokens ``inserted``, ``replaced``, ``removed``, ``carried`` and in all
    (``prompts``), plus ``new_norm`` (mean norm of the vectors set at that layer), read from the plan.

    ``input_slots``: learned context slots already in the tower's input (CoOp-style text context),
    counted as replaced at layer 0.  Slot prompts not overwritten at a later layer are carried.
    """
    rows = []
    tail = 0  # appended prompt tokens alive
    slots = 0  # instance slots holding a prompt
    for layer in range(n_layers):
        op = plan.ops(layer) if plan is not None else None
        inserted = replaced = removed = 0
        new = []
        if layer == 0 and plan is not None and plan.shallow is not None:
            inserted += plan.shallow.shape[-2]
            new.append(_norm(plan.shallow))
        if layer == 0 and input_slots:
            replaced += input_slots
            new.append(input_norm)
        if op is not None:
            removed = tail if op.remove == ALL else min(op.remove, tail)
            if op.append is not None:
                inserted += op.append.shape[-2]
                new.append(_norm(op.append))
            if op.replace is not None:
                replaced += op.replace.shape[-2]
                new.append(_norm(op.replace))
        carried = (tail - removed) + max(0, slots - replaced)
        tail = tail - removed + inserted
        slots = max(slots, replaced)
        norms = [n for n in new if n is not None]
        rows.append(
            {
                "inserted": inserted,
                "replaced": replaced,
                "removed": removed,
                "carried": carried,
                "prompts": tail + slots,
                "new_norm": sum(norms) / len(norms) if norms else None,
            }
        )
    return rows


def prompt_figure(report: dict[str, Any], path: str | Path) -> Path:
    """Per-layer prompt counts (stacked: carried, inserted, replaced; removed below zero) and norms
    of both towers, as one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    fig.subplots_adjust(wspace=0.45, hspace=0.25)
    for col, tower in enumerate(("image", "text")):
        rows = report[tower]["layers"]
        x = list(range(len(rows)))
        ax = axes[0][col]
        bottom = [0] * len(rows)
        for key, color in (("carried", "#9e9e9e"), ("inserted", "C0"), ("replaced", "C2")):
            vals = [r[key] for r in rows]
            ax.bar(x, vals, bottom=bottom, color=color, label=key)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.bar(x, [-r["removed"] for r in rows], color="C3", label="removed")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{tower} tower: prompt tokens per layer", fontsize=10)
        ax.set_ylabel("tokens")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[1][col]
        new = [(i, r["new_norm"]) for i, r in enumerate(rows) if r.get("new_norm") is not None]
        ratio = [
            (i, r["prompt_norm_ratio"]) for i, r in enumerate(rows) if r.get("prompt_norm_ratio") is not None
        ]
        handles = []
        if new:
            handles += ax.plot(
                *zip(*new), marker="o", color="C0", label="norm of the prompt vectors set here"
            )
        if ratio:
            ax2 = ax.twinx()
            handles += ax2.plot(
                *zip(*ratio),
                marker="s",
                color="C1",
                label="appended prompts / instance tokens (residual norm)",
            )
            ax2.set_ylabel("norm ratio", color="C1")
        ax.set_ylabel("L2 norm", color="C0")
        ax.set_xlabel("layer")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if handles:  # below the axes: never over the lines
            ax.legend(
                handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False
            )
        else:
            ax.text(0.5, 0.5, "no prompts", ha="center", va="center", transform=ax.transAxes)
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    title = (
        f"{report['method']}: prompts per layer ({report['images']} image(s), {report['classes']} classes)"
    )
    if report.get("reconstructed"):
        title += f"\n{report['note']}"
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _frozen_text(model: PromptModel) -> torch.Tensor:
    """Zero-shot CLIP text features of the model's classes under its template, normalised (C, e)."""
    bb = model.backbone
    prompts = ClassPrompts(bb, model.classnames, [("text", model.template)]).to(bb.device)
    return F.normalize(encode_text(bb.clip, prompts.embeds, prompts.eot).float(), dim=-1)
