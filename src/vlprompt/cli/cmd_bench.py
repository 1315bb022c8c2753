"""`vlprompt bench`: time training steps, evaluation and the towers; fast paths vs the reference."""

from __future__ import annotations

import argparse


def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got '{text}'"
            ) from None

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark training/evaluation speed and memory (fast paths vs the reference computation)",
        description="Times one training step and one evaluation per method at the official batch sizes on "
        "a randomly initialised backbone (timing only: no accuracy meaning), the towers, a matmul peak, "
        "and the same work done the reference way (77-token text, text recomputed per batch, no feature "
        "cache, explicit softmax attention). Writes results.json + results.md under "
        "benchmarks/results/<device>/. The default takes about 6 minutes on 2 quiet CPU cores; "
        "--full is the grid.",
    )
    p.add_argument(
        "what",
        nargs="?",
        choices=["suite", "world"],
        help="`world`: every method on the world suite (= `vlprompt world bench`); "
        "`suite`: project the cost of a whole protocol (methods x data sets x seeds) on this device "
        "from measured per-step and per-image costs; writes suite-<protocol>.{json,md}",
    )
    p.add_argument(
        "--model", default=None, help="backbone architecture (default ViT-B-16; --quick: vlp-tiny)"
    )
    s = p.add_argument_group("suite (with `vlprompt bench suite`)")
    s.add_argument("--protocol", default="base2new", help="protocol to project (default base2new)")
    s.add_argument("--datasets", type=_csv(str), default=None, help="data sets (default: the protocol's)")
    s.add_argument("--seeds", type=_csv(int), default=None, help="seeds (default 1,2,3)")
    s.add_argument("--shots", type=_csv(int), default=None, help="shots (default: the protocol's)")
    s.add_argument("--root", default=None, help="data root: decode cost measured on real images if present")
    p.add_argument("--methods", type=_csv(str), default=None, help="training methods, e.g. coop,maple,mpl")
    p.add_argument("--eval-methods", type=_csv(str), default=None, help="methods timed at evaluation")
    p.add_argument("--classes", type=_csv(int), default=None, help="class counts, e.g. 10,100,1000")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per configuration")
    p.add_argument("--quick", action="store_true", help="tiny settings (vlp-tiny, 10 classes): a smoke test")
    p.add_argument("--full", action="store_true", help="the whole grid: every method, 10/100/1000 classes")
    p.add_argument("--no-reference", action="store_true", help="skip the reference variant (no speed-ups)")
    p.add_argument(
        "--memory-classes", type=int, default=None, help="class count of the memory check (0 = skip)"
    )
    p.add_argument("--memory-methods", type=_csv(str), default=None, help="methods of the memory check")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (fixed shapes; last batch padded)"
    )
    p.add_argument(
        "--no-profile", action="store_true", help="do not profile configurations that miss a target"
    )
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    p.set_defaults(func=run)


def run_suite(args: argparse.Namespace) -> int:
    from vlprompt.bench.harness import default_out_dir
    from vlprompt.bench.suite import SuiteConfig, render_markdown, run_suite, write_suite
    from vlprompt.methods import bench_methods

    over = {"protocol": args.protocol, "device": args.device, "root": args.root}
    for key, val in [("model", args.model), ("methods", args.methods), ("datasets", args.datasets),
                     ("seeds", args.seeds), ("shots", args.shots), ("repeats", args.repeats),
                     ("warmup", args.warmup)]:  # fmt: skip
        if val is not None:
            over[key] = val
    if args.classes is not None:
        if len(args.classes) != 2:
            from vlprompt.errors import VlpromptError

            raise VlpromptError(
                f"bench suite --classes takes two class counts (e.g. 50,500), got {args.classes}"
            )
        over["classes"] = tuple(args.classes)
    over.setdefault("methods", bench_methods())
    cfg = SuiteConfig.quick_config(**over) if args.quick else SuiteConfig(**over)
    res = run_suite(cfg)
    out = args.out or default_out_dir(res)
    jpath, mpath = write_suite(res, out)
    print(render_markdown(res))
    print(f"wrote {jpath} and {mpath} ({res['wall_s']} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "what", None) == "suite":
        return run_suite(args)
    if getattr(args, "what", None) == "world":  # the world benchmark (cli/world_bench.py), default settings
        from vlprompt.cli.world_bench import run_bench as run_world

        return run_world(
            argparse.Namespace(
                out="runs_world",
                protocol=args.protocol,
                methods=",".join(args.methods) if args.methods else None,
                datasets=",".join(args.datasets) if args.datasets else None,
                seeds=",".join(map(str, args.seeds)) if args.seeds else "1,2,3",
                jobs=2,
                dry_run=False,
            )
        )
    from vlprompt.bench.harness import BenchConfig, default_out_dir, run_bench, write_results
    from vlprompt.errors import VlpromptError
    from vlprompt.methods import bench_methods

    if args.quick and args.full:
        raise VlpromptError("--quick and --full contradict each other; pass one of them")
    over = {}
    if args.full:
        over.update(
            methods=bench_methods(),
            classes=[10, 100, 1000],
            eval_methods=["zeroshot", *bench_methods()],
            memory_methods=["maple", "mpl", "dpl"],
            variants_fast_plain=True,
            repeats=3,
            eval_images=200,
            eval_batch=100,  # the reference evaluator's test batch size
            image_batch=32,
            text_prompts=100,
        )
    for key, val in [
        ("model", args.model),
        ("methods", args.methods),
        ("eval_methods", args.eval_methods),
        ("classes", args.classes),
        ("repeats", args.repeats),
        ("warmup", args.warmup),
        ("memory_classes", args.memory_classes),
        ("memory_methods", args.memory_methods),
        ("threads", args.threads),
    ]:
        if val is not None:
            over[key] = val
    over.update(device=args.device, compile=args.compile, reference=not args.no_reference)
    if args.no_profile:
        over["profile"] = False
    cfg = BenchConfig.quick_config(**over) if args.quick else BenchConfig(**over)
    res = run_bench(cfg)
    out = args.out or default_out_dir(res)
    jpath, mpath = write_results(res, out)
    for t in res["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        measured = "–" if t["measured"] is None else f"{t['measured']:.2f}"
        print(f"{met:>6}  {t['target']}: {measured}")
    print(f"wrote {jpath} and {mpath} ({res['wall_s']} s)")
    return 0
