"""Display names of methods and data sets in reports (the one place that spells them for readers).

DPL variants always carry the note that DPL is reconstructed from the paper's abstract.
"""

from __future__ import annotations

from collections.abc import Iterable

DPL_NOTE = "(reconstructed from the paper's abstract)"

_DISPLAY = {
    "zeroshot": "CLIP (zero-shot)",
    "coop": "CoOp",
    "cocoop": "CoCoOp",
    "ivlp": "IVLP",
    "vpt": "VPT-deep",
    "maple": "MaPLe",
    "mpl": "MPL",
    "kgcoop": "KgCoOp",
    "prograd": "ProGrad",
    "promptsrc": "PromptSRC",
}


def method_label(method: str) -> str:
    """Display name; every DPL variant carries the reconstruction note."""
    if method.lower().startswith("dpl"):
        return "DPL" + method[3:] + " " + DPL_NOTE
    return _DISPLAY.get(method.lower(), method)


def dataset_order(names: Iterable[str]) -> list[str]:
    """Papers' table order for the benchmarks, then anything else alphabetically."""
    from vlprompt.data import BENCHMARKS, DG_TARGETS

    order = {n: i for i, n in enumerate([*BENCHMARKS, *DG_TARGETS])}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))


def dataset_title(name: str) -> str:
    from vlprompt.data import SPECS

    spec = SPECS.get(name)
    return spec.title if spec else name


def reconstruction_note(method: str) -> str:
    """The method's own note when it is a reconstruction (DPL), else ``""``."""
    try:
        from vlprompt.methods import get_method

        return get_method(method).reconstruction_note
    except Exception:  # a method not registered in this installation
        return "reconstructed from the paper's abstract" if method.lower().startswith("dpl") else ""
