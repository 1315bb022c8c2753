"""The prompted text tower against an independent, hand-written loop over open_clip's own blocks.

The reference below shares no code with ``vlprompt.engine``: it applies the prompt ops itself, builds
the attention mask element by element from the rule written out in words, and runs each layer
through open_clip's ``ResidualAttentionBlock.forward`` (whose attention is torch's
``nn.MultiheadAttention`` with our additive mask).  The rule, for ``[instances; prompts]``:

- an instance (text) token at position i reads instance tokens j <= i (causal) and every prompt;
- a prompt token reads every prompt and the instance tokens j <= EOT of *its own* sequence -- the
  end-of-text token included (it is the token CLIP pools), padding after it never;
- deep "replace" prompts overwrite instance slots before a block (no positional embedding), deep
  "append" prompts replace (``remove``) or extend the prompt tail.

Checked for appended (shallow), deep appended (remove/append/extend/drop), replaced (deep slots) and
mixed plans, shared and per-sequence prompts, with and without truncation after the longest EOT,
and with the shared-prefix fast path; plus direct probes that the prompts see each EOT and nothing
past it.
"""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.engine import ALL, LayerOps, TowerPlan, encode_text

TEXTS = ["a photo of a dog.", "X X X a photo of a very long and complicated thing, a type of pet.", "hi"]
TOL = 1e-5


@pytest.fixture(scope="module", params=["vlp-tiny", "ViT-B-16"])
def bb(request):
    torch.manual_seed(0)
    return vlprompt.load_backbone(request.param)


def allowed(n_inst: int, n_prompt: int, eot: int) -> torch.Tensor:
    """``(L, L)`` bool: may query i read key j (the rule in the module docstring), element by element."""
    length = n_inst + n_prompt
    m = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            if i < n_inst and j < n_inst:
                m[i, j] = j <= i
            elif i < n_inst:  # instance -> prompt
                m[i, j] = True
            elif j < n_inst:  # prompt -> instance: up to and including this sequence's EOT
                m[i, j] = j <= eot
            else:  # prompt -> prompt
                m[i, j] = True
    return m


