"""Class descriptions: sentences per class (written by a language model) for methods that read them.

Two formats a user has: CoPrompt's JSON (``{"class name": ["sentence", ...], ...}``, the files its
repository ships as ``gpt_file/<dataset>_prompt.json``) and a CSV of ``class,sentence`` rows (an
optional ``class,sentence`` header; a class repeats on as many rows as it has sentences).  A file is
read and checked once per (path, size, mtime); its sha256 enters the run's identity, so a changed
file is a different run.  Bad files are refused with one line naming the problem and the fix.

Class names match after ``_`` -> space (as every trainer spells class names) and, failing an exact
match, case-insensitively.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlprompt.errors import VlpromptError
from vlprompt.utils import sha256_file

FORMAT_HINT = 'a JSON mapping {"class": ["sentence", ...]} or a CSV of class,sentence rows'


@dataclass(frozen=True)
class ClassDescriptions:
    """The sentences of each class (``by_class``), and the file's sha256 (``sha256``: the run identity)."""

    by_class: dict[str, tuple[str, ...]]
    sha256: str
    source: str = ""
    _folded: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._folded.update({_key(k).lower(): k for k in self.by_class})

    def missing(self, classnames: Sequence[str]) -> list[str]:
        return [c for c in classnames if self._lookup(c) is None]

    def _lookup(self, name: str) -> str | None:
        k = _key(name)
        return k if k in self.by_class else self._folded.get(k.lower())

    def for_classes(self, classnames: Sequence[str]) -> list[tuple[str, ...]]:
        """The sentences of each of ``classnames`` in order; one line naming absent classes."""
        gone = self.missing(classnames)
        if gone:
            shown = ", ".join(repr(c) for c in gone[:5]) + (
                f" and {len(gone) - 5} more" if len(gone) > 5 else ""
            )
            raise VlpromptError(
                f"descriptions file {self.source or '(given)'} has no sentences for {len(gone)} of "
                f"{len(classnames)} classes ({shown}); add them to the file"
            )
        return [self.by_class[str(self._lookup(c))] for c in classnames]


def _key(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split())


_MEMO: dict[tuple[str, int, int], ClassDescriptions] = {}


def read_descriptions(path: str | os.PathLike) -> ClassDescriptions:
    """The descriptions in ``path`` (``.csv``: class,sentence rows; otherwise JSON), read once."""
    p = Path(path)
    if not p.is_file():
        raise VlpromptError(f"descriptions file not found: {path}; pass --descriptions with {FORMAT_HINT}")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        try:
            raw = p.read_bytes()
            text = raw.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise VlpromptError(
                f"cannot read descriptions file {path} ({type(e).__name__}); pass a UTF-8 file"
            ) from None
        by_class = _parse_csv(text, path) if p.suffix.lower() == ".csv" else _parse_json(text, path)
        if len(_MEMO) > 16:
            _MEMO.clear()
        _MEMO[key] = ClassDescriptions(by_class, sha256_file(p), str(path))
    return _MEMO[key]


def _parse_json(text: str, path: object) -> dict[str, tuple[str, ...]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise VlpromptError(
            f"descriptions file {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            f"fix it or pass {FORMAT_HINT}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise VlpromptError(f"descriptions file {path} must hold {FORMAT_HINT}, not {type(data).__name__}")
    out: dict[str, tuple[str, ...]] = {}
    for name, sentences in data.items():
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise VlpromptError(
                f"descriptions file {path}: class {name!r} must map to a list of sentences (strings)"
            )
        _add(out, name, sentences, path)
    return _checked(out, path)


def _parse_csv(text: str, path: object) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise VlpromptError(f"descriptions file {path} is not valid CSV ({e}); pass {FORMAT_HINT}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0]] == ["class", "sentence"]:
        rows = rows[1:]
    for i, r in enumerate(rows, 1):
        if len(r) != 2:
            raise VlpromptError(
                f"descriptions file {path}: row {i} has {len(r)} fields; each row must be class,sentence "
                "(quote sentences that hold commas)"
            )
        out.setdefault(r[0], []).append(r[1])
    merged: dict[str, tuple[str, ...]] = {}
    for name, sentences in out.items():
        _add(merged, name, sentences, path)
    return _checked(merged, path)


def _add(out: dict[str, tuple[str, ...]], name: str, sentences: Sequence[str], path: object) -> None:
    k = _key(name)
    if not k:
        raise VlpromptError(f"descriptions file {path} has an empty class name; name every class")
    if k in out:
        raise VlpromptError(f"descriptions file {path} names class {k!r} twice; merge its sentences")
    kept = tuple(" ".join(s.split()) for s in sentences if s.strip())
    if not kept:
        raise VlpromptError(f"descriptions file {path}: class {name!r} has no sentence; give at least one")
    out[k] = kept


def _checked(out: dict[str, tuple[str, ...]], path: object) -> dict[str, tuple[str, ...]]:
    if not out:
        raise VlpromptError(f"descriptions file {path} holds no class; pass {FORMAT_HINT}")
    return out
