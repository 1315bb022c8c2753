"""Display names of methods and data sets in reports (the one place that spells them for readers).

Names come from the method registry; a reconstruction (DPL) carries its note in its label.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vlprompt.data import BENCHMARKS, DG_TARGETS, SPECS
from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method

DPL_NOTE = "(reconstructed from the paper's abstract)"


def _entry(method: str) -> Any:
    """The method's registry entry, or None for a method this installation does not know."""

    try:
        return get_method(method)
    except VlpromptError:
        return None


def method_label(method: str) -> str:
    """The registry's display name (a reconstruction carries its note in it); the name otherwise."""
    entry = _entry(method)
    return entry.label() if entry is not None else method


def method_key(method: str) -> tuple[bool, str]:
    """Table and plot order: zero-shot CLIP first (the row every method is read against), then by name."""
    return (method.lower() != "zeroshot", method)


def dataset_order(names: Iterable[str]) -> list[str]:
    """Papers' table order for the benchmarks, then anything else alphabetically."""

    order = {n: i for i, n in enumerate([*BENCHMARKS, *DG_TARGETS])}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))


def dataset_title(name: str) -> str:

    spec = SPECS.get(name)
    return spec.title if spec else name


def reconstruction_note(method: str) -> str:
    """The method's own note when it is a reconstruction (DPL), else ``""`` (also for an unknown method)."""
    entry = _entry(method)
    return entry.reconstruction_note if entry is not None else ""


def transductive_note(method: str) -> str:
    """The note of a method whose training sees unlabelled test-class images (PromptKD), else ``""``."""
    entry = _entry(method)
    return entry.transductive_note if entry is not None else ""
