"""`vlprompt run`: train and evaluate a whole protocol grid, skipping runs that are already complete."""

from __future__ import annotations

import argparse

from vlprompt.cli.common import (
    JoinList,
    LazyChoices,
    add_backbone_args,
    add_config_args,
    add_data_args,
    data_overrides,
    model_name,
    output_dir,
)
from vlprompt.errors import VlpromptError


def _protocols() -> tuple[str, ...]:
    from vlprompt.protocols.grid import PROTOCOLS

    return PROTOCOLS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a protocol grid (base2new, cross-dataset, dg, fewshot) over methods, data sets, seeds",
        description="Train and evaluate every run of a protocol grid into RUNS_DIR/<protocol>/<method>/"
        "<dataset>/shots<K>_seed<S>/. A finished run is skipped only when its fingerprint (everything that "
        "changes its result) equals the request's; a finished run with other settings is reported as a "
        "conflict (--force replaces it); interrupted runs resume; missing evaluations are added. A failing "
        "run is reported and the others go on (exit status 1 if any failed).",
    )
    p.add_argument(
        "--protocol",
        required=True,
        choices=LazyChoices(_protocols),
        metavar="PROTOCOL",
        help="base2new, cross-dataset, dg or fewshot (see docs/protocols.md)",
    )
    p.add_argument(
        "--method",
        "--methods",
        "--trainer",
        dest="method",
        action=JoinList,
        nargs="+",
        help="method name(s), comma- or space-separated (see `vlprompt methods`); the official trainer "
        "names (CoOp, MaPLe ...) work too",
    )
    p.set_defaults(method_required=True)
    add_data_args(p, many=True)
    p.add_argument("--source", help="cross-dataset/dg: data set trained on (default imagenet)")
    p.add_argument(
        "--seeds",
        "--seed",
        dest="seeds",
        default="1,2,3",
        action=JoinList,
        nargs="+",
        help="seeds, comma- or space-separated (default 1,2,3)",
    )
    p.add_argument(
        "--shots",
        action=JoinList,
        nargs="+",
        help="shots per class, comma- or space-separated (default 16; fewshot: 1,2,4,8,16)",
    )
    p.add_argument(
        "--out",
        "--output-dir",
        dest="out",
        type=output_dir,
        default="runs",
        help="runs directory (default ./runs)",
    )
    add_backbone_args(p)
    add_config_args(p)
    p.add_argument("--epochs", type=int, help="override the number of training epochs")
    p.add_argument("--force", action="store_true", help="retrain finished runs whose settings differ")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build and validate every run's config, print todo / resume / complete / conflict / invalid and "
        "project the time and peak memory of the runs to do from a short probe on this machine",
    )
    p.add_argument("--no-projection", action="store_true", help="--dry-run without the cost probe")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="with --jobs / --devices / --executor: skip the aggregated report of --out (rebuilding it "
        "re-reads and re-plots every run there; `vlprompt report` writes it when you want it)",
    )
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
    p.add_argument(
        "--jobs-per-device",
        type=int,
        help="K jobs on every device (each --devices entry, else every visible GPU, else the CPU), threads "
        "split between all jobs and each GPU job limited to 1/K of its memory",
    )
    c = p.add_argument_group(
        "cluster (--executor slurm | local-submitit; needs `pip install vlprompt[slurm]`)"
    )
    c.add_argument(
        "--executor",
        choices=["local", "local-submitit", "slurm"],
        default="local",
        help="local (default): this machine; slurm: one submitit job-array task per run; local-submitit: "
        "the same array as subprocesses here",
    )
    c.add_argument("--partition", help="SLURM partition")
    c.add_argument("--account", help="SLURM account to charge (sbatch --account)")
    c.add_argument("--qos", help="SLURM quality of service (sbatch --qos)")
    c.add_argument("--gpus-per-job", type=int, help="GPUs per run (default 1 on slurm, 0 locally)")
    c.add_argument("--cpus-per-job", type=int, default=8, help="CPUs per run (default 8)")
    c.add_argument("--mem-gb", type=float, help="memory per run in GB (default: the cluster's)")
    c.add_argument("--time-min", type=int, default=240, help="time limit per run in minutes (default 240)")
    c.add_argument("--array-parallelism", type=int, default=64, help="max runs at once on slurm (default 64)")
    p.set_defaults(func=run)


