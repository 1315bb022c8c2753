"""`vlprompt bench suite`: the plan uses the registry's split sizes and the presets' recipes, the projection
multiplies measured costs exactly, the image cache counts each test split once, DPL is labelled."""

from __future__ import annotations

import math

import pytest

from vlprompt.bench import suite as S
from vlprompt.data import get_spec
from vlprompt.train.config import load_preset


def test_plan_follows_registry_and_presets():
    cfg = S.SuiteConfig(methods=["coop", "maple"], datasets=["caltech101", "eurosat"], seeds=[1, 2])
    plan = S.plan_suite(cfg)
    assert len(plan) == 2 * 2 * 2
    row = next(r for r in plan if r["method"] == "maple" and r["dataset"] == "caltech101" and r["seed"] == 1)
    spec = get_spec("caltech101")
    base = math.ceil(spec.num_classes / 2)
    assert row["classes"] == base and row["shots"] == 16 and row["train_images"] == 16 * base
    preset = load_preset("maple")["train"]
    assert row["batch"] == preset["batch_size"] == 4 and row["epochs"] == preset["epochs"]
    assert row["steps"] == preset["epochs"] * (16 * base // 4)
    assert {e["subsample"] for e in row["evaluations"]} == {"base", "new"}
    assert sum(e["images"] for e in row["evaluations"]) == pytest.approx(spec.counts[2], abs=1)


def test_projection_is_the_product_of_measured_costs():
    plan = [
        {
            "method": "m",
            "dataset": "d",
            "seed": s,
            "shots": 2,
            "classes": 10,
            "train_images": 20,
            "batch": 4,
            "epochs": 3,
            "steps": 15,
            "eval_batch": 100,
            "evaluations": [{"dataset": "d", "subsample": "base", "classes": 10, "images": 100}],
        }
        for s in (1, 2)
    ]
    costs = {"m": {"batch": 4, "step_s": {"10": 2.0, "110": 4.0}, "eval_s_per_image": 0.5}}
    assert S.step_seconds(costs["m"], 60) == pytest.approx(3.0)
    assert S.step_seconds(costs["m"], 10) == pytest.approx(2.0)
    p = S.project(plan, costs, decode_s=0.01)
    t = p["by_method"]["m"]
    assert t["runs"] == 2
    assert t["train_h"] * 3600 == pytest.approx(2 * 15 * 2.0)
    assert t["eval_h"] * 3600 == pytest.approx(2 * 100 * 0.5)
    # without the cache every epoch's images and every evaluation decode; with it, each list once
    assert t["decode_h"] * 3600 == pytest.approx(2 * (15 * 4 + 100) * 0.01)
    assert t["decode_cached_h"] * 3600 == pytest.approx(
        (20 + 20 + 100) * 0.01
    )  # 2 seeds' train lists, 1 test
    assert p["total"]["total_h"] == pytest.approx(t["total_h"])


def test_quick_suite_runs_and_labels_dpl(tmp_path):
    cfg = S.SuiteConfig.quick_config(methods=["coop", "dpl"], datasets=["eurosat"], seeds=[1])
    res = S.run_suite(cfg)
    assert res["n_runs"] == 2 and set(res["costs"]) == {"coop", "dpl"}
    assert res["reconstructed_methods"] == ["dpl"] and res["notes"]
    assert all(v > 0 for c in res["costs"].values() for v in c["step_s"].values())
    jpath, mpath = S.write_suite(res, tmp_path)
    md = mpath.read_text()
    assert "dpl (reconstructed)" in md and "What was extrapolated" in md and "Whole suite" in md
    assert jpath.name == "suite-quick.json"


def test_bench_rows_of_dpl_are_labelled_reconstructed():
    from vlprompt.bench import harness
    from vlprompt.methods import get_method

    rows = harness.label_reconstructed([{"method": "dpl"}, {"method": "mpl"}, {"method": "dpl-text"}])
    assert rows[0]["reconstructed"] is True and rows[0]["note"] == get_method("dpl").reconstruction_note
    assert "reconstructed" not in rows[1] and "note" not in rows[1]
    assert rows[2]["reconstructed"] is True
    assert harness._method_cell(rows[0]) == "dpl (reconstructed)" and harness._method_cell(rows[1]) == "mpl"
