"""Fixtures of the method tests: the random tiny backbone (real architecture, 4 layers), one per module."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import load_backbone


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("vlp-tiny")
