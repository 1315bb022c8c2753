"""`vlprompt run`: train and evaluate a whole protocol grid, skipping runs that are already complete."""

from __future__ import annotations

import argparse

from vlprompt.errors import VlpromptError


def register(sub: argparse._SubParsersAction) -> None:
    from vlprompt.protocols.grid import PROTOCOLS

    p = sub.add_parser(
        "run",
        help="run a protocol grid (base2new, cross-dataset, dg, fewshot) over methods, data sets, seeds",
        description="Train and evaluate every run of a protocol grid into RUNS_DIR/<protocol>/<method>/"
        "<dataset>/shots<K>_seed<S>/. Complete runs (a `done` file and every needed evaluation in "
        "metrics.json) are skipped; interrupted runs resume from their checkpoint; missing evaluations "
        "are added. A failing run is reported and the others go on (exit status 1 if any failed).",
    )
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--method", required=True, help="method name(s), comma-separated (see `vlprompt methods`)")
    p.add_argument(
        "--datasets",
        help="comma-separated data sets: trained on for base2new/fewshot; the targets for cross-dataset/dg "
        "(default: the protocol's standard targets)",
    )
    p.add_argument("--source", help="cross-dataset/dg: data set trained on (default imagenet)")
    p.add_argument("--root", help="folder holding the data sets in CoOp layout (<root>/caltech-101/...)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop unreadable/corrupt images (logged with a count) instead of failing",
    )
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--shots", help="comma-separated shots per class (default 16; fewshot: 1,2,4,8,16)")
    p.add_argument("--out", default="runs", help="runs directory (default ./runs)")
    p.add_argument(
        "--model", default=None, help="open_clip architecture (default ViT-B-16; with --weights: inferred)"
    )
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai); default: random init")
    w.add_argument("--weights", help="local weights file (.safetensors / .pt / .bin)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. --set train.lr=0.01 (repeatable)",
    )
    p.add_argument("--epochs", type=int, help="override the number of training epochs")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the preset's, auto)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers per run (default 0)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the planned runs and their status, run nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--jobs",
        type=int,
        help="run N grid runs at once in worker processes (threads split between them), then write the "
        "report; default: one run at a time, no report",
    )
    p.add_argument(
        "--devices",
        help="one GPU index per job, e.g. 0,1 or 0,0,1,1 to share a GPU between two jobs (cpu allowed); "
        "sets --jobs to the number of entries",
    )
    p.set_defaults(func=run)


def plan_from_args(args: argparse.Namespace) -> list:
    """The grid the arguments describe (a list of RunSpec)."""
    from vlprompt.protocols.grid import parse_list, plan_grid

    if args.epochs is not None and args.epochs < 1:
        raise VlpromptError(f"--epochs must be >= 1, got {args.epochs}")
    return plan_grid(
        args.protocol,
        parse_list(args.method, "method"),
        parse_list(args.datasets, "data set") if args.datasets else None,
        parse_list(args.seeds, "seed", int),
        args.out,
        shots=parse_list(args.shots, "shots", int) if args.shots else None,
        root=args.root,
        model=args.model or (None if args.weights else "ViT-B-16"),
        pretrained=args.pretrained,
        weights=args.weights,
        overrides=list(args.overrides or []) + (["data.skip_bad=true"] if args.skip_bad else []),
        epochs=args.epochs,
        num_workers=args.num_workers,
        source=args.source,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    from vlprompt.protocols.runner import run_grid, summarize

    specs = plan_from_args(args)
    if args.dry_run:
        for s in specs:
            state = (
                "complete" if s.is_complete() else ("trained" if (s.out_dir / "done").is_file() else "todo")
            )
            evals = ", ".join(f"{e.dataset}/{e.subsample}" for e in s.evaluations)
            print(f"{state:9} {s.out_dir}  [{evals}]")
        print(f"{len(specs)} runs planned, {sum(s.is_complete() for s in specs)} complete")
        return 0
    parallel = getattr(args, "jobs", None) is not None or getattr(args, "devices", None)
    if parallel:  # protocols/parallel.py: worker processes + one aggregated report at the end
        from vlprompt.protocols.parallel import parse_devices, report_grid, run_grid_parallel

        results = run_grid_parallel(
            specs, jobs=args.jobs, devices=parse_devices(args.devices), progress=not args.no_progress
        )
    else:
        results = run_grid(specs, progress=not args.no_progress)
    print(summarize(results))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.out_dir}: {r.reason}")
    if parallel:
        md = report_grid(args.out)
        if md is not None:
            print(f"report: {md}")
    return 1 if failed else 0
