"""`vlprompt data list|verify`: what data sets exist and whether one is laid out correctly."""

from __future__ import annotations

import argparse

from vlprompt.errors import VlpromptError


def _list(args: argparse.Namespace) -> int:
    from vlprompt.data import SPECS

    rows = []
    for s in SPECS.values():
        if s.counts is None:
            counts = "generated"
        elif s.test_only:
            counts = f"test only: {s.counts[2]:,}"
        else:
            counts = " / ".join(f"{n:,}" for n in s.counts)
        rows.append((s.name, s.title, f"{s.num_classes}", counts, f"{s.folder}/"))
    head = ("name", "title", "classes", "train / val / test", "folder")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]  # columns as wide as their longest entry
    for r in [head, *rows]:
        print(f"{r[0]:{w[0]}}  {r[1]:{w[1]}}  {r[2]:>{w[2]}}  {r[3]:{w[3]}}  {r[4]}")
    print("also: folder:PATH (one sub-folder per class) and csv:PATH (rows 'path,label')")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from vlprompt.data import verify_dataset

    custom = args.dataset.startswith(("folder:", "csv:"))
    if custom:  # no fixed layout to check: load it (split written once) and open every image
        from vlprompt.data import get_dataset

        splits = get_dataset(args.dataset, skip_bad=False)
        items = [d for part in (splits.train, splits.val, splits.test) for d in part]
        if args.check_images:
            from vlprompt.data import load_rgb

            for d in items:
                load_rgb(d.impath)  # a corrupt image raises one line naming it
        counts = ", ".join(f"{k} {len(getattr(splits, k)):,}" for k in ("train", "val", "test"))
        print(f"{args.dataset}: OK\n  counts: {counts}\n  {len(splits.classnames)} classes")
        return 0
    if args.dataset != "demo" and not args.dataset.startswith("world-") and not custom and not args.root:
        from vlprompt.data import get_spec

        get_spec(args.dataset)  # an unknown name is said first: --root would not help it
        raise VlpromptError("data verify needs --root DIR (the folder that holds the data set folders)")
    report = verify_dataset(args.dataset, args.root, check_images=args.check_images)
    print(report.format())
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="list the data sets or verify one on disk")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])
    lp = sub.add_parser("list", help="the built-in data sets with their sizes")
    lp.set_defaults(func=_list)
    vp = sub.add_parser("verify", help="check a data set's folders, split file, counts and images")
    vp.add_argument("--dataset", required=True, help="data set name (see `vlprompt data list`)")
    vp.add_argument("--root", help="folder holding the data set folders (CoOp's $DATA)")
    vp.add_argument("--check-images", action="store_true", help="also open every present image")
    vp.set_defaults(func=_verify)
