"""Protocols: base2new / cross-dataset / dg / fewshot grids, the grid runner, report tables and plots.

``plan_grid`` (pure) -> list of RunSpec; ``execute(spec)`` brings one run to completion (train,
resume, evaluate); ``run_grid`` runs specs sequentially; ``build_report`` writes report.md, CSVs and
PNGs from run-directory files only.
"""

from vlprompt.protocols.grid import PROTOCOLS, Evaluation, RunSpec, plan_grid
from vlprompt.protocols.report import build_report, collect_runs, harmonic_mean, method_label
from vlprompt.protocols.runner import RunResult, execute, run_grid

__all__ = [
    "PROTOCOLS",
    "Evaluation",
    "RunResult",
    "RunSpec",
    "build_report",
    "collect_runs",
    "execute",
    "harmonic_mean",
    "method_label",
    "plan_grid",
    "run_grid",
]
