"""``verify_dataset``: check a data set on disk and say what is wrong and how to fix it.

Unlike ``get_dataset`` (which stops at the first problem), this collects every problem -- missing
folders or split files, counts that differ from the published split sizes, missing and unreadable
images by path -- and includes where the official data set can be obtained and how to lay it out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vlprompt.data.datasets import dataset_dir, get_dataset, image_dir, read_items, resolve_root
from vlprompt.data.images import image_problem
from vlprompt.data.registry import DatasetSpec, canonical_name, get_spec
from vlprompt.data.splits import SPLITS, Datum
from vlprompt.errors import VlpromptError

MAX_LISTED = 5


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`; ``ok`` is true when ``problems`` is empty."""

    name: str
    root: str
    problems: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # absolute paths of listed-but-absent images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    source: str = ""
    howto: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A human-readable multi-line summary (what the CLI prints)."""
        lines = [f"{self.name} at {self.root}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        if self.counts:
            lines.append("  counts: " + ", ".join(f"{k} {v:,}" for k, v in self.counts.items()))
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"  {i}" for i in self.info]
        if not self.ok and (self.source or self.howto):
            lines.append(f"  obtain: {self.source}")
            lines.append(f"  layout: {self.howto}")
        return "\n".join(lines)


def _examples(paths: list[str]) -> str:
    more = f", ... (+{len(paths) - MAX_LISTED:,} more)" if len(paths) > MAX_LISTED else ""
    return ", ".join(paths[:MAX_LISTED]) + more


def _check_items(
    report: VerifyReport, parts: dict[str, list[Datum]], check_images: bool, source: str
) -> None:
    total = sum(len(v) for v in parts.values())
    per_split = {s: [d.impath for d in items if not os.path.isfile(d.impath)] for s, items in parts.items()}
    missing = [p for s in parts for p in per_split[s]]
    report.missing = missing
    if missing:
        detail = ", ".join(f"{s} {len(v):,}" for s, v in per_split.items())
        report.problems.append(
            f"{len(missing):,} of {total:,} images listed in {source} are missing ({detail}), "
            f"e.g. {_examples(missing)}"
        )
    if check_images:
        seen: set[str] = set()
        for items in parts.values():
            for d in items:
                if d.impath in seen or not os.path.isfile(d.impath):
                    continue
                seen.add(d.impath)
                why = image_problem(d.impath, decode=False)
                if why:
                    report.unreadable.append((d.impath, why))
        if report.unreadable:
            ex = "; ".join(f"{p} ({w})" for p, w in report.unreadable[:MAX_LISTED])
            report.problems.append(f"{len(report.unreadable):,} unreadable images, e.g. {ex}")
        report.info.append(f"checked {len(seen):,} present images (header + JPEG end marker)")


def _check_counts(report: VerifyReport, spec: DatasetSpec, counts: dict[str, int]) -> None:
    report.counts = counts
    if spec.counts is None:
        return
    expected = dict(zip(SPLITS, spec.counts))
    if spec.test_only:
        expected = {"test": expected["test"]}
    wrong = {s: (counts.get(s, 0), n) for s, n in expected.items() if counts.get(s, 0) != n}
    if wrong:
        report.problems.append(
            "split sizes differ from the official ones: "
            + ", ".join(f"{s} {got:,} (expected {n:,})" for s, (got, n) in wrong.items())
        )


def verify_dataset(name: str, root: str | os.PathLike | None, check_images: bool = True) -> VerifyReport:
    """Check a data set's layout, split file, per-split counts and images; never raises for data problems.

    ``check_images`` also opens every present image (header parse + JPEG end-of-image marker: about
    0.2 ms per image) to find corrupt or truncated files.
    """
    spec = get_spec(canonical_name(name))
    report = VerifyReport(name=spec.title, root=str(root), source=spec.source)
    report.howto = spec.howto.format(root=root)  # refined below once the root resolves
    try:
        generated = spec.kind in ("demo", "world")
        base = resolve_root(root) if not generated else Path()
        report.root = str(base)
        report.howto = spec.howto.format(root=base)
        if generated:
            splits = get_dataset(spec.name)
            report.root = splits.root
            parts = {s: getattr(splits, s) for s in SPLITS}
            _check_counts(report, spec, {s: len(v) for s, v in parts.items()})
            _check_items(report, parts, check_images, spec.split_file)
            return report
        ddir = dataset_dir(spec, base)
    except VlpromptError as e:
        report.problems.append(str(e))
        return report
    img = image_dir(spec, ddir)
    try:
        train, val, test, classnames = read_items(spec, ddir, base, check_files=False)
    except VlpromptError as e:
        report.problems.append(str(e))
        return report
    parts = {"train": train, "val": val, "test": test}
    _check_counts(report, spec, {s: len(v) for s, v in parts.items()})
    where = ddir / spec.split_file if spec.split_file else ddir
    report.info.append(f"{len(classnames)} classes; read from {where}")
    if not img.is_dir():
        report.problems.append(
            f"image folder not found: {img} (expected one of: "
            + ", ".join(str(ddir / c) for c in spec.image_dirs)
            + ")"
        )
    if val is test:  # ImageNet: val is the test set; check its images once
        parts.pop("val")
    _check_items(report, parts, check_images, where.name)
    return report
