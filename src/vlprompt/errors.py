"""One exception type for user-facing problems.

Everything a user can cause (bad path, unknown name, impossible setting) raises
:class:`VlpromptError` with a one-line message that names the problem and the fix;
the CLI prints it as ``error: <message>`` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlpromptError(Exception):
    """A problem the user can fix; the message is one line naming the problem and the fix."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> VlpromptError:
    """Error for an unknown registry name, listing the closest valid names."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(choices[:30])}"
    return VlpromptError(f"unknown {kind} '{name}'; {hint}")
