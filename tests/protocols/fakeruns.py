"""Fake run directories with the exact layout of protocols/runs.py, holding known numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vlprompt.run import save_prompt
from vlprompt.run.prompt import FORMAT


def make_run(
    runs_dir: Path,
    protocol: str,
    method: str,
    dataset: str,
    shots: int,
    seed: int,
    evals: dict[tuple[str, str], float],
    *,
    pretrained: str | None = "openai",
    done: bool = True,
    env: dict[str, Any] | None = None,
    log: list[dict[str, Any]] | None = None,
) -> Path:
    """One run dir: config.yaml, metrics.json (one entry per (dataset, subsample) -> accuracy), done."""
    d = runs_dir / protocol / method / dataset / f"shots{shots}_seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "method": method,
        "options": {},
        "train": {"lr": 0.002, "epochs": 1},
        "data": {
            "dataset": dataset,
            "root": None,
            "shots": shots,
            "seed": seed,
            "subsample": "base" if protocol == "base2new" else "all",
            "num_workers": 0,
        },
        "backbone": {"name": "ViT-B-16", "pretrained": pretrained, "weights": None},
        "protocol": protocol,
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    entries = [
        {
            "dataset": ds,
            "subsample": sub,
            "split": "test",
            "epoch": 1,
            "accuracy": acc,
            "macro_f1": acc - 1,
            "per_class_accuracy": {},
            "n": 100,
            "n_classes": 10,
            "seed": seed,
            "shots": shots,
            "method": method,
        }
        for (ds, sub), acc in evals.items()
    ]
    (d / "metrics.json").write_text(json.dumps({"evaluations": entries}))
    (d / "env.json").write_text(json.dumps(env or {"python": "3", "device": "cpu"}))
    if log is not None:
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if done:  # what a finished run holds besides its numbers: its prompt and manifest (run layer's writer)
        manifest = {"format": FORMAT, "method": method, "backbone": cfg["backbone"], "dataset": dataset,
                    "shots": shots, "seed": seed, "protocol": protocol}  # fmt: skip
        save_prompt(d, {}, manifest)
        (d / "done").write_text("")
    return d


def demo_grid_argv(out, seeds: str = "1", *extra: str) -> list[str]:
    """`vlprompt run` argv for the smallest real base2new grid (coop, demo, vlp-tiny, 2 shots, 1 epoch)."""
    return [
        "run", "--protocol", "base2new", "--method", "coop", "--datasets", "demo", "--seeds", seeds,
        "--shots", "2", "--model", "vlp-tiny", "--epochs", "1", "--set", "train.batch_size=8",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip
