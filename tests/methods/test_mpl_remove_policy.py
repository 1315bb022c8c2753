"""MPL with remove > present: refused with a one-line reason (the official code drops image patches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "mpl.md"


def test_issue_setting_is_refused_with_the_reason(tiny):
    # the official code accepts N_CTX=1, N_ADD_OP=2, N_RM_OP=2 and slices one image patch away at layer 1
    with pytest.raises(VlpromptError) as e:
        create_model("mpl", tiny, ["cat"], n_ctx=1, add=2, remove=2, depth=3)
    msg = str(e.value)
    assert "\n" not in msg
    assert "remove=2 exceeds the 1 image prompt tokens present before layer 1" in msg
    assert "drop the last 1 image patch token(s)" in msg and "docs/mpl.md" in msg
    with pytest.raises(VlpromptError, match="drop the last 3 image patch"):
        create_model("mpl", tiny, ["cat"], n_ctx=1, add=4, remove=4, depth=2)


def test_removing_exactly_what_is_present_is_accepted(tiny):
    m = create_model("mpl", tiny, ["cat"], n_ctx=2, add=1, remove=2, depth=3).method
    assert m.prompt_counts == [2, 2, 2, 2]
    assert create_model("mpl", tiny, ["cat"], n_ctx=1, add=2, remove="all", depth=3).method.prompt_counts == [
        1,
        2,
        2,
        2,
    ]


def test_docs_argue_the_decision():
    text = DOC.read_text()
    assert "official_remove" in text and "patch" in text and "N_RM_OP" in text
