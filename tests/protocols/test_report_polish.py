"""Issue 25 item 5: the report reads like a paper's table (each check failed on the report before)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fakeruns import make_run

from vlprompt.protocols import plots
from vlprompt.protocols.report import build_report


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _b2n(runs: Path, method: str, seed: int, base: float, new: float, dataset: str = "caltech101", shots=4):
    return make_run(
        runs, "base2new", method, dataset, shots, seed, {(dataset, "base"): base, (dataset, "new"): new}
    )


def _with_confusion(run: Path, counts_by_eval: list[list[list[int]]], classes: list[str]) -> None:
    m = json.loads((run / "metrics.json").read_text())
    for e, counts in zip(m["evaluations"], counts_by_eval):
        sparse = [[i, j, n] for i, row in enumerate(counts) for j, n in enumerate(row) if n]
        e["confusion"] = {"classes": classes, "counts": sparse}
    (run / "metrics.json").write_text(json.dumps(m))


def test_single_runs_heading_appears_once(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "single", "coop", "eurosat", 4, 1, {("eurosat", "all"): 33.0})
    md = build_report(runs, tmp_path / "out", plots=False).markdown.read_text()
    assert md.count("Single runs") == 1 and "## Single runs" in md


def test_published_columns_for_every_method_with_a_paper_or_a_note(tmp_path):
    runs = tmp_path / "runs"
    for m in ("coop", "kgcoop", "vpt"):
        _b2n(runs, m, 1, 90.0, 70.0)
    res = build_report(runs, tmp_path / "out", reference=True, plots=False)
    comp = _csv(tmp_path / "out" / "base2new_comparison.csv")[0]
    assert "KgCoOp HM (pub.)" in comp and "CoOp HM (pub.)" in comp  # a column for every paper
    assert comp["KgCoOp HM (pub.)"] == "" and float(comp["CoOp HM (pub.)"]) == 95.84 - 2.11  # 93.73
    md = res.markdown.read_text()
    assert "KgCoOp (pub.): no per-data-set number for these data sets" in md
    assert "VPT-deep: no published base-to-new numbers" in md


def test_shots_column_wherever_published_numbers_stand_beside_ours(tmp_path):
    runs = tmp_path / "runs"
    _b2n(runs, "coop", 1, 90.0, 70.0)
    build_report(runs, tmp_path / "out", reference=True, plots=False)
    own = _csv(tmp_path / "out" / "base2new_coop.csv")[0]
    assert own["Shots"] == "4" and own["Shots (pub.)"] == "16"
    comp = _csv(tmp_path / "out" / "base2new_comparison.csv")[0]
    assert comp["Shots"] == "4" and comp["Shots (pub.)"] == "16"
    pub = _csv(tmp_path / "out" / "published_base2new.csv")[0]
    assert pub["Shots (pub.)"] == "16"


def test_most_confused_rows_are_not_repeated_per_seed(tmp_path):
    runs = tmp_path / "runs"
    classes = ["cat", "dog", "fox"]
    counts = [[5, 3, 0], [1, 6, 1], [0, 4, 4]]
    for seed in (1, 2, 3, 4):
        run = make_run(runs, "fewshot", "coop", "demo", 1, seed, {("demo", "all"): 60.0})
        _with_confusion(run, [counts], classes)
    build_report(runs, tmp_path / "out", plots=False)
    rows = _csv(tmp_path / "out" / "most_confused.csv")
    assert len(rows) == 4  # the 4 off-diagonal cells once (not 4 seeds x 4)
    top = rows[0]
    assert (top["True class"], top["Predicted as"], top["images"]) == ("fox", "dog", "16")
    assert float(top["% of true class"]) == 50.0 and top["seeds"] == "1, 2, 3, 4"


def test_no_average_chart_for_one_data_set(tmp_path):
    runs = tmp_path / "runs"
    _b2n(runs, "coop", 1, 90.0, 70.0)
    one = build_report(runs, tmp_path / "one")
    assert [p.name for p in one.plots if p.name.startswith("base2new_")] == ["base2new_Caltech101.png"]
    _b2n(runs, "coop", 1, 80.0, 60.0, dataset="eurosat")
    two = build_report(runs, tmp_path / "two")
    assert "base2new_Average.png" in {p.name for p in two.plots}


def _texts(monkeypatch):
    """Capture the texts matplotlib draws (annotations and titles) of the figures saved."""
    seen: list[dict] = []
    real = plots._save

    def spy(plt, fig, path):
        info = {"suptitle": fig._suptitle.get_text() if fig._suptitle else "", "annotations": []}
        for ax in fig.axes:
            for child in ax.texts:
                info["annotations"].append((child.get_text(), child.get_fontsize(), child.get_rotation()))
        seen.append(info)
        return real(plt, fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def test_bar_labels_are_readable(tmp_path, monkeypatch):
    seen = _texts(monkeypatch)
    data = {"Caltech101": {f"method {i}": {"values": (80.0 + i, 60.0, 68.0)} for i in range(5)}}
    plots.base2new_bars(data, tmp_path)
    labels = seen[0]["annotations"]
    assert len(labels) == 15 and all(size >= 8 for _, size, _ in labels)
    assert all(rot == 90 for _, _, rot in labels)  # five bars to a group: upright, never overlapping


def test_curve_title_says_per_step_only_when_a_per_step_line_is_drawn(tmp_path, monkeypatch):
    seen = _texts(monkeypatch)
    many_steps = [(k / 20, 1.0 - k / 100, float(k)) for k in range(1, 61)]
    few_steps = [(k / 4, 1.0 - k / 10, 10.0 * k) for k in range(1, 9)]  # too few to smooth: drawn as is
    per_epoch = [(1.0, 0.9, 10.0), (2.0, 0.7, 20.0), (3.0, 0.5, 30.0)]
    single = [(1.0, 0.9, 10.0)]
    curves = {"a": {"r": many_steps}, "b": {"r": few_steps}, "c": {"r": per_epoch}, "d": {"r": single}}
    plots.training_curves(curves, tmp_path)
    titles = [s["suptitle"] for s in seen]
    assert titles == ["a (smoothed; faint: per step)", "b (per step)", "c (per epoch)", "d"]


def test_comparison_average_is_over_the_data_sets_every_method_ran(tmp_path):
    """A method run on an extra data set must not get an Average over other data than its neighbours'."""
    runs = tmp_path / "runs"
    _b2n(runs, "coop", 1, 80.0, 60.0, dataset="caltech101")
    _b2n(runs, "coop", 1, 40.0, 20.0, dataset="eurosat")
    _b2n(runs, "kgcoop", 1, 70.0, 70.0, dataset="caltech101")
    res = build_report(runs, tmp_path / "out", plots=False)
    rows = _csv(tmp_path / "out" / "base2new_comparison.csv")
    avg = next(r for r in rows if r["Data set"] == "Average")
    assert float(avg["CoOp Base"]) == 80.0 and float(avg["CoOp New"]) == 60.0  # Caltech101 only
    own = _csv(tmp_path / "out" / "base2new_coop.csv")
    assert float(next(r for r in own if r["Data set"].startswith("Average"))["Base mean"]) == 60.0  # both
    assert "over the 1 data set(s) every method in this table ran (Caltech101)" in res.markdown.read_text()
