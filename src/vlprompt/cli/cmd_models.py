"""`vlprompt models`: architectures, pretrained tags, bundled and cached weights, and what each needs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list model architectures and weights (tags, bundled, cached) with what each needs",
        description="Every open_clip architecture (and vlprompt's small ones) with its pretrained tags. "
        "NEEDS says what loading it takes: 'nothing' (bundled, or already in the local cache), 'download' "
        "(an open_clip tag, fetched once with a network), 'file' (no published weights: pass --weights "
        "FILE, or leave it out for random init). OpenAI spellings (ViT-B/16, RN50, ViT-L/14@336px) are "
        "accepted wherever a model is named.",
    )
    p.add_argument("filter", nargs="?", help="only architectures whose name contains this (e.g. ViT-B/16)")
    p.add_argument("--no-cache-check", action="store_true", help="do not look for downloaded tags (faster)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.backbones.names import list_models

    rows = list_models(args.filter, check_cache=not args.no_cache_check)
    if not rows:
        from vlprompt.errors import VlpromptError

        raise VlpromptError(f"no architecture matches '{args.filter}'; run `vlprompt models` for the list")
    table = [("ARCHITECTURE", "TAG", "SOURCE", "NEEDS", "OPENAI NAME")]
    table += [(r.architecture, r.tag or "-", r.source, r.needs, r.openai_name or "") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    n_arch = len({r.architecture for r in rows})
    print(f"{n_arch} architecture(s), {len(rows)} row(s); load: --model ARCH [--pretrained TAG|--weights F]")
    return 0
