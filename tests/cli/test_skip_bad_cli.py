"""A corrupt test image in a user's folder: one-line error naming it, or --skip-bad drops it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.cli.main import main
from vlprompt.data import get_dataset


def test_eval_corrupt_image_error_then_skip_bad(tmp_path, capsys):
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    name = f"folder:{root}"
    victim = Path(get_dataset(name).test[0].impath)  # writes the seeded split once
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG header and nothing else

    args = ["eval", "--method", "zeroshot", "--dataset", name, "--model", "vlp-tiny"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and victim.name in err[-1]
    assert not any("Traceback" in ln for ln in err), "\n".join(err)

    assert main(args + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    n_test = len(get_dataset(name).test)
    assert f" {n_test - 1} " in out  # evaluated every test image but the broken one
    assert victim.exists()  # skipping never deletes the user's files


def test_train_refuses_to_discard_an_interrupted_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_bytes(b"x")
    rc = main(["train", "--method", "coop", "--dataset", "demo", "--model", "vlp-tiny", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--resume" in err[-1] and "--force" in err[-1]
    assert (out / "checkpoint" / "state.json").read_bytes() == b"x"  # nothing was overwritten
