"""`vlprompt import CKPT --out DIR`: an official (Dassl) prompt checkpoint becomes a vlprompt prompt.

The result is a prompt directory (``prompt.safetensors`` + ``manifest.json``) that ``eval --run``,
``predict --run`` and ``vlprompt.load_prompt`` read like a trained run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlprompt.errors import VlpromptError


def _options(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VlpromptError(f"--option '{item}' is not KEY=VALUE; e.g. --option ctx_init='a photo of a'")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _classnames(args: argparse.Namespace) -> tuple[list[str], str | None, str | None]:
    """(class names, template, data set name) from --classes or --dataset."""
    if args.classes and args.dataset:
        raise VlpromptError(
            "pass either --dataset NAME (its classes and template) or --classes 'a,b,c', not both"
        )
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not names:
            raise VlpromptError(
                "--classes is empty; pass names separated by commas, e.g. --classes 'cat,dog'"
            )
        return names, None, None
    if args.dataset:
        from vlprompt.data import get_dataset

        splits = get_dataset(args.dataset, args.root)
        return list(splits.classnames), splits.template, splits.name
    raise VlpromptError(
        "the checkpoint does not record its class names; pass --dataset NAME (its classes) or "
        "--classes 'a,b,c' (in the training order)"
    )


def _run(args: argparse.Namespace) -> int:
    from vlprompt.backbones import load_backbone
    from vlprompt.run.backbone import portable_section
    from vlprompt.run.dassl_import import build_model, import_checkpoint, write_prompt_dir
    from vlprompt.run.layout import LOCAL, RunDir
    from vlprompt.train.config import BackboneConfig

    out = Path(args.out)
    if out.exists() and RunDir(out).manifest() is not None and not args.force:
        raise VlpromptError(f"{out} already holds a prompt; pass another --out or --force")
    try:
        imp = import_checkpoint(args.checkpoint, args.method)
    except VlpromptError as e:
        if "fit no official layout" not in str(e):
            raise
        raise VlpromptError(f"{args.checkpoint} is not a prompt checkpoint of a known method: {e}") from None
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as e:  # junk that unpickled
        raise VlpromptError(
            f"{args.checkpoint} is not a prompt checkpoint (junk, damaged or another format: "
            f"{type(e).__name__}); pass the model.pth.tar-N file the official trainer wrote"
        ) from None
    overrides = _options(args.option or [])
    classnames, template, dataset = _classnames(args)
    tag = None if (args.weights or str(args.pretrained).lower() == "none") else args.pretrained
    # shapes are checked on the architecture (random weights unless a file is given: only shapes matter)
    backbone = load_backbone(args.model, pretrained=args.weights)
    model = build_model(imp, backbone, classnames, template=template, **overrides)
    manifest = {
        "method": imp.method,
        "options": {**imp.options, **overrides},
        "backbone": portable_section(
            BackboneConfig(name=args.model, pretrained=tag, weights=args.weights), backbone
        ),
        "classnames": list(model.classnames),
        "template": model.template,
        "protocol": None,
        "dataset": dataset,
        "subsample": "all",
        "shots": None,
        "seed": None,
        "epochs": imp.epoch,
        "trainable_parameters": model.num_trainable(),
        "imported_from": {
            "file": Path(args.checkpoint).name,
            "format": "dassl",
            "method": "given (--method)" if args.method else "detected from the tensor names",
            "epoch": imp.epoch,
            "notes": imp.notes,
        },
    }
    write_prompt_dir(out, model, manifest)
    if args.weights:  # this machine's copy of the weights (never exported)
        RunDir(out).write_json(
            LOCAL, {"data_root": None, "backbone": {"weights": str(Path(args.weights).resolve())}}
        )
    print(f"imported {imp.method} ({model.num_trainable()} prompt parameters, epoch {imp.epoch}) -> {out}")
    for note in imp.notes:
        print(f"note: {note}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="turn an official (Dassl-based) checkpoint of CoOp, CoCoOp, KgCoOp, ProGrad, IVLP, VPT, MaPLe, "
        "PromptSRC or MPL into a vlprompt prompt (tensors only: nothing in the file is executed)",
    )
    p.add_argument("checkpoint", help="model.pth.tar-N / model-best.pth.tar (or the folder holding it)")
    p.add_argument("--out", required=True, help="prompt directory to write")
    p.add_argument("--method", help="method name (default: detected from the tensor names)")
    p.add_argument("--dataset", help="data set whose class names the prompt was trained on")
    p.add_argument("--root", help="data root for --dataset (default: VLPROMPT_DATA or ./data)")
    p.add_argument("--classes", help="comma-separated class names, in training order (instead of --dataset)")
    p.add_argument(
        "--model", default="ViT-B-16", help="open_clip architecture it was trained on (default %(default)s)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--pretrained",
        default="openai",
        help="pretrained tag recorded for eval/predict (default openai, as the official code; none: random)",
    )
    g.add_argument("--weights", help="local CLIP weights file recorded for eval/predict")
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="method option no tensor records (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing prompt in --out")
    p.set_defaults(func=_run)
