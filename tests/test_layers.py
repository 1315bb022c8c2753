"""The layers of docs/architecture.md hold: ``lint-imports`` keeps the contracts in pyproject.toml (layers,
no import circles between the modules of a package), and no module below the command line imports the
package root (``vlprompt/__init__.py`` sits above every layer)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is missing: pip install -e '.[dev]'")
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")


def test_import_contracts_are_kept():
    _need("importlinter")
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found next to this python"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_nothing_below_the_cli_imports_the_package_root():
    _need("grimp")
    import grimp

    graph = grimp.build_graph("vlprompt")
    importers = sorted(
        m for m in graph.find_modules_that_directly_import("vlprompt") if not m.startswith("vlprompt.cli")
    )
    assert importers in ([], ["vlprompt.__main__"]), importers
