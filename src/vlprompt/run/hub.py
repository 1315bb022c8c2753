"""Prompts shared like models: a Hugging Face Hub folder, ``hf-hub:`` loading, and upload.

``export_hub(run, out)`` writes what ``export_run`` writes (``prompt.safetensors``, ``manifest.json``,
a portable ``config.yaml``) plus ``metrics.json`` and a model card (``README.md``: the method,
backbone, data set, metrics, and the "reconstructed" / "transductive" / random-backbone labels where
they apply).  ``download("hf-hub:org/name")`` fetches such a folder through ``huggingface_hub`` (its
cache first; ``HF_HUB_OFFLINE=1`` never touches the network) so that ``vlprompt.load_prompt`` reads
it like a local export.  ``push_hub(folder, "org/name")`` uploads a folder with
``HfApi.upload_folder`` -- the only step that needs a network and a token.  Nothing downloaded is
executed: the prompt is safetensors, the rest JSON/YAML/Markdown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi

from vlprompt.data import SPECS
from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method
from vlprompt.run.hub_ref import FILES, PREFIX, download, is_hub_ref, is_offline, parse_ref  # noqa: F401
from vlprompt.run.layout import CARD, METRICS, RunDir
from vlprompt.run.load import export_run, read_manifest
from vlprompt.utils import atomic_write_text


# ------------------------------------------------------------------------------------------ export
def export_hub(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A folder ready for the Hub: the export (safetensors, manifest, config), metrics and a model card."""
    manifest, _ = read_manifest(run_dir)
    out = export_run(run_dir, out_dir)
    src = RunDir(run_dir)
    metrics = None
    if Path(run_dir).is_dir() and (Path(run_dir) / METRICS).is_file():
        try:
            metrics = src.metrics()
        except VlpromptError:
            metrics = None
    evaluations = _evaluations(metrics)
    exp = RunDir(out)
    if evaluations:  # the numbers the card states, as data (confusion counts dropped: they name images)
        exp.write_json(METRICS, {"evaluations": evaluations})
    config = src.read_config() if Path(run_dir).is_dir() and src.has_config() else {}
    atomic_write_text(exp.file(CARD), model_card(manifest, evaluations, config))
    return out


def _evaluations(metrics: Any) -> list[dict[str, Any]]:
    if not isinstance(metrics, dict):
        return []
    keep = (
        "dataset",
        "subsample",
        "split",
        "accuracy",
        "macro_f1",
        "n",
        "n_classes",
        "epoch",
        "seed",
        "shots",
    )
    return [{k: e[k] for k in keep if k in e} for e in metrics.get("evaluations", []) if isinstance(e, dict)]


def labels(manifest: dict[str, Any], config: dict[str, Any] | None = None) -> list[str]:
    """The honesty labels a shared prompt carries: reconstructed, transductive, random backbone."""
    out = []
    note = _method_attr(str(manifest.get("method", "")), "reconstruction_note", "")
    if note:
        out.append(note if "reconstructed" in note else f"reconstructed: {note}")
    if _transductive(manifest) or _transductive(config or {}):
        out.append("transductive: it saw unlabelled images of the classes it is tested on")
    if (manifest.get("backbone") or {}).get("random_init"):
        out.append("random-init backbone: a pipeline check, not a CLIP result")
    return out


def _method_attr(method: str, attr: str, default: Any) -> Any:
    """An attribute of a registered method's class (``default`` for a method not installed here)."""
    try:
        return getattr(get_method(method), attr, default) or default
    except VlpromptError:
        return default


def dataset_title(name: str) -> str:
    spec = SPECS.get(name)
    return spec.title if spec else name


