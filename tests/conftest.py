"""Shared test fixtures: an offline, isolated environment and the location of ../shared/data."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """No hub access, and caches (demo set, few-shot picks, tensors) in a per-session tmp dir, never ~."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "VLPROMPT_HOME", "VLPROMPT_ATTENTION")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["VLPROMPT_ATTENTION"] = "sdpa"  # timing-independent numerics; the auto probe has its own tests
    os.environ["VLPROMPT_HOME"] = str(tmp_path_factory.mktemp("vlprompt_home"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$VLPROMPT_SHARED_DATA`` or ``<repo>/../shared/data``; skipped when absent, but a failure on CI."""
    path = Path(os.environ.get("VLPROMPT_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        msg = f"../shared/data not found: {path} (set VLPROMPT_SHARED_DATA to its location)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _tinymethod():
    """``tests/train/tinymethod.py`` as the module ``tinymethod`` (one copy, whoever imports it first)."""
    if "tinymethod" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "tinymethod", REPO / "tests" / "train" / "tinymethod.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["tinymethod"] = module
        spec.loader.exec_module(module)
    return sys.modules["tinymethod"]


@pytest.fixture(scope="module")
def tinyctx():
    """The test-only method ``tinyctx`` (CoOp-like, text tower only), registered for one test module."""
    module = _tinymethod()
    with module.registered():
        yield module.TinyCtx


@pytest.fixture(scope="module")
def tiny():
    """The random tiny backbone (a real architecture, 4 layers), one per module; the global RNG is
    seeded as the tests that draw from it after loading expect."""
    from vlprompt.backbones import load_backbone  # after _isolated_env: open_clip reads the hub env

    torch.manual_seed(0)
    return load_backbone("vlp-tiny")
