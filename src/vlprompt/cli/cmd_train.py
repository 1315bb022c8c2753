"""`vlprompt train`: train one method on one data set into a run directory."""

from __future__ import annotations

import argparse

from vlprompt.cli.common import add_backbone_args, add_config_args, add_data_args, data_overrides, model_name
from vlprompt.errors import VlpromptError


def print_table(rows: list[dict]) -> None:
    """Accuracy / macro-F1 per evaluation as one small table on stdout."""
    print(f"{'dataset':16} {'subsample':9} {'n':>6} {'classes':>7} {'accuracy':>9} {'macro-F1':>9}")
    for r in rows:
        print(
            f"{str(r['dataset']):16} {str(r['subsample']):9} {r['n']:>6} {r['n_classes']:>7} "
            f"{r['accuracy']:>9.2f} {r['macro_f1']:>9.2f}"
        )


def _run(args: argparse.Namespace) -> int:
    from vlprompt.run import RunDir, train_run
    from vlprompt.train.checkpoint import has_checkpoint
    from vlprompt.train.config import RunRequest, resolve

    request = RunRequest(
        args.method, args.dataset, root=args.root, shots=args.shots, seed=args.seed,
        subsample=args.subsample, protocol=args.protocol, model=model_name(args),
        pretrained=args.pretrained, weights=args.weights, overrides=tuple(data_overrides(args)),
        epochs=args.epochs, device=args.device, num_workers=args.num_workers, config_file=args.config,
    )  # fmt: skip
    cfg = resolve(request)
    run = RunDir(args.out)
    if has_checkpoint(run.checkpoint_dir) and not run.is_complete() and not (args.resume or args.force):
        raise VlpromptError(
            f"{args.out} holds an interrupted run's checkpoint; "
            "pass --resume to continue it or --force to start over"
        )
    import os

    if os.environ.get("RANK", "0") == "0" and not run.is_complete():  # a long preset: its projected time
        from vlprompt.bench.projection import announce

        announce(cfg)
    from vlprompt.train.loggers import make_loggers

    # TensorBoard / W&B (optional)
    loggers = make_loggers(getattr(args, "log_to", None), run, cfg.to_dict())
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
        print(f"{args.out} is already complete with these settings (use --force to retrain)")
    if res["evaluation"]:
        print_table([res["evaluation"]])
    print(f"run: {res['run_dir']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a prompt method on a data set (writes a run directory)")
    p.add_argument(
        "--method",
        "--methods",
        "--trainer",
        dest="method",
        help="method name (see `vlprompt methods`); the official trainer names (CoOp, MaPLe ...) work too",
    )
    p.set_defaults(method_required=True)
    add_data_args(p)
    p.add_argument("--shots", type=int, default=16, help="images per class (0 = full split; default 16)")
    p.add_argument(
        "--seed",
        "--seeds",
        dest="seed",
        type=int,
        default=1,
        help="seed for few-shot picks and training (default 1)",
    )
    p.add_argument("--subsample", choices=["all", "base", "new"], help="classes (default: base for base2new)")
    p.add_argument(
        "--protocol", help="apply the preset's overrides for base2new, cross-dataset, dg or fewshot"
    )
    p.add_argument("--out", "--output-dir", dest="out", required=True, help="run directory to write")
    add_backbone_args(p)
    add_config_args(p)
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--force", action="store_true", help="replace the run even if it is complete or differs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--log-to", metavar="NAMES", help="also log epochs to tensorboard and/or wandb (comma-separated)"
    )
    p.set_defaults(func=_run)
