"""Per-shot and per-data-set epoch tables of the presets (CoOp's official schedule)."""

import re

import pytest

from vlprompt.errors import VlpromptError
from vlprompt.train.config import resolve_config


def test_coop_epochs_follow_shots_and_imagenet():
    epochs = {k: resolve_config("coop", "caltech101", shots=k).train.epochs for k in (1, 2, 4, 8, 16)}
    assert epochs == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    assert resolve_config("coop", "imagenet", shots=16).train.epochs == 50
    # an explicit --set train.epochs wins over both tables, --epochs over everything
    assert resolve_config("coop", "imagenet", shots=16, overrides=["train.epochs=7"]).train.epochs == 7
    assert resolve_config("coop", "imagenet", shots=16, epochs=3).train.epochs == 3


def test_an_epochs_table_below_one_is_refused_when_the_config_is_built():
    """The tables set train.epochs after its own check: their values are checked as train.epochs is
    (a table of {1: -3} trained nothing and ended in a traceback when the run was recorded)."""
    bad = {
        "train.epochs_by_shots={1: -3}": "train.epochs_by_shots[1]=-3 is invalid; it must be an integer >= 1",
        "train.epochs_by_shots={1: 0}": "train.epochs_by_shots[1]=0 is invalid",
        "train.epochs_by_dataset={caltech101: 0}": "train.epochs_by_dataset[caltech101]=0 is invalid",
    }
    for override, message in bad.items():
        with pytest.raises(VlpromptError, match=re.escape(message)):
            resolve_config("coop", "caltech101", shots=1, overrides=[override])
    assert (
        resolve_config("coop", "caltech101", shots=1, overrides=["train.epochs_by_shots={1: 3}"]).train.epochs
        == 3
    )
