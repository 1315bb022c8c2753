"""The public API: every name in ``vlprompt.__all__`` resolves, the typed imports IDEs read name the same
objects as the ones loaded on first use, and neither ``import vlprompt`` nor building ``vlprompt --help``
imports torch (what makes the command line start in a fraction of a second)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vlprompt


def test_every_public_name_resolves_to_what_the_typed_imports_name():
    tree = ast.parse(Path(vlprompt.__file__).read_text())
    typed: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                typed.update({a.name: imp.module for a in imp.names})
    assert typed == vlprompt._API  # one table: the typed imports and the names loaded on first use
    assert set(vlprompt.__all__) == {*typed, "VlpromptError", "__version__"}
    for name in vlprompt.__all__:
        assert getattr(vlprompt, name) is not None
    from vlprompt.methods import create_model
    from vlprompt.run import train_run

    assert vlprompt.create_model is create_model and vlprompt.train_run is train_run
    assert "load_run" not in vlprompt.__all__  # one way to load a prompt: load_prompt


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, vlprompt\n"
        "assert 'torch' not in sys.modules, 'import vlprompt'\n"
        "from vlprompt.cli.main import build_parser\n"
        "text = build_parser().format_help()\n"
        "assert 'train' in text and 'run' in text\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'numpy', 'PIL') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
