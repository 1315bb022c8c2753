"""Plan the experiment grid of a protocol: which runs to train and which evaluations each needs.

Planning is pure (no training, no data loading): :func:`plan_grid` turns the user's choices into a
list of :class:`RunSpec` (a fully resolved run config, the run directory and the evaluations the
protocol needs from it), so the same plan can be shown (``--dry-run``), tested, executed
sequentially or handed to worker processes.

Layout on disk: ``RUNS_DIR/<protocol>/<method>/<dataset>/shots<K>_seed<S>/`` where ``<dataset>`` is
the data set the run is *trained* on (the source, ImageNet, for cross-dataset and DG).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.data import (
    CROSS_DATASET_SOURCE,
    CROSS_DATASET_TARGETS,
    DG_SOURCE,
    DG_TARGETS,
    FEWSHOT_K,
    canonical_name,
)
from vlprompt.data.custom import public_name
from vlprompt.errors import VlpromptError
from vlprompt.run.layout import RunDir
from vlprompt.train.config import RunRequest, preset_protocols, resolve

PROTOCOLS: tuple[str, ...] = ("base2new", "cross-dataset", "dg", "fewshot")

#: subsample the run is trained on, per protocol
TRAIN_SUBSAMPLE: dict[str, str] = {"base2new": "base", "cross-dataset": "all", "dg": "all", "fewshot": "all"}


@dataclass(frozen=True)
class Evaluation:
    """One test-set evaluation a protocol needs from a run: data set and class subsample."""

    dataset: str
    subsample: str  # "all" | "base" | "new"

    def key(self) -> tuple[str, str]:

        return (public_name(self.dataset), self.subsample)  # as metrics.json records it


@dataclass
class RunSpec:
    """One run of a grid: its resolved config, its directory and the evaluations it must hold."""

    protocol: str
    method: str
    dataset: str
    shots: int
    seed: int
    out_dir: Path
    cfg: Any  # RunConfig
    evaluations: list[Evaluation] = field(default_factory=list)
    root: str | None = None  # where evaluate_run finds the target data sets
    force: bool = False  # replace a finished run whose fingerprint differs

    @property
    def name(self) -> str:
        return f"{self.protocol}/{self.method}/{self.dataset}/shots{self.shots}_seed{self.seed}"

    def missing_evaluations(self) -> list[Evaluation]:
        """Evaluations not yet recorded in the run's metrics.json (all of them if there is none)."""
        have = recorded_evaluations(self.out_dir)
        return [e for e in self.evaluations if e.key() not in have]

    @property
    def run(self) -> RunDir:
        return RunDir(self.out_dir)

    def is_trained(self) -> bool:
        return self.run.is_complete()

    def is_complete(self) -> bool:
        """Complete = training finished (``done``) and every needed evaluation is recorded.

        Whether the finished run computed *this* spec's settings is the fingerprint's question
        (:func:`vlprompt.protocols.runner.status`).
        """
        return self.run.is_complete() and not self.missing_evaluations()


def recorded_evaluations(run_dir: str | Path) -> set[tuple[str, str]]:
    """(dataset, subsample) pairs of the test-split evaluations in the run's metrics."""
    return RunDir(run_dir).recorded_evaluations()


def run_dir_name(shots: int | str, seed: int | str) -> str:
    """A run's folder name (strings: placeholders, as in a teacher path's ``shots{shots}_seed{seed}``)."""
    return f"shots{shots}_seed{seed}"


def dataset_slug(name: str) -> str:
    """A directory-safe name for a data set: ``folder:/x/y`` -> ``folder_y_<8 hex>`` (the folder's name
    and a digest of its path, so two folders named alike stay apart and no path is written)."""
    if name.startswith(("folder:", "csv:")):
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{public_name(name).replace(':', '_', 1)}_{digest}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]


def canonical_dataset(name: str) -> str:
    """Registry spelling of a data set name; ``folder:``/``csv:`` data sets pass through unchanged."""
    if name.startswith(("folder:", "csv:")):
        return name

    return canonical_name(name)