def _per_seq(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(n, -1, -1) if t.dim() == 2 else t


def reference_text(clip, embeds: torch.Tensor, eot: torch.Tensor, plan: TowerPlan | None) -> torch.Tensor:
    """Hand-written prompted text tower over the full context (no truncation), one layer at a time."""
    n, n_inst, _ = embeds.shape
    x = embeds + clip.positional_embedding[:n_inst]
    if plan is not None and plan.shallow is not None:
        x = torch.cat([x, _per_seq(plan.shallow, n)], dim=1)
    heads = clip.transformer.resblocks[0].attn.num_heads
    batch_first = getattr(clip.transformer, "batch_first", True)
    for layer, block in enumerate(clip.transformer.resblocks):
        op = plan.layers.get(layer) if plan is not None else None
        if op is not None:
            x = x.clone()
            if op.replace is not None:
                rep = _per_seq(op.replace, n)
                x[:, op.replace_at : op.replace_at + rep.shape[1]] = rep
            if op.remove:
                keep = n_inst if op.remove == ALL else x.shape[1] - op.remove
                x = x[:, :keep]
            if op.append is not None:
                x = torch.cat([x, _per_seq(op.append, n)], dim=1)
        n_prompt = x.shape[1] - n_inst
        ok = torch.stack([allowed(n_inst, n_prompt, int(e)) for e in eot])  # (N, L, L)
        mask = torch.zeros(ok.shape).masked_fill(~ok, float("-inf"))
        mask = mask.repeat_interleave(heads, dim=0)  # nn.MultiheadAttention: (N * heads, L, L)
        if batch_first:
            x = block(x, attn_mask=mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    pooled = clip.ln_final(x[torch.arange(n), eot])
    tp = clip.text_projection
    return tp(pooled) if isinstance(tp, torch.nn.Linear) else pooled @ tp


def _inputs(bb, n_ctx: int = 2):
    """Token embeddings with ``n_ctx`` random context vectors after SOS (CoOp-style), and EOT positions."""
    toks = bb.tokenize(TEXTS)
    eot = toks.argmax(-1)
    emb = bb.clip.token_embedding(toks).detach().clone()
    g = torch.Generator().manual_seed(1)
    emb[:, 1 : 1 + n_ctx] = torch.randn(n_ctx, emb.shape[-1], generator=g)
    return emb, eot


def _plans(d: int, n: int) -> dict[str, TowerPlan]:
    g = torch.Generator().manual_seed(2)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "appended": TowerPlan(shallow=r(3, d)),
        "appended_per_sequence": TowerPlan(shallow=r(n, 2, d)),
        "appended_deep": TowerPlan(
            shallow=r(2, d),
            layers={
                1: LayerOps(remove=ALL, append=r(2, d)),  # replaced by new deep prompts
                2: LayerOps(append=r(n, 1, d)),  # extended (per sequence)
                3: LayerOps(remove=ALL),  # dropped: instances only from here
            },
        ),
        "replaced": TowerPlan(
            layers={1: LayerOps(replace=r(2, d), replace_at=1), 2: LayerOps(replace=r(2, d), replace_at=1)}
        ),
        "replaced_per_sequence": TowerPlan(layers={1: LayerOps(replace=r(n, 2, d), replace_at=1)}),
        "replaced_and_appended": TowerPlan(
            shallow=r(2, d),
            layers={
                1: LayerOps(replace=r(2, d), replace_at=1, remove=ALL, append=r(2, d)),
                2: LayerOps(replace=r(2, d), replace_at=1),
            },
        ),
    }


PLAN_NAMES = list(_plans(4, 3))


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_engine_matches_hand_written_loop(bb, name) -> None:
    clip = bb.clip
    emb, eot = _inputs(bb)
    plan = _plans(bb.text.width, len(TEXTS))[name]
    depth = len(clip.transformer.resblocks)
    plan.layers = {k: v for k, v in plan.layers.items() if k < depth}
    with torch.no_grad():
        ref = reference_text(clip, emb, eot, plan)
        for truncate in (True, False):
            out = encode_text(clip, emb, eot, plan, truncate=truncate)
            err = (out - ref).abs().max().item()
            assert err <= TOL, (name, truncate, err)
        fast = encode_text(clip, emb, eot, plan, share_prefix=True)  # exact where it applies
        assert (fast - ref).abs().max().item() <= TOL


def test_reference_without_prompts_is_open_clip(bb) -> None:
    """The reference loop itself is right: with no plan it is open_clip's ``encode_text``."""
    toks = bb.tokenize(TEXTS)
    with torch.no_grad():
        ref = reference_text(bb.clip, bb.clip.token_embedding(toks), toks.argmax(-1), None)
        assert (ref - bb.clip.encode_text(toks)).abs().max().item() <= TOL


def _probe(bb, plan: TowerPlan, position, seq: int = 0) -> float:
    """Change of sequence ``seq``'s feature when its instance token ``position(eot)`` moves (not a constant
    shift, which LayerNorm would remove)."""
    emb, eot = _inputs(bb)
    pos = position(int(eot[seq]))
    moved = emb.clone()
    moved[seq, pos] += 3.0 * torch.randn(emb.shape[-1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = encode_text(bb.clip, emb, eot, plan, truncate=False)
        b = encode_text(bb.clip, moved, eot, plan, truncate=False)
    return (a[seq] - b[seq]).abs().max().item()


def test_prompts_read_eot_and_nothing_after_it(tiny) -> None:
    """Appended prompts feed into EOT, so whatever they read reaches the pooled feature: padding right
    after EOT and slots past the longest EOT must not, EOT itself and the token before it must."""
    d = tiny.text.width
    plan = TowerPlan(shallow=torch.randn(2, d, generator=torch.Generator().manual_seed(3)))
    emb, eot = _inputs(tiny)
    longest = int(eot.max())
    assert _probe(tiny, plan, lambda e: e + 1) == 0.0  # padding of a short sequence (before longest EOT)
    assert _probe(tiny, plan, lambda e: longest + 1) == 0.0  # past the longest EOT
    assert _probe(tiny, plan, lambda e: e) > 1e-3  # EOT itself
    assert _probe(tiny, plan, lambda e: e - 1) > 1e-3
    # through the prompts only: with no prompts, padding is equally invisible
    assert _probe(tiny, TowerPlan(), lambda e: e + 1) == 0.0


def test_padding_between_eots_of_other_sequences_is_invisible(tiny) -> None:
    """Sequence 0 (short) vs sequence 1 (the longest): sequence 0's tokens after its EOT are within the
    truncated length, so only the key mask keeps them from sequence 0's prompts."""
    emb, eot = _inputs(tiny)
    assert int(eot[0]) + 1 < int(eot.max())  # the case exists in TEXTS
    d = tiny.text.width
    plan = _plans(d, len(TEXTS))["appended_deep"]
    plan.layers = {k: v for k, v in plan.layers.items() if k < len(tiny.clip.transformer.resblocks)}
    moved = emb.clone()
    span = slice(int(eot[0]) + 1, int(eot.max()) + 1)  # past EOT for sequences 0 and 2, not for 1
    moved[:, span] += 3.0 * torch.randn(emb.shape[-1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = encode_text(tiny.clip, emb, eot, plan)
        b = encode_text(tiny.clip, moved, eot, plan)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert (a[1] - b[1]).abs().max().item() > 1e-3  # the longest sequence does read its own tokens
