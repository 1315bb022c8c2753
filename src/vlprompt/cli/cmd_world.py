"""`vlprompt world`: the generated world -- pretrain its CLIP (``vlp-world``), or look at samples.

``vlprompt world pretrain --out vlp-world.safetensors`` reproduces the bundled checkpoint bit for bit
(same sha256) from its recipe; ``--check`` compares the result with the bundled record.  ``--recipe
short`` is a one-minute run for checking reproducibility itself.  See docs/world.md.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from vlprompt.cli import world_bench
from vlprompt.cli.common import output_file, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "world", help="the generated world: pretrain vlp-world, draw samples", description=__doc__
    )
    ws = p.add_subparsers(dest="world_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])
    pp = ws.add_parser("pretrain", help="pretrain the world CLIP from its recipe (CPU, deterministic)")
    pp.add_argument(
        "--out", required=True, help="checkpoint to write (.safetensors); a .json record goes beside it"
    )
    pp.add_argument("--recipe", default="full", help="full (the bundled checkpoint) or short (a quick check)")
    pp.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    pp.add_argument("--steps", type=positive_int, default=None, help="override the recipe's number of steps")
    pp.add_argument(
        "--probe-every", type=int, default=0, help="print attribute probes every N steps (weights unchanged)"
    )
    pp.add_argument("--check", action="store_true", help="fail unless the sha256 equals the bundled record's")
    pp.set_defaults(func=_pretrain)
    sp = ws.add_parser("samples", help="write a PNG grid of world images with their captions")
    sp.add_argument("--out", required=True, type=output_file(".png"), help="PNG file to write")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--n", type=positive_int, default=64, help="number of images (a square grid)")
    sp.add_argument("--domains", action="store_true", help="one scene per row in each rendering style")
    sp.set_defaults(func=_samples)
    dp = ws.add_parser(
        "descriptions",
        help="write the world's class descriptions (for --descriptions) and print the file's path",
    )
    dp.set_defaults(func=_descriptions)
    world_bench.register(ws)


def _descriptions(args: argparse.Namespace) -> int:
    """Methods that read class descriptions (CoPrompt) take this file on world sets: sentences from
    the world's caption templates around each class name (ours; the papers' come from a language model)."""
    from vlprompt.world.sets import descriptions_file

    print(descriptions_file())
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from vlprompt.backbones.bundled import find_bundled
    from vlprompt.errors import VlpromptError
    from vlprompt.utils import atomic_write_json
    from vlprompt.world.pretrain import pretrain, recipe_from_name, record_for, save_checkpoint

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise VlpromptError(f"--out must end in .safetensors, got {out.name}")
    recipe = recipe_from_name(args.recipe, seed=args.seed, steps=args.steps)
    print(
        f"pretraining {recipe.arch}: {recipe.steps} steps x batch {recipe.batch_size}, seed {recipe.seed}, "
        f"{recipe.threads} threads (deterministic)"
    )
    every = max(1, recipe.steps // 20)

    def on_step(step: int, loss: float, seconds: float) -> None:
        if step % every == 0 or step == recipe.steps - 1:
            print(f"  step {step + 1:4d}/{recipe.steps}  loss {loss:.3f}  {seconds:6.0f} s", flush=True)

    def on_probe(step: int, probes: dict[str, float]) -> None:
        print(f"  step {step + 1:4d} probes (128 scenes): {json.dumps(probes)}", flush=True)

    model, summary = pretrain(recipe, on_step, on_probe=on_probe, probe_every=args.probe_every)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_checkpoint(model, recipe, out)
    import open_clip
    import torch

    record = record_for(recipe, sha, summary, args.recipe)
    atomic_write_json(out.with_suffix(".json"), record)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)  sha256 {sha}")
    probes = summary.get("attribute_probes_512") or {}
    print(
        "zero-shot attribute probes (512 fresh scenes each): "
        + ", ".join(f"{k} {v:.1f}%" for k, v in probes.items())
        + f"; logit scale {summary['logit_scale']:.1f}"
    )
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    if args.check:
        b = find_bundled(recipe.arch, None)
        want = b.record.get("sha256") if b else None
        if want is None or b.record.get("recipe") != json.loads(json.dumps(record["recipe"])):
            raise VlpromptError("no bundled record with this recipe to check against; use the full recipe")
        if sha != want:
            raise VlpromptError(
                f"sha256 {sha[:16]}... differs from the bundled {want[:16]}...; a different torch build or "
                "CPU kind changes float rounding (the bundled record names the ones used)"
            )
        print("reproduced: sha256 equals the bundled checkpoint's")
    return 0


def _samples(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from vlprompt.world import scene as world

    side = max(1, int(round(args.n**0.5)))
    imgs, caps = world.sample_batch(args.seed, 0, side * side)
    if args.domains:  # one scene per row, in every style
        rng_scenes = [world.sample_scene(np.random.default_rng([args.seed, i])) for i in range(side)]
        rows = [
            [world.render(sc, np.random.default_rng([args.seed, i]), domain=d) for d in world.DOMAINS]
            for i, sc in enumerate(rng_scenes)
        ]
        imgs = np.stack([im for row in rows for im in row])
        caps = [f"{d}" for _ in rows for d in world.DOMAINS]
        grid = np.concatenate([np.concatenate(row, 1) for row in rows], 0)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out)
        print(f"wrote {out}: {side} scenes (rows) x domains {', '.join(world.DOMAINS)} (columns)")
        return 0
    s = imgs.shape[1]
    grid = imgs.reshape(side, side, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(side * s, side * s, 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((side * s * 3, side * s * 3), Image.NEAREST).save(out)
    out.with_suffix(".txt").write_text(
        "\n".join(f"{i // side},{i % side}: {c}" for i, c in enumerate(caps)) + "\n", encoding="utf-8"
    )
    print(f"wrote {out} and {out.with_suffix('.txt')} (captions, row,column)")
    print(json.dumps(caps[:4]))
    return 0