def parse_list(text: str | Sequence[Any] | None, kind: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """Parse a comma-separated CLI list (``"1,2,3"``) with a one-line error naming the bad item."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        try:
            out.append(cast(item))
        except ValueError:
            raise VlpromptError(f"bad {kind} '{item}' in '{text}'; give a comma-separated list") from None
    if not out:
        raise VlpromptError(f"empty {kind} list; give a comma-separated list")
    return list(dict.fromkeys(out))  # dedupe, keep order


def preset_protocol(method: str, protocol: str) -> str:
    """The preset section a protocol trains with.

    DG evaluates the ImageNet model trained with the cross-dataset recipe (as MaPLe, MPL and
    PromptSRC do), so it uses the preset's ``cross-dataset`` overrides unless the preset defines
    its own ``dg`` section.
    """
    if protocol != "dg":
        return protocol

    return "dg" if "dg" in preset_protocols(method) else "cross-dataset"


def resolve_run_config(request: Any, protocol: str) -> Any:
    """One run's fully resolved RunConfig: ``request`` (a ``RunRequest``) under ``protocol``'s recipe."""

    cfg = resolve(
        request.but(subsample=TRAIN_SUBSAMPLE[protocol], protocol=preset_protocol(request.method, protocol))
    )
    cfg.protocol = protocol
    return cfg


@dataclass(frozen=True)
class GridRequest:
    """What a grid command asks: ``protocol`` over methods x data sets x shots x seeds under ``runs_dir``.

    ``datasets`` are the data sets trained on for base2new / fewshot and the *targets* for
    cross-dataset / DG (default: the protocol's standard targets; ``source`` defaults to ImageNet).
    ``shots`` defaults to 16 (1, 2, 4, 8, 16 for fewshot).  ``run`` is the request every run shares
    (root, model, weights, ``--config``, ``--set``, epochs, device, workers); the grid sets its method,
    data set, shots, seed, subsample and protocol per run.  Default: ``RunRequest(methods[0])``.
    """

    protocol: str
    methods: Sequence[str]
    datasets: Sequence[str] | None
    seeds: Sequence[int]
    runs_dir: str | Path
    shots: Sequence[int] | None = None
    source: str | None = None
    run: RunRequest | None = None


def plan_grid(grid: GridRequest, resolve: Callable[..., Any] = resolve_run_config) -> list[RunSpec]:
    """Every run of ``grid`` (a :class:`GridRequest`), each with its resolved RunConfig.

    Nothing is read or written except the method presets (``resolve``).
    """

    protocol, source = grid.protocol, grid.source
    if protocol not in PROTOCOLS:
        raise VlpromptError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    methods = list(dict.fromkeys(grid.methods))
    seeds = [int(s) for s in grid.seeds]
    if not methods:
        raise VlpromptError("no method given; pass --method M[,M2,...]")
    if not seeds:
        raise VlpromptError("no seed given; pass --seeds 1,2,3")
    shots = [int(k) for k in grid.shots] if grid.shots else ([*FEWSHOT_K] if protocol == "fewshot" else [16])
    if any(k < 1 for k in shots):
        raise VlpromptError(f"shots must be >= 1, got {shots}")
    datasets = [canonical_dataset(d) for d in (grid.datasets or [])]

    if protocol in ("cross-dataset", "dg"):
        default_source = CROSS_DATASET_SOURCE if protocol == "cross-dataset" else DG_SOURCE
        train_sets = [canonical_dataset(source or default_source)]
        targets = datasets or list(CROSS_DATASET_TARGETS if protocol == "cross-dataset" else DG_TARGETS)
    else:
        if not datasets:
            raise VlpromptError(f"protocol {protocol} needs --datasets D1,D2 (see `vlprompt data list`)")
        if source:
            raise VlpromptError(f"--source applies to cross-dataset and dg only, not {protocol}")
        train_sets, targets = datasets, []

    request = grid.run or RunRequest(methods[0])  # the template (method, data set, shots, seed per run)
    root = request.root
    runs_dir = Path(grid.runs_dir)
    specs: list[RunSpec] = []
    for method in methods:
        for dataset in train_sets:
            for k in shots:
                for seed in seeds:
                    cfg = resolve(request.but(method=method, dataset=dataset, shots=k, seed=seed), protocol)
                    if protocol == "base2new":
                        evals = [Evaluation(dataset, "base"), Evaluation(dataset, "new")]
                    elif protocol == "fewshot":
                        evals = [Evaluation(dataset, "all")]
                    else:  # the source's own test set plus every target's full test set
                        evals = [Evaluation(dataset, "all")]
                        evals += [Evaluation(t, "all") for t in targets if t != dataset]
                    out_dir = runs_dir / protocol / method / dataset_slug(dataset) / run_dir_name(k, seed)
                    specs.append(RunSpec(protocol, method, dataset, k, seed, out_dir, cfg, evals, root))
    return specs