def plan_from_args(args: argparse.Namespace) -> list:
    """The grid the arguments describe (a list of RunSpec)."""
    from vlprompt.protocols.grid import GridRequest, parse_list, plan_grid
    from vlprompt.train.config import RunRequest

    if args.epochs is not None and args.epochs < 1:
        raise VlpromptError(f"--epochs must be >= 1, got {args.epochs}")
    methods = parse_list(args.method, "method")
    run = RunRequest(  # what every run of the grid shares
        methods[0], root=args.root, model=model_name(args), pretrained=args.pretrained, weights=args.weights,
        overrides=tuple(data_overrides(args)), epochs=args.epochs, num_workers=args.num_workers,
        device=args.device, config_file=args.config,
    )  # fmt: skip
    return plan_grid(
        GridRequest(
            args.protocol,
            methods,
            parse_list(args.datasets, "data set") if args.datasets else None,
            parse_list(args.seeds, "seed", int),
            args.out,
            shots=parse_list(args.shots, "shots", int) if args.shots else None,
            source=args.source,
            run=run,
        )
    )


def dry_run(specs: list, projection: bool = False, device: str | None = None, jobs: int = 1) -> int:
    from vlprompt.protocols.runner import status

    counts: dict[str, int] = {}
    todo = []
    for s in specs:
        state, reason = status(s)
        if state in ("todo", "resume"):
            todo.append(s)
        counts[state] = counts.get(state, 0) + 1
        evals = ", ".join(f"{e.dataset}/{e.subsample}" for e in s.evaluations)
        line = f"{state:9} {s.out_dir}  [{evals}]"
        print(line + (f"  -- {reason}" if reason else ""))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{len(specs)} runs planned: {summary}")
    if projection and todo:  # bench/projection.py: presets x a short probe measured here
        from vlprompt.bench.projection import project_specs

        try:
            print(project_specs(todo, device=device or "auto", jobs=jobs))
        except Exception as e:  # the plan above stands; say why there is no projection, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"no cost projection: {type(e).__name__}: {first[:200]}")
    return 1 if counts.get("invalid") or counts.get("conflict") else 0


def run(args: argparse.Namespace) -> int:
    from vlprompt.protocols.runner import run_grid, summarize

    specs = plan_from_args(args)
    if args.dry_run:
        jobs = args.jobs or (len(args.devices.split(",")) if args.devices else 1)
        return dry_run(specs, not args.no_projection, args.device, jobs)
    if args.force:
        for s in specs:
            s.force = True
    executor = getattr(args, "executor", "local") or "local"
    per_device = getattr(args, "jobs_per_device", None)
    parallel = (
        getattr(args, "jobs", None) is not None
        or getattr(args, "devices", None)
        or per_device is not None
        or executor != "local"
    )
    if executor != "local":  # protocols/cluster.py: a submitit job array, same execute(), one report
        from vlprompt.protocols.cluster import JobResources, run_grid_submitit
        from vlprompt.protocols.parallel import report_grid

        gpus = args.gpus_per_job if args.gpus_per_job is not None else (1 if executor == "slurm" else 0)
        res = JobResources(gpus=gpus, cpus=args.cpus_per_job, mem_gb=args.mem_gb, time_min=args.time_min,
                           partition=args.partition, array_parallelism=args.array_parallelism,
                           account=args.account, qos=args.qos)  # fmt: skip
        from pathlib import Path

        results = run_grid_submitit(specs, executor, folder=Path(args.out) / ".submitit", resources=res)
    elif parallel:  # protocols/parallel.py: worker processes + one aggregated report at the end
        from vlprompt.protocols.parallel import check_visible, parse_devices, report_grid, run_grid_parallel

        devices = parse_devices(args.devices)
        check_visible(devices)  # on this machine (a cluster's nodes have their own)
        results = run_grid_parallel(
            specs,
            jobs=args.jobs,
            devices=devices,
            progress=not args.no_progress,
            jobs_per_device=per_device,
        )
    else:
        results = run_grid(specs, progress=not args.no_progress)
    print(summarize(results))
    from vlprompt.protocols.report import grid_summary

    table = grid_summary(s.out_dir for s in specs)
    if table:
        print("\n" + table + "\n")
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.out_dir}: {r.reason}")
    if parallel and not getattr(args, "no_report", False):
        md = report_grid(args.out)
        if md is not None:
            print(f"report: {md}")
    return 1 if failed else 0
