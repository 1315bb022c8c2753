"""Fixtures of the trainer tests: the tiny random backbone and the test-only method ``tinyctx``."""

from __future__ import annotations

import pytest

from vlprompt.backbones import load_backbone


@pytest.fixture(scope="module", autouse=True)
def _tinyctx(tinyctx):
    """Every trainer test may train ``tinyctx`` (registered for the module, removed after it)."""
    yield tinyctx


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("vlp-tiny")
