"""`vlprompt methods`: the registered methods, what they are, and (optionally) their sizes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the prompt-learning methods")
    p.add_argument("--count", action="store_true", help="also print trainable parameter counts")
    p.add_argument("--model", default="ViT-B-16", help="backbone architecture for --count (random init)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.errors import VlpromptError
    from vlprompt.methods import create_model, get_method, list_methods

    backbone = None
    if args.count:
        from vlprompt.backbones import load_backbone

        backbone = load_backbone(args.model)
    for name in list_methods():
        cls = get_method(name)
        line = f"{name:<12} {cls.summary}"
        if backbone is not None:
            try:
                n = create_model(name, backbone, ["a", "b"]).num_trainable()
            except (
                VlpromptError
            ) as e:  # e.g. a preset depth of 12 on a 9-layer backbone: the rest still listed
                line += f"  [its preset does not fit {args.model}: {e}]"
            else:
                note = f"; {cls.trainable_note}" if cls.trainable_note else ""
                line += f"  [{n:,} trainable parameters on {args.model}{note}]"
        print(line)
    return 0
