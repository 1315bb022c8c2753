"""A training request resolved once: everything the run layer decides before it writes or trains.

``train_run`` resolves its ``RunConfig`` in one run-level pass -- the teacher path for this data set, where
this process trains (device, precision, DDP role: :class:`~vlprompt.train.placement.Placement`), the
fingerprint, the splits as trained and tested (few-shot picks, subsample, a transductive method's
unlabelled pool), the class descriptions and the method's provenance notes -- and hands the object down.
Nothing below re-derives any of it: the trainer gets the placement, the run directory's writers get the
fingerprint and the notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlprompt.data import fewshot, read_descriptions
from vlprompt.data import subsample as subsample_fn
from vlprompt.data.custom import public_name
from vlprompt.data.subsample import unlabelled_pool
from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method
from vlprompt.run.identity import (
    describe_differences,
    differences,
    fingerprint_for,
    load_splits,
    method_options,
    resolve_teacher,
)
from vlprompt.run.layout import RunDir
from vlprompt.train.checkpoint import has_checkpoint
from vlprompt.train.config import RunConfig
from vlprompt.train.placement import Placement, resolve_placement


def provenance(method: str, saw: str | None = None) -> dict[str, Any]:
    """The method's registry notes every artefact carries: ``{"reconstructed": True, "note": ...}`` for
    a reconstruction (DPL), ``{"transductive": True, ...}`` for a transductive method, else ``{}``.
    ``saw``: what the run's training saw (:func:`transductive_saw`), added for a transductive method."""
    out = get_method(method).provenance()
    if saw and out.get("transductive"):
        out["transductive_saw"] = saw
    return out


def transductive_saw(dataset: str, subsample: str, shots: int | None) -> str:
    """What a transductive run trained on, in words (the rule: ``data.subsample.unlabelled_pool``)."""
    which = "base and new classes" if subsample in ("base", "new") else "all classes"
    per = f"{shots} per class" if shots else "the full train split"
    return f"unlabelled train-split images of {public_name(dataset)} ({which}; {per}); no test image"


def run_provenance(cfg: RunConfig) -> dict[str, Any]:
    return provenance(cfg.method, transductive_saw(cfg.data.dataset, cfg.data.subsample, cfg.data.shots))


def build_splits(cfg: RunConfig, subsample: str | None = None, fewshot_: bool = True) -> Any:
    """The run's splits: the data set's (memoised), its few-shot picks, its base/new subsample."""
    splits = load_splits(cfg.data)
    if fewshot_ and cfg.data.shots:
        splits = fewshot(splits, cfg.data.shots, cfg.data.seed)
    return subsample_fn(splits, subsample or cfg.data.subsample)


class RequestRefused(VlpromptError):
    """The run directory holds a run with other settings: the request is refused and the folder is
    left exactly as it is (a grid records no failure in it: the run there is not the one that failed)."""


def check_request(cfg: RunConfig, run: RunDir, fp: dict[str, Any], *, resume: bool, force: bool) -> str:
    """``"complete"`` (reuse), ``"resume"``, ``"fresh"`` -- or a one-line refusal (:class:`RequestRefused`,
    nothing written)."""

    if force:
        return "fresh"
    if run.is_complete() or has_checkpoint(run.checkpoint_dir):
        run.verify()  # an edited or swapped fingerprint / config / manifest / prompt is never believed
    old = run.fingerprint()
    same = old is not None and old.get("fingerprint") == fp["fingerprint"]
    if run.is_complete():
        if same:
            return "complete"
        diffs = differences((old or {}).get("identity"), fp["identity"]) if old else differences(None, {})
        raise RequestRefused(
            f"{run} holds a complete run with other settings ({describe_differences(diffs)}); "
            "pass --force to replace it or use another --out"
        )
    if has_checkpoint(run.checkpoint_dir):
        if not resume:
            return "fresh"
        if not same:
            diffs = differences((old or {}).get("identity"), fp["identity"]) if old else differences(None, {})
            raise RequestRefused(
                f"{run} holds an interrupted run with other settings ({describe_differences(diffs)}); "
                "pass --force to start over or use another --out"
            )
        return "resume"
    return "fresh"


@dataclass(frozen=True)
class ResolvedRun:
    """One training request, resolved (see the module's docstring)."""

    cfg: RunConfig  # the teacher option resolved for this data set (``teachers/{dataset}``)
    options: dict[str, Any]  # cfg.options as a dict: what create_model and the manifest take
    placement: Placement  # this process's device, the resolved precision, the main rank
    fingerprint: dict[str, Any]  # the record fingerprint.json holds: {"fingerprint", "identity"}
    decision: (
        str  # "complete" (reuse the run), "resume" or "fresh" (check_request; re-checked under the lock)
    )
    splits: Any  # DatasetSplits as trained and tested (few-shot, subsample)
    pool: tuple[list[Any], list[str]] | None  # a transductive method's unlabelled images and classes
    descriptions: Any  # the run's ClassDescriptions (``data.descriptions``), or None
    provenance: dict[str, Any]  # the method's notes (config.yaml, env.json, manifest, metrics.json)

    @property
    def id(self) -> str:
        """The run's fingerprint (sha256 of its identity)."""
        return str(self.fingerprint["fingerprint"])

    @property
    def classnames(self) -> list[str]:
        """The label space training runs on: the run's classes, a transductive pool's all classes."""
        return list(self.splits.classnames) if self.pool is None else list(self.pool[1])


def resolve_run(cfg: RunConfig, run: RunDir, *, resume: bool, force: bool) -> ResolvedRun:
    """Resolve ``cfg`` for the run directory ``run`` once (loads the data set's split and checks it, reads
    no image; writes nothing; a refused request raises the one-line error here).

    Run-level decisions first (where this process trains, the teacher, the fingerprint, what ``run``
    already holds, the notes), then the data they select (few-shot picks, base/new subsample, a
    transductive pool, descriptions)."""
    placement = resolve_placement(cfg.train.device, cfg.train.precision)
    cfg = resolve_teacher(cfg)  # teachers/{dataset} -> this data set's teacher
    options = method_options(cfg)
    full = load_splits(cfg.data)  # validates the data set before anything is written
    fp = fingerprint_for(cfg, full, placement.precision.name)
    decision = check_request(cfg, run, fp, resume=resume, force=force)
    prov = run_provenance(cfg)
    picked = fewshot(full, cfg.data.shots, cfg.data.seed) if cfg.data.shots else full
    splits = subsample_fn(picked, cfg.data.subsample)
    # a transductive method's unlabelled pool: the train split of every class (the protocol's rule)
    pool = (
        unlabelled_pool(subsample_fn(picked, "all"), cfg.data.subsample) if prov.get("transductive") else None
    )
    descriptions = read_descriptions(cfg.data.descriptions) if cfg.data.descriptions else None
    return ResolvedRun(cfg, options, placement, fp, decision, splits, pool, descriptions, prov)
