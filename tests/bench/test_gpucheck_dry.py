"""`benchmarks/gpu/check.sh --dry`: the GPU check's own code on CPU with the tiny model, in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_mode_passes(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "VLPROMPT_HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.run(
        [str(REPO / "benchmarks" / "gpu" / "check.sh"), "--dry", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads((tmp_path / "gpu-check-dry.json").read_text())
    assert res["dry"] and res["ok"] and res["model"] == "vlp-tiny"
    checks = {c["check"]: c for c in res["checks"]}
    assert list(checks) == ["logits", "train", "ddp", "bench", "suite"]
    assert all(c["ok"] for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    methods = {r["method"] for r in checks["logits"]["rows"]}
    assert {"coop", "cocoop", "maple", "mpl", "dpl", "zeroshot"} <= methods
    assert all(r["max_abs_diff"] == 0.0 for r in checks["logits"]["rows"] if r["precision"] == "fp32")
    assert checks["ddp"]["backend"] == "gloo" and checks["ddp"]["backend_logged"]
    assert "fp16 + GradScaler (needs CUDA)" in checks["train"]["skipped"]
    assert (tmp_path / "gpu-check-dry.md").is_file() and not (
        REPO / "benchmarks/results/cpu-gpu-check"
    ).exists()
