"""Reproducible rounding: a run records the attention implementation ``auto`` chose per shape class as
soon as it is chosen, and a resumed run reuses its recorded choices even when the machine's probe now
says otherwise, so the resumed result equals an uninterrupted run with the recorded implementation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlprompt.run import attention as R
from vlprompt.run import train_run
from vlprompt.train.config import resolve_config


def _cfg():
    return resolve_config(
        "vpt",
        "demo",
        shots=2,
        model="vlp-tiny",
        epochs=2,
        overrides=["train.batch_size=4", "train.lr=0.01", "options.n_ctx=2", "options.depth=2"],
    )


def test_resumed_run_reuses_its_recorded_attention(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(R.ENV_FORCE, raising=False)
    answer = {"choice": "plain"}
    probed = []

    def fake_probe(mha, x, ctx):
        probed.append(answer["choice"])
        return {"choice": answer["choice"], "sdpa_ms": 1.0, "plain_ms": 1.0, "torch": torch.__version__}

    monkeypatch.setattr(R, "probe", fake_probe)
    out = tmp_path / "run"
    assert train_run(_cfg(), out, progress=False, stop_after_epoch=1)["status"] == "stopped"
    recorded = json.loads((out / "env.json").read_text())["attention"]
    train_keys = {k for k in recorded["choices"] if "|grad|" in k}
    assert train_keys and all(recorded["choices"][k]["choice"] == "plain" for k in train_keys)
    assert recorded["mode"] == "auto" and probed and set(probed) == {"plain"}

    # the machine's table is gone and its probe now prefers SDPA: the resume keeps the run's own choices
    (tmp_path / "home" / R.PROBE_FILE).unlink()
    answer["choice"] = "sdpa"
    probed.clear()
    res = train_run(_cfg(), out, progress=False)
    assert res["status"] == "trained"
    after = json.loads((out / "env.json").read_text())["attention"]["choices"]
    assert all(after[k]["choice"] == "plain" and after[k]["source"] == "recorded" for k in train_keys)
    assert len(probed) == len(set(after) - set(recorded["choices"]))  # only classes the run never met
    resumed = load_file(out / "prompt.safetensors")

    # the same run uninterrupted, its probe saying plain throughout, gives the same prompt bit for bit
    def uninterrupted(choice: str, name: str) -> dict[str, torch.Tensor]:
        monkeypatch.setenv("VLPROMPT_HOME", str(tmp_path / f"home-{name}"))
        answer["choice"] = choice
        train_run(_cfg(), tmp_path / name, progress=False)
        return load_file(tmp_path / name / "prompt.safetensors")

    plain = uninterrupted("plain", "ref")
    assert resumed.keys() == plain.keys()
    assert all(torch.equal(resumed[k], plain[k]) for k in plain)
    # with the probe's new answer throughout, the run would have rounded otherwise (the choice matters)
    other = uninterrupted("sdpa", "other")
    if all(torch.equal(resumed[k], other[k]) for k in other):
        pytest.skip("sdpa and plain round alike on this machine; the reuse is shown by env.json above")
