"""The one-line bugs the suite must catch, each applied to a scratch copy of ``src/``.

Four in the engine, trainer and data layer, then one sign / order / index edit per method file, each
of which the pinned-forward tests (``tests/methods/test_pinned_forward.py``) must catch.

For every mutant: copy ``src/`` to a temporary folder, make the one-line edit there (the checkout is
never touched), run the tests that should catch it against the copy, and report the first failing
test and its message.  Exit status 1 when a mutant survives.  ``make mutate`` runs this first.

    python tests/mutation/hand_mutants.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name: (file under src/vlprompt, exact old line text, new text, tests that must fail)
MUTANTS: dict[str, tuple[str, str, str, list[str]]] = {
    "gradient-ascent": (
        "train/trainer.py",
        "                ddp.scale_loss(loss, n, batch).backward()",
        "                (-ddp.scale_loss(loss, n, batch)).backward()",
        ["tests/train/test_learns.py"],
    ),
    "no-train-augmentation": (
        "data/transforms.py",
        "    if train:",
        "    if False:  # train=True returns the test transform",
        ["tests/data/test_augmentation.py"],
    ),
    "prompts-cannot-see-eot": (
        "engine/towers.py",
        "key_valid = torch.arange(length, device=x.device).unsqueeze(0) <= eot.to(x.device).unsqueeze(1)",
        "key_valid = torch.arange(length, device=x.device).unsqueeze(0) < eot.to(x.device).unsqueeze(1)",
        ["tests/engine/test_text_tower_reference.py"],
    ),
    "fewshot-ignores-seed": (
        "data/fewshot.py",
        "    set_seed(seed)",
        "    set_seed(1)  # the seed argument is ignored",
        ["tests/data/test_fewshot_fixture.py"],
    ),
}

PINNED = ["tests/methods/test_pinned_forward.py"]
# one sign / order / index edit per method file (issue 26, item 3); results in docs/testing.md
MUTANTS.update(
    {
        "coop-context-order": (
            "methods/coop.py",
            "        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot)",
            "        return TextInputs(self.prompts.fill(self.ctx.flip(0)), self.prompts.eot)",
            PINNED,
        ),
        "cocoop-bias-sign": (
            "methods/cocoop.py",
            "ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)",
            "ctx = self.ctx.unsqueeze(0) - bias.unsqueeze(1)",
            PINNED,
        ),
        "ivlp-image-options-swapped": (
            "methods/ivlp.py",
            "n_ctx_image=cfg.n_ctx_image, depth_image=cfg.depth_image,",
            "n_ctx_image=cfg.depth_image, depth_image=cfg.n_ctx_image,",
            PINNED,
        ),
        "vpt-prompt-layer-index": (
            "methods/vpt.py",
            "LayerOps(remove=ALL, append=p[i])",
            "LayerOps(remove=ALL, append=p[i - 1])",
            PINNED,
        ),
        "maple-deep-slot-index": (
            "methods/common.py",  # MaPLe's prompts: CoupledDeepPrompts (shared with CoPrompt)
            "LayerOps(replace=t, replace_at=at) for i, t in enumerate(self.compound_prompts_text)",
            "LayerOps(replace=t, replace_at=at + 1) for i, t in enumerate(self.compound_prompts_text)",
            PINNED,
        ),
        "mpl-projection-index": (
            "methods/mpl.py",
            "return self.proj[k * (self.cfg.depth - 1) + layer - 1]",
            "return self.proj[(layer - 1) * self.cfg.add + k]",
            PINNED,
        ),
        "dpl-prompt-layer-index": (
            "methods/dpl.py",
            "remove=ALL, append=self.prompts[layer], blend=blend",
            "remove=ALL, append=self.prompts[layer - 1], blend=blend",
            PINNED,
        ),
        "kgcoop-cosine-sign": (
            "methods/kgcoop.py",
            "kg = 1.0 - cos.mean()",
            "kg = 1.0 + cos.mean()",
            PINNED,
        ),
        "prograd-projection-sign": (
            "methods/prograd.py",
            "p.grad = a - lam * torch.dot(",
            "p.grad = a + lam * torch.dot(",
            PINNED,
        ),
        "promptsrc-l1-weights-swapped": (
            "methods/promptsrc.py",
            "c.text_loss_weight * l1_text + c.image_loss_weight * l1_image",
            "c.image_loss_weight * l1_text + c.text_loss_weight * l1_image",
            PINNED,
        ),
        "zeroshot-template-order": (
            "methods/zeroshot.py",
            '[("text", self.cfg.text or template)]',
            '[("text", template or self.cfg.text)]',
            PINNED,
        ),
        "common-deep-text-layer-index": (
            "methods/common.py",
            "layers = {i + 1: LayerOps(replace=t, replace_at=at) for i, t in enumerate(deep)}",
            "layers = {i: LayerOps(replace=t, replace_at=at) for i, t in enumerate(deep)}",
            PINNED,
        ),
    }
)


def run_mutant(name: str) -> tuple[bool, str]:
    """``(killed, "n failed; first failing test: its first error line")`` for one mutant."""
    rel, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"vlp-mutant-{name}-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        path = src / "vlprompt" / rel
        text = path.read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise SystemExit(f"{name}: line to mutate not (uniquely) in src/vlprompt/{rel}; update MUTANTS")
        path.write_text(text.replace(old, new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return False, "all tests passed"
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    errors = re.findall(r"^E +(\S.*)$", out, flags=re.M)
    first = errors[0] if errors else out.strip().splitlines()[-1]
    return True, f"{len(failed)} failed; {failed[0] if failed else '?'}: {first}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(MUTANTS), metavar="NAME")
    args = ap.parse_args()
    survivors = 0
    for name in args.only or MUTANTS:
        killed, detail = run_mutant(name)
        survivors += not killed
        print(f"{'KILLED ' if killed else 'SURVIVED'} {name}: {detail}", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
