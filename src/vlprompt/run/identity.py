"""Run identity: a fingerprint of everything that changes a run's result, and what differs.

The identity holds the method and all its options, the backbone (name, pretrained tag, sha256 of
the weights file), the data (canonical data set name, sha256 of its split, shots, seed, subsample,
bad-image handling), every training key that is part of the recipe, and the resolved precision.
Execution-only keys (device, logging, evaluation batch size, loader workers, data root, the
weights file's *path*) are left out, so the same run moved to another machine or folder keeps its
fingerprint, and a run is reused only when the request computes exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from vlprompt.data import get_dataset, get_spec, read_descriptions, set_max_image_pixels, split_hash
from vlprompt.data.custom import public_name
from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method
from vlprompt.train.config import ADDED_LATER, DataConfig, RunConfig, TrainConfig
from vlprompt.train.precision import resolve_device, resolve_precision
from vlprompt.utils import atomic_write_json, cache_dir, read_json, sha256_file, sha256_json

IDENTITY_VERSION = 1
#: a run's prompt file (``layout.PROMPT``; layout imports this module, so it is named here too)
_PROMPT_FILE = "prompt.safetensors"
#: a Hub reference's prefix (``hub_ref.PREFIX``; hub_ref imports layout, so it is named here too)
_HUB_PREFIX = "hf-hub:"
#: train keys that are folded into others (epochs tables resolve into train.epochs)
_FOLDED = ("epochs_by_shots", "epochs_by_dataset")

#: generations of generated sets whose runs were fingerprinted before the generation was part of the
#: identity (world version 3): their fingerprints stay as they were; every later one is in the identity
GENERATION_ADDED_LATER = frozenset({"world-v3", "world-v3r1"})

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) in the user cache (files are large)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, int(st.st_mtime_ns))
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    memo_file = cache_dir() / "sha256.json"
    memo = read_json(memo_file, {})
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(str(p))
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
    ):
        digest = str(entry.get("sha256"))
    else:
        digest = sha256_file(p)
        memo[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            atomic_write_json(memo_file, memo)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    _SHA_MEMO[key] = digest
    return digest


def backbone_identity(cfg: RunConfig) -> dict[str, Any]:
    b = cfg.backbone
    sha = None
    if b.weights:
        if not Path(b.weights).is_file():
            raise VlpromptError(
                f"backbone weights file not found: {b.weights}; pass --weights PATH to a local copy"
            )
        sha = weights_sha256(b.weights)
    return {"name": b.name, "pretrained": b.pretrained, "weights_sha256": sha}


def train_identity(t: TrainConfig) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(t):
        if f.metadata.get("execution") or f.name in _FOLDED:
            continue
        if f.name in ADDED_LATER and getattr(t, f.name) == ADDED_LATER[f.name]:
            continue
        out[f.name] = getattr(t, f.name)
    out["image_features_cache"] = "train" if t.image_features_cache == "train" else "exact"
    out.pop("precision", None)  # recorded resolved, at the top level
    return out


def data_identity(
    d: DataConfig, split_hash: str | None, classnames: list[str] | None = None
) -> dict[str, Any]:
    """The data keys of the identity.  A ``folder:``/``csv:`` set is named without its machine path
    (``folder:pets``); what identifies its data is the split hash (every item's relative path and label)
    and, for these sets only, the class names (a CSV's labels are not in its relative paths)."""
    out = {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if not f.metadata.get("execution")}
    out["split_hash"] = split_hash
    if isinstance(out.get("dataset"), str) and public_name(out["dataset"]) != out["dataset"]:
        out["dataset"] = public_name(out["dataset"])
        if classnames is not None:
            out["classnames_sha256"] = sha256_json(list(classnames))
    elif (gen := generation(d.dataset)) is not None and gen not in GENERATION_ADDED_LATER:
        out["generation"] = gen
    return out


def generation(dataset: Any) -> str | None:
    """A generated built-in set's generation (``world-v3r1``; the split hash sees only relative paths
    and labels, which a new generation may keep), else None."""
    if not isinstance(dataset, str):
        return None
    try:
        return get_spec(dataset).generation
    except VlpromptError:
        return None


def identity(
    cfg: RunConfig, *, split_hash: str | None, precision: str, classnames: list[str] | None = None
) -> dict[str, Any]:
    """The identity a run's fingerprint hashes (plain JSON values)."""
    raw = _teacher_source(cfg)
    src = _teacher_source(resolve_teacher(cfg))
    ident = {
        "version": IDENTITY_VERSION,
        "method": cfg.method,
        # the teacher is identified by its prompt's bytes, not by where the file lies
        "options": {k: v for k, v in method_options(cfg).items() if not (raw and v in (raw, src))},
        "backbone": backbone_identity(cfg),
        "data": {**data_identity(cfg.data, split_hash, classnames), **descriptions_identity(cfg)},
        "train": train_identity(cfg.train),
        "precision": precision,
    }
    if src:
        ident["teacher"] = teacher_identity(src)
    return json.loads(json.dumps(ident, default=str))


def descriptions_identity(cfg: RunConfig) -> dict[str, Any]:
    """``{"descriptions_sha256": ...}`` when the run reads a class-descriptions file (its content, not
    its path, identifies the run), else ``{}`` (identities of runs without one are unchanged)."""
    path = cfg.data.descriptions
    return {"descriptions_sha256": read_descriptions(path).sha256} if path else {}


#: in a teacher's path, replaced by the run's data set name, shots and seed: one teacher per data set
#: (``teachers/{dataset}``) or per run (``runs/base2new/promptsrc/{dataset}/shots{shots}_seed{seed}``)
TEACHER_FIELDS = ("{dataset}", "{shots}", "{seed}")


def resolve_teacher(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``{dataset}``, ``{shots}`` and ``{seed}`` in the teacher option replaced by the run's
    (``--set options.teacher=teachers/{dataset}`` gives each run of a grid its own teacher)."""
    src = _teacher_source(cfg)
    if not any(f in src for f in TEACHER_FIELDS):
        return cfg
    key = next(k for k, v in method_options(cfg).items() if v == src)
    d = cfg.data
    values = (public_name(str(d.dataset)), str(d.shots or 0), str(d.seed))
    for field_, value in zip(TEACHER_FIELDS, values, strict=True):
        src = src.replace(field_, value)
    return cfg.but(options={key: src})


def _teacher_source(cfg: RunConfig) -> str:
    return get_method(cfg.method).teacher_source(cfg.options) if cfg.options is not None else ""


def teacher_identity(src: str) -> dict[str, Any]:
    """What identifies a frozen teacher: its prompt file's sha256, method and backbone (a Hub reference
    by its name and revision).  Read here from the prompt's embedded manifest (``run.prompt`` reads
    prompts fully; it sits above this module)."""
    if isinstance(src, str) and src.startswith(_HUB_PREFIX):  # hub_ref.is_hub_ref
        return {"hub": src}
    path = Path(src)
    prompt = path if path.is_file() else path / _PROMPT_FILE
    try:
        with safe_open(str(prompt), framework="pt") as f:
            manifest = json.loads((f.metadata() or {})["vlprompt_manifest"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        raise VlpromptError(
            f"teacher {src} is not a saved prompt; pass a run, an export or a prompt.safetensors"
        ) from None
    back = manifest.get("backbone") or {}
    return {
        "prompt_sha256": weights_sha256(prompt),
        "method": manifest.get("method"),
        "backbone": {k: back.get(k) for k in ("name", "pretrained", "weights_sha256")},
    }


def method_options(cfg: RunConfig) -> dict[str, Any]:
    """The method's section as a plain dict (what create_model, the identity and the manifest take)."""
    opts = cfg.options
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(opts or {})


def verify_fingerprint(record: Any, config: dict[str, Any] | None, *, fp_path: Any, config_path: Any) -> None:
    """One line naming the file that disagrees: ``fingerprint.json`` whose hash is not that of its own
    identity (edited), or a ``config.yaml`` whose recipe is not the one the fingerprint identifies (an
    edited config, or a fingerprint swapped in from another run).  Only keys both sides hold are
    compared, so a run written by an older vlprompt (fewer keys) still verifies."""
    ident = record.get("identity") if isinstance(record, dict) else None
    if not isinstance(ident, dict) or sha256_json(ident) != record.get("fingerprint"):
        raise VlpromptError(
            f"{fp_path} does not match its own identity (edited or damaged); restore the run's own file "
            "or retrain with --force"
        )
    if not config:
        return
    raw = {k: v for k, v in config.items() if k != "provenance"}
    cfg = RunConfig.from_dict(raw, where=str(config_path))
    mine = {
        "method": cfg.method,
        "options": method_options(cfg),
        "backbone": {"name": cfg.backbone.name, "pretrained": cfg.backbone.pretrained},
        "data": data_identity(cfg.data, None),
        "train": train_identity(cfg.train),
    }
    a, b = _flatten(ident), _flatten(json.loads(json.dumps(mine, default=str)))
    if isinstance(a.get("data.dataset"), str):  # runs written before custom sets were named by name only
        a["data.dataset"] = public_name(a["data.dataset"])
    diffs = [
        f"{k}: {a[k]} -> {b[k]}" for k in sorted(set(a) & set(b)) if k != "data.split_hash" and a[k] != b[k]
    ]
    if diffs:
        raise VlpromptError(
            f"{config_path} disagrees with {fp_path} ({describe_differences(diffs, 2)}); one of them was "
            "edited or copied from another run -- restore the run's own files or retrain with --force"
        )


def fingerprint_record(ident: dict[str, Any]) -> dict[str, Any]:
    return {"fingerprint": sha256_json(ident), "identity": ident}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``["train.epochs: 1 -> 5", ...]`` between two identities (old may be None: no fingerprint)."""
    if old is None:
        return ["(the run has no fingerprint: written by an older vlprompt)"]
    a, b = _flatten(old), _flatten(new)

    def short(v: Any) -> str:
        s = json.dumps(v) if not isinstance(v, str) else v
        return s if len(s) <= 24 else s[:12] + "…"

    return [
        f"{k}: {short(a.get(k))} -> {short(b.get(k))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def describe_differences(diffs: list[str], limit: int = 4) -> str:
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


# ------------------------------------------------------------------ split hashes (memoised per process)
_SPLITS: dict[tuple[Any, ...], Any] = {}


def load_splits(data: DataConfig) -> Any:
    """The full (pre-few-shot) DatasetSplits of ``data``, memoised per process."""

    set_max_image_pixels(data.max_image_pixels)
    k = (data.dataset, data.root, data.skip_bad, data.max_image_pixels, data.listing)
    if k not in _SPLITS:
        if len(_SPLITS) > 16:
            _SPLITS.clear()
        _SPLITS[k] = get_dataset(data.dataset, data.root, skip_bad=data.skip_bad, listing=data.listing)
    return _SPLITS[k]


def request_fingerprint(cfg: RunConfig, precision: str | None = None) -> dict[str, Any]:
    """The fingerprint record a request would write (loads the data set's split, not its images);
    ``precision``: the resolved precision's name (resolved here from ``cfg.train`` when not given)."""

    prec = precision or resolve_precision(cfg.train.precision, resolve_device(cfg.train.device)).name
    return fingerprint_for(cfg, load_splits(cfg.data), prec)


def fingerprint_for(cfg: RunConfig, splits: Any, precision: str) -> dict[str, Any]:
    """The fingerprint record of ``cfg`` given its data set's full splits (:func:`load_splits`) and
    the resolved precision's name (``train_run`` resolves both once, ``run/request.py``)."""
    ident = identity(
        cfg, split_hash=split_hash(splits), precision=precision, classnames=list(splits.classnames)
    )
    return fingerprint_record(ident)
