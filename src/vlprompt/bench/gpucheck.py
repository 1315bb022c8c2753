"""One prepared GPU check (``benchmarks/gpu/check.sh``): everything the CUDA paths promise, in one run.

Sections (each a pass/fail record with its numbers; the exit status is 1 if any failed):

1. **logits** -- CUDA vs CPU logits for every registered method on identical weights, prompts and
   images: fp32 (TF32 off) within ``FP32_TOL``, bf16 / fp16 autocast within ``HALF_TOL`` (max |delta
   logit|; logits are ``logit_scale`` x cosine, so 100 x the cosine error), and no top-1 flip on a
   row whose CPU top-1 margin exceeds twice that error (top-1 agreement overall is reported);
2. **train** -- a few training steps with ``fit`` under bf16, and fp16 with its GradScaler: losses
   finite, prompts changed, CLIP untouched;
3. **ddp** -- a 1-process ``torchrun`` training run (nccl on CUDA, gloo on CPU) that writes ``done``;
4. **bench** -- ``vlprompt bench`` at the official batch sizes for every trained method, evaluation at
   batch 100 (images/s), memory at 1000 classes for MaPLe, MPL, DPL; ``torch.compile`` on/off for MPL;
5. **suite** -- the base-to-new suite projection (``vlprompt bench suite``).

``--dry`` runs the same code on the CPU with the tiny model (fp16 and torch.compile are skipped there
and say so), so CI keeps the script from rotting; it never writes under ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlprompt.backbones import load_backbone
from vlprompt.bench.harness import BenchConfig, run_bench
from vlprompt.bench.measure import device_info
from vlprompt.bench.models import build_model
from vlprompt.bench.results import write_results
from vlprompt.bench.suite import SuiteConfig, run_suite, write_suite
from vlprompt.errors import VlpromptError
from vlprompt.methods import bench_methods, list_methods
from vlprompt.run import RunDir
from vlprompt.train import fit
from vlprompt.train.config import RunConfig
from vlprompt.train.precision import resolve_precision
from vlprompt.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FP32_TOL = 1e-3  # max |delta logit| CUDA fp32 vs CPU fp32 (logit_scale 100: 1e-5 in cosine)
HALF_TOL = {"bf16": 1.0, "fp16": 0.25}  # max |delta logit| under autocast vs CPU fp32
TRAIN_STEPS = 3


def _record(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = fn()
        ok = bool(out.pop("ok", True))
        rec = {"check": name, "ok": ok, **out}
    except Exception as e:  # one broken section must not hide the others' results
        rec = {"check": name, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        log.debug("%s failed:\n%s", name, traceback.format_exc())
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("%-8s %s (%.1f s)", name, "ok" if rec["ok"] else "FAILED", rec["seconds"])
    return rec


# ----------------------------------------------------------------------------------------- sections
def check_logits(model: str, device: torch.device, methods: list[str], dry: bool) -> dict[str, Any]:
    """CUDA vs CPU logits per method and precision."""

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_bb = load_backbone(model, device="cpu")
    dev_bb = load_backbone(model, device=device)  # seeded random init: the same weights
    size = cpu_bb.preprocess_cfg["size"]
    images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    precisions = ["fp32", "bf16"] + ([] if device.type == "cpu" else ["fp16"])
    rows, ok = [], True
    for m in methods:
        torch.manual_seed(0)
        ref_model = build_model(m, cpu_bb, 10, "fast").eval()
        dev_model = build_model(m, dev_bb, 10, "fast").eval()
        dev_model.load_prompt_state_dict({k: v.to(device) for k, v in ref_model.prompt_state_dict().items()})
        with torch.no_grad():
            ref = ref_model(images).float()
            for p in precisions:
                with resolve_precision(p, device).autocast():
                    got = dev_model(images.to(device)).float().cpu()
                diff = float((got - ref).abs().max())
                agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
                tol = FP32_TOL if p == "fp32" else HALF_TOL[p]
                # top-1 agreement is reported, not judged: random-weight logits are nearly tied, so a
                # flip there says nothing; only rows whose CPU margin exceeds 2x the error must agree
                top2 = ref.topk(2, dim=-1).values
                sure = (top2[:, 0] - top2[:, 1]) > 2 * diff
                flips = int(((got.argmax(-1) != ref.argmax(-1)) & sure).sum())
                good = diff <= tol and flips == 0
                ok &= good
                rows.append(
                    {
                        "method": m,
                        "precision": p,
                        "max_abs_diff": diff,
                        "top1_agree": agree,
                        "confident_flips": flips,
                        "tolerance": tol,
                        "ok": good,
                    }
                )
    skipped = [] if "fp16" in precisions else ["fp16 (autocast fp16 needs CUDA)"]
    same_device = "CPU vs CPU (dry run: no GPU)" if device.type == "cpu" else f"{device} vs CPU"
    return {"ok": ok, "compared": same_device, "rows": rows, "skipped": skipped}


def check_train(model: str, device: torch.device, dry: bool) -> dict[str, Any]:
    """A few fit() steps under bf16 and fp16 + GradScaler; losses finite, prompts moved, CLIP frozen."""
    bb = load_backbone(model, device=device)
    size = bb.preprocess_cfg["size"]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, size, size, generator=g), i % 4) for i in range(4 * TRAIN_STEPS)]
    precisions = ["bf16"] + ([] if device.type == "cpu" else ["fp16"])
    rows, ok = [], True
    for method in ("coop", "maple"):
        for p in precisions:
            m = build_model(method, bb, 4, "fast")
            before = {k: v.detach().clone() for k, v in m.prompt_state_dict().items()}
            clip_before = sum(float(t.float().sum()) for t in bb.clip.parameters())
            cfg = RunConfig.from_dict(
                {
                    "method": method,
                    "train": {
                        "batch_size": 4,
                        "epochs": 1,
                        "lr": 0.01,
                        "precision": p,
                        "device": str(device),
                        "eval_batch_size": 4,
                    },
                },
                partial=True,
            )
            res = fit(m, data, cfg, progress=False)
            after = m.prompt_state_dict()
            moved = any(not torch.equal(before[k], after[k].detach()) for k in before)
            finite = all(bool(torch.isfinite(v).all()) for v in after.values())
            frozen = sum(float(t.float().sum()) for t in bb.clip.parameters()) == clip_before
            good = moved and finite and frozen
            ok &= good
            rows.append(
                {
                    "method": method,
                    "precision": p,
                    "steps": TRAIN_STEPS,
                    "prompts_moved": moved,
                    "finite": finite,
                    "clip_frozen": frozen,
                    "scaler": p == "fp16",
                    "epochs_done": res.get("epochs_done"),
                    "ok": good,
                }
            )
    skipped = [] if "fp16" in precisions else ["fp16 + GradScaler (needs CUDA)"]
    return {"ok": ok, "rows": rows, "skipped": skipped}


def check_ddp(model: str, device: torch.device, work: Path) -> dict[str, Any]:
    """``torchrun --nproc_per_node 1 -m vlprompt train`` on the demo set: nccl on CUDA, gloo on CPU."""
    out = work / "ddp-run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "vlprompt",
        "train",
        "--method",
        "coop",
        "--dataset",
        "demo",
        "--shots",
        "2",
        "--model",
        model,
        "--epochs",
        "1",
        "--set",
        "train.batch_size=4",
        "--device",
        "cuda" if device.type == "cuda" else "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    # a 1-process job joins a real process group (nccl / gloo) instead of skipping it
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "VLPROMPT_DIST_FORCE": "1",
    }
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)

    full_log = p.stdout + p.stderr
    log_text = full_log[-4000:]
    backend = "nccl" if device.type == "cuda" else "gloo"
    return {
        "ok": p.returncode == 0 and RunDir(out).is_complete(),
        "backend": backend,
        "returncode": p.returncode,
        "backend_logged": f"backend {backend}" in full_log,
        "tail": log_text[-800:],
    }


def check_bench(model: str, device: torch.device, dry: bool, work: Path) -> dict[str, Any]:
    """Bench at official batch sizes (+ evaluation at batch 100, memory at 1000 classes), compile on/off."""
    if dry:
        cfg = BenchConfig.quick_config(
            device=str(device),
            methods=["coop", "mpl", "dpl"],
            eval_methods=["mpl"],
            memory_methods=["maple", "mpl", "dpl"],
            reference=False,
            text_lengths=[8],
        )
    else:
        cfg = BenchConfig(
            model=model,
            methods=bench_methods(),
            classes=[100],
            eval_methods=["zeroshot", *bench_methods()],
            eval_images=200,
            eval_batch=100,
            image_batch=32,
            memory_methods=["maple", "mpl", "dpl"],
            memory_classes=1000,
            repeats=3,
            warmup=2,
            profile=False,
            device=str(device),
        )
    res = run_bench(cfg)
    out: dict[str, Any] = {"results": res}
    if dry:
        out["compile"] = {"skipped": "torch.compile on/off runs on a GPU only (minutes on CPU)"}
    else:
        cc = BenchConfig(
            model=model,
            methods=["mpl"],
            classes=[100],
            eval_methods=["mpl"],
            eval_images=200,
            eval_batch=100,
            memory_classes=0,
            repeats=3,
            warmup=3,
            profile=False,
            reference=False,
            device=str(device),
            compile=True,
        )
        on = run_bench(cc)
        off_rows = {(r["method"], r["variant"]): r for r in res["train"]}
        out["compile"] = {
            "train": [
                {
                    "method": r["method"],
                    "ms_compiled": r["ms_per_step"],
                    "ms_eager": off_rows.get((r["method"], r["variant"]), {}).get("ms_per_step"),
                }
                for r in on["train"]
            ],
            "eval": [{"method": r["method"], "images_per_s_compiled": r["images_per_s"]} for r in on["eval"]],
        }
    mem = [r for r in res["memory"] if r.get("classes")]
    out["ok"] = bool(res["train"]) and all(r["ms_per_step"] > 0 for r in res["train"]) and len(mem) >= 3
    return out


def check_suite(model: str, device: torch.device, dry: bool) -> dict[str, Any]:
    if dry:
        cfg = SuiteConfig.quick_config(
            device=str(device), datasets=["caltech101", "eurosat"], seeds=[1], methods=["coop", "mpl"]
        )
    else:
        cfg = SuiteConfig(
            model=model, device=str(device), repeats=3, warmup=2, eval_images=100, eval_batch=100
        )
    res = run_suite(cfg)
    total = res["projection"]["total"]
    return {
        "ok": total.get("total_h", 0) > 0,
        "results": res,
        "total_h": total.get("total_h"),
        "total_cached_h": total.get("total_cached_h"),
    }


# ----------------------------------------------------------------------------------------- driver
def run_check(dry: bool, out_dir: Path | None = None, model: str | None = None) -> dict[str, Any]:
    if dry:
        device, model = torch.device("cpu"), model or "vlp-tiny"
    else:
        if not torch.cuda.is_available():
            raise VlpromptError("no CUDA device visible; run benchmarks/gpu/check.sh --dry for the CPU check")
        device, model = torch.device("cuda"), model or "ViT-B-16"
    info = device_info(device)
    out = (
        Path(out_dir)
        if out_dir
        else (
            Path(tempfile.mkdtemp(prefix="vlp-gpucheck-"))
            if dry
            else Path("benchmarks/results") / info["slug"]
        )
    )
    t0 = time.perf_counter()
    methods = [m for m in list_methods() if m != "zeroshot"] + ["zeroshot"]
    with tempfile.TemporaryDirectory(prefix="vlp-gpucheck-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("VLPROMPT_HOME", str(work / "home"))
        checks = [
            _record("logits", lambda: check_logits(model, device, methods, dry)),
            _record("train", lambda: check_train(model, device, dry)),
            _record("ddp", lambda: check_ddp(model, device, work)),
            _record("bench", lambda: check_bench(model, device, dry, work)),
            _record("suite", lambda: check_suite(model, device, dry)),
        ]
    res = {
        "kind": "gpu-check",
        "dry": dry,
        "model": model,
        "device": info,
        "ok": all(c["ok"] for c in checks),
        "wall_s": round(time.perf_counter() - t0, 1),
        "tolerances": {"fp32": FP32_TOL, **HALF_TOL, "flips": "none beyond 2x the error margin"},
        "checks": checks,
    }
    out.mkdir(parents=True, exist_ok=True)
    bench = next((c for c in checks if c["check"] == "bench" and "results" in c), None)
    suite = next((c for c in checks if c["check"] == "suite" and "results" in c), None)
    if bench is not None:
        bench_res = bench.pop("results")
        if not dry:
            write_results(bench_res, out)
        bench["summary"] = {"targets": bench_res.get("targets"), "memory": bench_res.get("memory")}
    if suite is not None:
        suite_res = suite.pop("results")
        if not dry:
            write_suite(suite_res, out)

    atomic_write_json(out / ("gpu-check-dry.json" if dry else "gpu-check.json"), res)
    atomic_write_text(out / ("gpu-check-dry.md" if dry else "gpu-check.md"), render(res))
    res["out"] = str(out)
    return res


def render(res: dict[str, Any]) -> str:
    lines = [
        f"# GPU check{' (dry run on CPU, tiny model)' if res['dry'] else ''}: {res['device'].get('name')}",
        "",
        f"Model {res['model']} (random weights: numerics and timing only), {res['wall_s']} s, "
        f"overall **{'ok' if res['ok'] else 'FAILED'}**.",
        "",
    ]
    for c in res["checks"]:
        lines.append(f"## {c['check']}: {'ok' if c['ok'] else 'FAILED'} ({c['seconds']} s)")
        if "error" in c:
            lines.append(f"\nerror: {c['error']}")
        for r in c.get("rows", []):
            lines.append(f"- {json.dumps(r)}")
        for s in c.get("skipped", []):
            lines.append(f"- skipped: {s}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu/check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="CPU + tiny model: the same code, for CI")
    p.add_argument("--out", help="results folder (default benchmarks/results/<gpu>; --dry: a temp folder)")
    p.add_argument("--model", help="backbone (default ViT-B-16; --dry: vlp-tiny)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run_check(args.dry, Path(args.out) if args.out else None, args.model)
    print(render(res))
    print(f"wrote {res['out']}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
