"""`vlprompt train`: train one method on one data set into a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlprompt.errors import VlpromptError


def add_backbone_args(p: argparse.ArgumentParser, default_model: str | None = "ViT-B-16") -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"open_clip architecture (default {default_model}; with --weights: inferred from the file)",
    )
    p.set_defaults(default_model=default_model)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", help="open_clip pretrained tag (needs the weights cached or a network)")
    g.add_argument("--weights", help="local CLIP weights file (OpenAI .pt, open_clip .bin/.pt, .safetensors)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")


def model_name(args: argparse.Namespace) -> str | None:
    """``--model``, else the default -- except with ``--weights``, whose architecture is inferred."""
    if args.model:
        return args.model
    return None if getattr(args, "weights", None) else getattr(args, "default_model", "ViT-B-16")


def print_table(rows: list[dict]) -> None:
    """Accuracy / macro-F1 per evaluation as one small table on stdout."""
    print(f"{'dataset':16} {'subsample':9} {'n':>6} {'classes':>7} {'accuracy':>9} {'macro-F1':>9}")
    for r in rows:
        print(
            f"{str(r['dataset']):16} {str(r['subsample']):9} {r['n']:>6} {r['n_classes']:>7} "
            f"{r['accuracy']:>9.2f} {r['macro_f1']:>9.2f}"
        )


def _run(args: argparse.Namespace) -> int:
    from vlprompt.protocols.runs import train_run
    from vlprompt.train.config import resolve_config

    cfg = resolve_config(
        args.method,
        args.dataset,
        root=args.root,
        shots=args.shots,
        seed=args.seed,
        subsample=args.subsample,
        protocol=args.protocol,
        model=model_name(args),
        pretrained=args.pretrained,
        weights=args.weights,
        overrides=(args.set or []) + (["data.skip_bad=true"] if args.skip_bad else []),
        epochs=args.epochs,
        device=args.device,
        num_workers=args.num_workers,
    )
    from vlprompt.train.checkpoint import CKPT_DIR, STATE

    state = Path(args.out) / CKPT_DIR / STATE
    if state.is_file() and not (Path(args.out) / "done").is_file() and not (args.resume or args.force):
        raise VlpromptError(
            f"{args.out} holds an interrupted run's checkpoint; pass --resume to continue it "
            "or --force to start over"
        )
    from vlprompt.train.loggers import make_loggers

    loggers = make_loggers(getattr(args, "log_to", None), args.out, cfg)  # TensorBoard / W&B (optional)
    try:
        res = train_run(
            cfg,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            force=args.force,
            callbacks=loggers,
        )
    finally:
        for logger in loggers:
            logger.close()
    from vlprompt.train.distributed import is_main

    if not is_main():  # under torchrun, rank 0 prints the result
        return 0
    if res["status"] == "complete":
        print(f"{args.out} is already complete (use --force to retrain)")
    if res["evaluation"]:
        print_table([res["evaluation"]])
    print(f"run: {res['run_dir']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a prompt method on a data set (writes a run directory)")
    p.add_argument("--method", required=True, help="method name (see `vlprompt methods`)")
    p.add_argument("--dataset", required=True, help="data set name (see `vlprompt data list`)")
    p.add_argument("--root", help="folder holding the data set folders (CoOp's $DATA)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop unreadable/corrupt images (logged with a count) instead of failing",
    )
    p.add_argument("--shots", type=int, default=16, help="images per class (0 = full split; default 16)")
    p.add_argument("--seed", type=int, default=1, help="seed for few-shot picks and training (default 1)")
    p.add_argument("--subsample", choices=["all", "base", "new"], help="classes (default: base for base2new)")
    p.add_argument(
        "--protocol", help="apply the preset's overrides for base2new, cross-dataset, dg or fewshot"
    )
    p.add_argument("--out", required=True, help="run directory to write")
    add_backbone_args(p)
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=0.01 (repeatable)"
    )
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--force", action="store_true", help="retrain even if the run is complete")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--log-to", metavar="NAMES", help="also log epochs to tensorboard and/or wandb (comma-separated)"
    )
    p.set_defaults(func=_run)
