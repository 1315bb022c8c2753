"""`vlprompt eval`: evaluate a trained run, or zero-shot CLIP, on a data set's test split."""

from __future__ import annotations

import argparse
import logging

from vlprompt.cli.cmd_train import print_table
from vlprompt.cli.common import add_backbone_args, model_name, output_dir
from vlprompt.errors import VlpromptError

log = logging.getLogger(__name__)


def _zeroshot(args: argparse.Namespace) -> int:
    from vlprompt.data import build_loader, build_transform, get_dataset, subsample
    from vlprompt.methods import create_model
    from vlprompt.run import RunDir, environment, load_backbone_from, metrics_entry, record_metrics
    from vlprompt.run.backbone import WORLD_BANNER, world_mismatch
    from vlprompt.train import evaluate
    from vlprompt.train.precision import resolve_device

    if not args.dataset:
        raise VlpromptError("eval --method needs --dataset NAME")
    dev = resolve_device(args.device or "auto")
    backbone = load_backbone_from(
        {"name": model_name(args), "pretrained": args.pretrained, "weights": args.weights}, device=dev
    )
    splits = subsample(get_dataset(args.dataset, args.root, skip_bad=args.skip_bad), args.subsample or "all")
    if world_mismatch(backbone, splits.name):
        log.warning(WORLD_BANNER)
    model = create_model(args.method, backbone, list(splits.classnames), template=splits.template)
    if model.num_trainable():
        raise VlpromptError(
            f"method '{args.method}' has learnable prompts; train it first (`vlprompt train --method "
            f"{args.method} ...`) and evaluate with --run"
        )
    tf = build_transform(False, **backbone.preprocess_cfg)
    loader = build_loader(
        splits.test, tf, args.batch_size or 100, shuffle=False, num_workers=args.num_workers
    )
    res = evaluate(model, loader, device=dev)
    entry = metrics_entry(
        res, dataset=splits.name, subsample=splits.subsample, epoch=0, seed=None, shots=0, method=args.method
    )
    if args.out:
        out = RunDir(args.out)
        record_metrics(out, entry)
        out.write_env(environment(str(dev)))
    print_table([entry])
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise VlpromptError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise VlpromptError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if bool(args.run) == bool(args.method):
        raise VlpromptError("pass either --run RUN (a trained run) or --method NAME (e.g. zeroshot)")
    if args.no_progress:
        from vlprompt.train.progress import set_progress

        set_progress(False)
    if args.method:
        return _zeroshot(args)
    if args.model or args.pretrained:
        flag = "--model" if args.model else "--pretrained"
        raise VlpromptError(
            f"{flag} applies to --method; a run names its own backbone (give its weights file with "
            "--weights when it is not where the run was trained): drop " + flag
        )
    from vlprompt.run import evaluate_run

    entry = evaluate_run(
        args.run,
        dataset=args.dataset,
        root=args.root,
        subsample=args.subsample,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        skip_bad=args.skip_bad or None,
        weights=args.weights,
    )
    print_table([entry])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a trained run (or zero-shot CLIP) on a test split")
    p.add_argument("--run", help="run directory written by `vlprompt train`")
    p.add_argument("--method", help="evaluate a method without training (zeroshot)")
    p.add_argument("--dataset", help="data set (default: the run's own)")
    p.add_argument("--root", help="folder holding the data set folders")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop unreadable/corrupt images (logged with a count) instead of failing",
    )
    p.add_argument(
        "--subsample", choices=["all", "base", "new"], help="classes (default: new for a base run, else all)"
    )
    add_backbone_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    p.add_argument("--out", type=output_dir, help="with --method: directory to write metrics.json into")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
