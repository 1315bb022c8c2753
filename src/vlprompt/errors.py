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


def unknown_name(kind: str, name: str, choices: Iterable[str], see: str = "") -> VlpromptError:
    """Error for an unknown registry name, listing the closest valid names (``see``: where all are listed,
    e.g. "`vlprompt models`")."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.4)
    more = f" and {len(choices) - 30} more" if len(choices) > 30 else ""
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(choices[:30])}{more}"
    return VlpromptError(f"unknown {kind} '{name}'; {hint}" + (f" ({see} lists them all)" if see else ""))
