"""`vlprompt world bench` (= `vlprompt bench world`, `make world`): every method on the world suite.

Every registered method x every world base-to-new set x seeds 1-3 on ``vlp-world``, each method with
its preset unchanged except for one rule: a prompt depth larger than the backbone's number of layers
(``depth``, ``depth_text``, ``depth_image`` of IVLP, VPT, DPL-ProVP: 12 on ViT-B/16) is clamped to the
model's depth (9 on ``vlp-world``), as "every layer" is what such a depth means; the same for a last
block (``*_end``, e.g. MMA's ``adapter_end`` 12).  Zero-shot CLIP is run
as one more method (its row in every table).  ``--protocol all`` adds cross-dataset, DG and few-shot.
Consecutive methods that need no arguments of their own share one grid (``--jobs`` keeps every job busy
across methods).  Then the report.  Runs already complete are skipped, so an interrupted bench resumes.

Two methods need more than a data set, and get the world's stand-ins (our choices): CoPrompt reads class
descriptions (an LLM's in its paper) and gets the world's own (``vlprompt world descriptions``: its
caption templates around each class name); PromptKD distils a frozen teacher (a PromptSRC-trained
ViT-L/14 in its paper) and gets, per data set, shots and seed, the bench's own PromptSRC run on
``vlp-world`` -- a teacher of the student's size, run first (so ``teacher_width`` is set to its width).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlprompt.cli.common import output_dir

MODEL = "vlp-world"
SEEDS = "1,2,3"
TEACHER = "promptsrc"  # PromptKD's teachers are PromptSRC-trained (on a larger CLIP in the paper)


def register(ws: argparse._SubParsersAction) -> None:
    p = ws.add_parser(
        "bench",
        help="every method x every world base-to-new set x seeds 1-3 on vlp-world, then the report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run_bench)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=output_dir,
        default="runs_world",
        help="runs directory (default runs_world; report in it)",
    )
    p.add_argument(
        "--protocol",
        default="base2new",
        choices=["base2new", "cross-dataset", "dg", "fewshot", "all"],
        help="base2new (default) or another protocol of the world suite, or all four",
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated subset (default: every registered method)"
    )
    p.add_argument("--datasets", default=None, help="comma-separated subset of the world base-to-new sets")
    p.add_argument("--seeds", default=SEEDS, help=f"seeds (default {SEEDS})")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--dry-run", action="store_true", help="plan and print the runs' states, train nothing")


def clamp_depths(method: str, protocol: str, layers: int) -> list[str]:
    """``--set`` overrides bringing the preset's prompt depths down to the model's ``layers`` (the rule)."""
    from vlprompt.protocols.grid import GridRequest, plan_grid
    from vlprompt.train.config import RunRequest

    grid = GridRequest(
        protocol, [method], ["world-shapes"], [1], "/nonexistent", run=RunRequest(method, model=MODEL)
    )
    spec = plan_grid(grid)[0]
    opts = spec.cfg.to_dict()["options"]
    return [
        f"options.{k}={layers}"
        for k, v in sorted(opts.items())
        if (k == "depth" or k.startswith(("depth_",)) or k.endswith("_end"))
        and isinstance(v, int)
        and v > layers
    ]


def _protocol_args(protocol: str, datasets: list[str]) -> list[list[str]]:
    from vlprompt.world.sets import CROSS_SOURCE, DG_SOURCE, DG_TARGETS

    if protocol == "base2new":
        return [["--datasets", ",".join(datasets)]]
    if protocol == "cross-dataset":
        targets = [d for d in datasets if d != CROSS_SOURCE]
        return [["--source", CROSS_SOURCE, "--datasets", ",".join(targets)]]
    if protocol == "dg":
        return [["--source", DG_SOURCE, "--datasets", ",".join(DG_TARGETS)]]
    return [["--datasets", ",".join(datasets)]]  # fewshot: K = 1,2,4,8,16 (the protocol's default)


def _needs_teacher(method: str) -> bool:
    from vlprompt.methods import get_method

    cls = get_method(method)
    return bool(cls.text_from_teacher or "teacher_logits" in cls.needs)


def _in_order(methods: list[str]) -> list[str]:
    """``methods``, with the teacher (PromptSRC) moved or added before the first method that needs it."""
    rest = [m for m in methods if m != TEACHER]
    first = next((i for i, m in enumerate(rest) if _needs_teacher(m)), None)
    return methods if first is None else [*rest[:first], TEACHER, *rest[first:]]


def teacher_template(protocol: str, out: str) -> str:
    """The teacher option of a student grid: the bench's own teacher run of the student run's data set,
    shots and seed (``{dataset}``, ``{shots}`` and ``{seed}`` are the run's; see ``run.identity``), so
    the students of a protocol are one grid and ``--jobs`` runs them side by side."""
    from vlprompt.protocols.grid import run_dir_name

    return str(Path(out) / protocol / TEACHER / "{dataset}" / run_dir_name("{shots}", "{seed}"))


def run_bench(args: argparse.Namespace) -> int:
    from vlprompt.backbones import meta_backbone
    from vlprompt.cli.main import main
    from vlprompt.methods import get_method, list_methods
    from vlprompt.protocols.report import build_report
    from vlprompt.world.sets import BASE2NEW_SETS, descriptions_file

    t0 = time.perf_counter()
    methods = args.methods.split(",") if args.methods else [m for m in list_methods() if m != "zeroshot"]
    datasets = args.datasets.split(",") if args.datasets else list(BASE2NEW_SETS)
    bb = meta_backbone(MODEL)
    layers = min(bb.clip.visual.transformer.layers, bb.clip.transformer.layers)
    protocols = ["base2new", "cross-dataset", "dg", "fewshot"] if args.protocol == "all" else [args.protocol]
    failed = 0
    for protocol in protocols:
        grids: list[tuple[list[str], list[str]]] = []  # (methods, their extra arguments)
        for method in _in_order(["zeroshot", *methods]):
            sets = [s for m in clamp_depths(method, protocol, layers) for s in ("--set", m)]
            if sets:
                print(f"{method}: {' '.join(sets[1::2])} (depth clamped to the model's {layers} layers)")
            if "descriptions" in get_method(method).needs:
                sets += ["--descriptions", str(descriptions_file())]
            if _needs_teacher(method):
                teacher = json.dumps(teacher_template(protocol, args.out))
                sets += ["--set", f"options.teacher={teacher}"]
                sets += ["--set", f"options.teacher_width={bb.embed_dim}"]  # the teacher is vlp-world too
            if grids and grids[-1][1] == sets:  # one grid: --jobs keeps both cores busy across methods
                grids[-1][0].append(method)
            else:
                grids.append(([method], sets))
        for names, sets in grids:
            for extra in _protocol_args(protocol, datasets):
                argv = ["run", "--protocol", protocol, "--method", ",".join(names), *extra]
                argv += [
                    "--seeds",
                    args.seeds,
                    "--model",
                    MODEL,
                    "--out",
                    args.out,
                    "--jobs",
                    str(args.jobs),
                    "--no-progress",
                    "--no-report",  # one report at the end, not one per grid (each re-plots every run)
                    *sets,
                ]
                argv += ["--dry-run"] if args.dry_run else []
                failed += main(argv) != 0
    if not args.dry_run:
        report = build_report(args.out, Path(args.out) / "report")
        print(f"report: {report.markdown}")
    note = f", {failed} grid(s) with failures" if failed else ""
    print(
        f"world bench: {len(protocols)} protocol(s), {len(methods)} methods + zero-shot, "
        f"{time.perf_counter() - t0:.0f} s{note}"
    )
    return 1 if failed else 0
