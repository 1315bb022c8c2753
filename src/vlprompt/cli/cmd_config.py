"""`vlprompt config show`: every configuration key with its value, default and help."""

from __future__ import annotations

import argparse
import json

from vlprompt.cli.common import add_config_args
from vlprompt.errors import VlpromptError


def _fmt(v: object) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _show(args: argparse.Namespace) -> int:
    from vlprompt.train.config import describe_keys, resolve_config

    values: dict[str, object] = {}
    given = {
        "--set": args.overrides,
        "--config": args.config,
        "--protocol": args.protocol,
        "--dataset": args.dataset,
    }
    asked = [flag for flag, value in given.items() if value]
    if asked and not args.method:
        raise VlpromptError(
            f"{', '.join(asked)}: values are resolved for a method's preset; add --method NAME "
            "(without it, config show lists the defaults)"
        )
    if args.method:
        if args.dataset and not args.dataset.startswith(("folder:", "csv:")):
            from vlprompt.data import get_spec

            get_spec(args.dataset)  # an unknown name is refused here, as train refuses it
        cfg = resolve_config(
            args.method,
            args.dataset or "demo",
            protocol=args.protocol,
            overrides=args.overrides,
            config_file=args.config,
        )
        flat = cfg.to_dict()
        for section, sub in flat.items():  # every section (train, data, backbone, model, options)
            for k, v in (sub if isinstance(sub, dict) else {}).items():
                values[f"{section}.{k}"] = v
    rows = describe_keys(args.method)
    width = max(len(r["key"]) for r in rows)
    head = "value" if args.method else "default"
    print(f"{'key'.ljust(width)}  {head:<20} {'default':<20} help")
    for r in rows:
        default = _fmt(r["default"])
        value = _fmt(values.get(r["key"], r["default"])) if args.method else default
        mark = " *" if args.method and value != default else ""
        extra = " (execution only: not part of the fingerprint)" if r["execution"] else ""
        print(f"{r['key'].ljust(width)}  {value[:20]:<20} {default[:20]:<20} {r['help']}{extra}{mark}")
    if args.method:
        print("* differs from the key's default (set by the preset, --config or --set)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config", help="show the configuration keys (types, defaults, help)")
    sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    s = sub.add_parser("show", help="print every key with its value, default and help")
    s.add_argument(
        "--method",
        "--trainer",
        dest="method",
        help="also the method's options, with the values its preset resolves to",
    )
    s.add_argument("--protocol", help="resolve the preset's overrides for this protocol")
    s.add_argument("--dataset", help="data set the values are resolved for (default demo)")
    add_config_args(s)
    s.set_defaults(func=_show)
    p.set_defaults(func=lambda a: p.print_help() or 0)
