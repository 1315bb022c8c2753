"""Base-to-new class subsampling, exactly as CoOp's ``subsample_classes``."""

from __future__ import annotations

import math

from vlprompt.data.splits import DatasetSplits, Datum
from vlprompt.errors import VlpromptError

SUBSAMPLES: tuple[str, ...] = ("all", "base", "new")


def base_new_labels(labels: set[int] | list[int], which: str) -> list[int]:
    """The original labels kept by ``which``: sorted labels, base = first ceil(n/2), new = the rest."""
    ordered = sorted(set(labels))
    m = math.ceil(len(ordered) / 2)
    return ordered[:m] if which == "base" else ordered[m:]


def subsample(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Keep the base or new half of the classes (relabelled 0..) in every split; ``all`` keeps everything.

    The halves are computed from the *train* labels, as the reference does, so apply this after few-shot
    sampling to get the official protocol (sampling is over all classes).
    """
    if which not in SUBSAMPLES:
        raise VlpromptError(f"unknown subsample '{which}'; choose one of: {', '.join(SUBSAMPLES)}")
    if splits.subsample != "all":
        raise VlpromptError(
            f"{splits.name} is already subsampled to '{splits.subsample}'; start from the full set"
        )
    if which == "all":
        return splits
    selected = base_new_labels({d.label for d in splits.train}, which)
    if len(selected) < 2:  # a one-class "classifier" scores 100% whatever it learned
        n = len({d.label for d in splits.train})
        raise VlpromptError(
            f"{splits.name} has {n} class(es): its '{which}' half would have {len(selected)}; "
            "base-to-new needs at least 4 classes (2 per half) -- add classes or use --subsample all"
        )
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [
            Datum(d.impath, relabel[d.label], d.classname, d.relpath) for d in items if d.label in relabel
        ]

    return splits.with_(
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        classnames=[splits.classnames[y] for y in selected],
        subsample=which,
    )


#: label of an item whose label a method must not read (the images of a transductive method)
UNLABELLED = -1


def unlabelled_pool(splits: DatasetSplits, which: str) -> tuple[list[Datum], list[str]]:
    """The unlabelled images a transductive method may train on, and the classes they come from.

    The protocol's rule: the **train** split of every class of the data set -- for base-to-new
    (``which="base"``) the base *and* the new classes' training images, for the other protocols
    (``"all"``) the run's own classes -- never a validation or test image.  ``splits`` is the data set
    before base/new subsampling (after few-shot sampling when the run asks for shots).  Labels are
    replaced by :data:`UNLABELLED`, so a method that read them would fail rather than learn from them.
    """
    if which not in SUBSAMPLES:
        raise VlpromptError(f"unknown subsample '{which}'; choose one of: {', '.join(SUBSAMPLES)}")
    if splits.subsample != "all":
        raise VlpromptError(f"{splits.name} is subsampled to '{splits.subsample}'; pass the full data set")
    items = [Datum(d.impath, UNLABELLED, "", d.relpath) for d in splits.train]
    return items, list(splits.classnames)
