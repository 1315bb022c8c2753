"""`vlprompt predict`: top-k classes of images under a trained run's prompts (any class names)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlprompt.errors import VlpromptError


def _run(args: argparse.Namespace) -> int:
    import torch

    from vlprompt.data import build_transform, load_rgb
    from vlprompt.run import load_run

    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise VlpromptError(f"image not found: {p}; check the path")
    classes = None
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise VlpromptError(
                "--classes is empty; pass names separated by commas, e.g. --classes 'cat,dog'"
            )
    if args.topk < 1:
        raise VlpromptError(f"--topk must be at least 1, got {args.topk}")
    model = load_run(args.run, device=args.device)
    tf = build_transform(False, **model.backbone.preprocess_cfg)
    images = torch.stack([tf(load_rgb(str(p))) for p in paths])
    probs, idx = model.predict(images, classes, topk=args.topk)
    names = model.classnames
    for p, pr, ix in zip(paths, probs.tolist(), idx.tolist()):
        print(p)
        for prob, i in zip(pr, ix):
            print(f"  {prob:7.4f}  {names[i]}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images with a trained run's prompts")
    p.add_argument("--run", required=True, help="run (or export) directory")
    p.add_argument("--classes", help="comma-separated class names (default: the training classes)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to show (default 5)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(func=_run)
