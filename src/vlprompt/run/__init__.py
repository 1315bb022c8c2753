"""The run layer: the only code that knows a run directory's files (see :mod:`vlprompt.run.layout`).

``train_run`` validates a request, fingerprints it, locks the directory and trains; ``load_run``,
``evaluate_run`` and ``export_run`` use a finished run.  Protocols and the CLI go through here.
"""

from vlprompt.run.backbone import UNTRAINED_BANNER, is_untrained, load_backbone_from
from vlprompt.run.env import environment
from vlprompt.run.identity import differences, request_fingerprint
from vlprompt.run.layout import RunDir, find_runs
from vlprompt.run.load import evaluate_run, export_run, load_prompt, load_run, read_manifest
from vlprompt.run.lock import RunLock
from vlprompt.run.request import RequestRefused
from vlprompt.run.train import (
    build_splits,
    check_request,
    metrics_entry,
    provenance,
    record_metrics,
    save_prompt,
    train_run,
)

__all__ = [
    "UNTRAINED_BANNER",
    "RequestRefused",
    "RunDir",
    "RunLock",
    "build_splits",
    "check_request",
    "differences",
    "environment",
    "evaluate_run",
    "export_run",
    "find_runs",
    "is_untrained",
    "load_backbone_from",
    "load_prompt",
    "load_run",
    "metrics_entry",
    "provenance",
    "read_manifest",
    "record_metrics",
    "request_fingerprint",
    "save_prompt",
    "train_run",
]
