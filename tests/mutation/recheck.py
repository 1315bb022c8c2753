"""Re-check mutmut survivors against the current tests, each on a scratch copy of ``src/``.

mutmut keeps its verdicts in ``mutants/``; after tests were added, this applies each survivor's diff
(``mutmut show NAME``) to a copy of ``src/`` and runs the given tests against it.

    python tests/mutation/recheck.py NAME [NAME ...] -- tests/train/test_trainer_contract.py ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MUTMUT = Path(sys.executable).with_name("mutmut")


def recheck(name: str, tests: list[str]) -> bool:
    """True when the current tests kill mutant ``name``."""
    diff = subprocess.run([str(MUTMUT), "show", name], cwd=REPO, capture_output=True, text=True).stdout
    start = diff.find("--- ")
    if start < 0:
        raise SystemExit(f"{name}: mutmut show gave no diff; run mutmut first")
    with tempfile.TemporaryDirectory(prefix="vlp-recheck-") as tmp:
        shutil.copytree(REPO / "src", Path(tmp) / "src", ignore=shutil.ignore_patterns("__pycache__"))
        patch = subprocess.run(
            ["patch", "-s", "-p0"], cwd=tmp, input=diff[start:], text=True, capture_output=True
        )
        if patch.returncode:
            raise RuntimeError(f"{name}: its diff does not apply to the current src/ (mutmut is stale)")
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode != 0


def main() -> int:
    args = sys.argv[1:]
    if "--" not in args:
        raise SystemExit(__doc__)
    names, tests = args[: args.index("--")], args[args.index("--") + 1 :]
    alive = 0
    for name in names:
        try:
            killed = recheck(name, tests)
        except RuntimeError as e:
            print(f"skipped  {e}", flush=True)
            continue
        alive += not killed
        print(f"{'killed  ' if killed else 'SURVIVED'} {name}", flush=True)
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