def _transductive(obj: Any) -> bool:
    if isinstance(obj, dict):
        return any((k == "transductive" and v is True) or _transductive(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_transductive(v) for v in obj)
    return False


def model_card(
    manifest: dict[str, Any], evaluations: list[dict[str, Any]], config: dict[str, Any] | None = None
) -> str:
    """The Hub model card (YAML front matter + Markdown) of one prompt."""

    def method_label(name: str) -> str:  # the registry's display name where it has one
        return _method_attr(name, "display_name", None) or name

    method = str(manifest.get("method"))
    bb = manifest.get("backbone") or {}
    arch = bb.get("architecture") or bb.get("name") or "?"
    weights = (
        bb.get("pretrained")
        or bb.get("weights_file")
        or ("bundled" if bb.get("bundled_weights_sha256") else None)
    )
    if bb.get("random_init"):
        weights = "random init"
    dataset = manifest.get("dataset")
    flags = labels(manifest, config)
    front = {
        "library_name": "vlprompt",
        "tags": ["vlprompt", "prompt-learning", "clip", method] + (["transductive"] if any(
            f.startswith("transductive") for f in flags) else []),
        "base_model_architecture": arch,
    }  # fmt: skip
    if evaluations:
        front["model-index"] = [
            {
                "name": f"vlprompt-{method}",
                "results": [
                    {
                        "task": {"type": "image-classification"},
                        "dataset": {
                            "name": str(e.get("dataset")),
                            "type": str(e.get("dataset")),
                            "split": f"{e.get('split', 'test')} ({e.get('subsample', 'all')} classes)",
                        },
                        "metrics": [{"type": "accuracy", "value": round(float(e["accuracy"]), 2)}],
                    }
                    for e in evaluations
                    if e.get("accuracy") is not None
                ],
            }
        ]  # fmt: skip
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {method_label(method)} prompt for {arch}", ""]
    for f in flags:
        lines += [f"> **{f}**", ""]
    lines += [
        "A learned prompt for a frozen CLIP-style model, written by vlprompt "
        "(`vlprompt export RUN --hub DIR`). Only the prompt is here "
        f"({manifest.get('trainable_parameters', '?')} parameters, safetensors); the backbone is loaded "
        "separately.",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method_label(method)} (`{method}`) |",
        f"| options | `{json.dumps(manifest.get('options') or {}, sort_keys=True)}` |",
        f"| backbone | {arch} ({weights or 'see manifest'})"
        + (f", weights sha256 `{bb['weights_sha256'][:16]}…`" if bb.get("weights_sha256") else "")
        + " |",
        f"| trained on | {dataset_title(str(dataset)) if dataset else 'unknown (imported)'}"
        f" ({manifest.get('subsample') or 'all'} classes) |",
        "| shots, seed, epochs | "
        + ", ".join(str(manifest.get(k)) for k in ("shots", "seed", "epochs"))
        + " |",
        f"| protocol | {manifest.get('protocol') or 'single run'} |",
        f"| classes | {len(manifest.get('classnames') or [])} |",
    ]
    if manifest.get("imported_from"):
        lines.append(f"| imported from | {manifest['imported_from'].get('format')} checkpoint |")
    lines += ["", "## Metrics", ""]
    if evaluations:
        lines += [
            "| evaluated on | classes | images | accuracy (%) | macro-F1 (%) |",
            "|---|---|---:|---:|---:|",
        ]
        for e in evaluations:
            cells = [dataset_title(str(e.get("dataset"))), e.get("subsample", "all"), e.get("n", "-")]
            cells += ["-" if e.get(k) is None else f"{float(e[k]):.2f}" for k in ("accuracy", "macro_f1")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += ["", "Top-1 accuracy of this one prompt (one seed), as recorded in `metrics.json`."]
    else:
        lines.append("No evaluation was recorded with this prompt.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import vlprompt",
        'model = vlprompt.load_prompt("hf-hub:ORG/NAME")   # the backbone named in manifest.json',
        'print(model.predict(["image.jpg"], classnames=["cat", "dog"]).top())',
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ push
def check_hub_folder(folder: str | os.PathLike) -> Path:
    """``folder`` is a prompt ready for the Hub (prompt, manifest, card), else one line saying why."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VlpromptError(f"{folder} is not a folder; write one with `vlprompt export RUN --hub DIR`")
    read_manifest(folder)
    if not (folder / CARD).is_file():
        raise VlpromptError(
            f"{folder} has no model card ({CARD}); write it with `vlprompt export RUN --hub DIR`"
        )
    return folder


def push_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> str:
    """Upload an ``export --hub`` folder to ``repo_id`` (created if missing); returns the repo URL."""
    repo, revision = parse_ref(repo_id)
    folder = check_hub_folder(folder)
    if is_offline():
        raise VlpromptError("HF_HUB_OFFLINE=1: pushing needs the network; unset it to upload")
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            allow_patterns=FILES,
            commit_message=message or "vlprompt: upload prompt",
        )
    except Exception as e:  # noqa: BLE001 -- auth, network, permissions: one line
        raise VlpromptError(
            f"upload to {repo} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}); "
            "check `huggingface-cli login` and the repository name"
        ) from None
    return f"https://huggingface.co/{repo}"
