"""A new method is one file (+ one preset): a throwaway method written into a temporary folder, outside
the package, registered when its module is imported, goes through every command without touching
any other file: train -> report -> predict -> export -> predict from the export -> import of a
checkpoint in the official (Dassl) format, declared by the file's ``official`` layout -> config show
(also of the official trainer's YAML, through the entry's ``dassl_trainers`` / ``dassl_keys``) -> bench.
(The package's own methods add one line to the registration list in methods/__init__.py.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch
import yaml
from PIL import Image

import vlprompt
from vlprompt.cli.main import main
from vlprompt.methods import get_method, list_methods, unregister_method

METHOD_FILE = textwrap.dedent(
    '''
    """Throwaway: CoOp-like shared context, for the one-file-method test."""

    from dataclasses import dataclass

    import torch
    from torch import nn

    from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
    from vlprompt.methods.common import ClassPrompts, ctx_segments
    from vlprompt.methods.official import Mapped, OfficialLayout, Signature, need


    def map_official(sd, method):
        """Its (imaginary) official code saves the context as ``throwaway_ctx`` (M, d): n_ctx = M."""
        ctx = need(sd, "throwaway_ctx", method, (2,))
        return Mapped({"ctx": ctx.float()}, {"n_ctx": int(ctx.shape[0])}, {"ctx": "throwaway_ctx"})


    @dataclass
    class ThrowawayConfig(MethodConfig):
        n_ctx: int = opt(2, "learnable context vectors", minimum=1)


    @register_method
    class Throwaway(PromptMethod):
        name = "throwaway"
        display_name = "Throw-Away"
        Config = ThrowawayConfig
        summary = "test-only: a method defined in one file outside the package"
        transductive_note = "throwaway is labelled transductive to check the label reaches every artefact"
        official = OfficialLayout(
            "example/throwaway", "prompt_learner", Signature(has=("throwaway_ctx",)), map_official
        )
        dassl_trainers = ("ThrowAway",)  # its official trainer, and its config's TRAINER.<SECTION> keys
        dassl_keys = {"N_CTX": "n_ctx"}

        def __init__(self, cfg, backbone):
            super().__init__(cfg, backbone)
            self.ctx = nn.Parameter(torch.randn(cfg.n_ctx, backbone.text.width) * 0.02)

        def prepare_text(self, backbone, classnames, template):
            self.prompts = ClassPrompts(backbone, classnames, ctx_segments(self.cfg.n_ctx, "end"))

        def text_inputs(self, image_features=None):
            return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot)

        def objective(self, out, labels):
            # transductive: the run trains it on unlabelled images (labels -1), so no cross-entropy;
            # the entropy of its predictions needs no label
            logp = out.logits.float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()
            return entropy, {"entropy": entropy}
    '''
)
PRESET = "method: throwaway\noptions: {n_ctx: 3}\ntrain: {batch_size: 4, lr: 0.01, epochs: 1}\n"


@pytest.fixture
def throwaway(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "throwaway_method.py").write_text(METHOD_FILE)
    (folder / "presets").mkdir()
    (folder / "presets" / "throwaway.yaml").write_text(PRESET)
    spec = importlib.util.spec_from_file_location("throwaway_method", folder / "throwaway_method.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["throwaway_method"] = module
    try:
        spec.loader.exec_module(module)  # importing the file registers the method
        yield get_method("throwaway")
    finally:
        unregister_method("throwaway")
        sys.modules.pop("throwaway_method", None)


def test_a_method_from_one_file_goes_through_every_command(throwaway, tmp_path, capsys):
    assert "throwaway" in list_methods()
    run = tmp_path / "runs" / "single" / "r"
    args = ["--dataset", "demo", "--shots", "2", "--model", "vlp-tiny", "--no-progress"]
    assert main(["train", "--method", "throwaway", *args, "--out", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["options"] == {"n_ctx": 3}  # the preset beside the file was found through the registry
    assert config["train"]["epochs"] == 1 and config["train"]["batch_size"] == 4
    for name in ("metrics.json", "manifest.json"):  # the entry's transductive note reaches the artefacts
        record = json.loads((run / name).read_text())
        assert record["transductive"] is True and "transductive" in record["transductive_note"]

    report = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(report), "--no-plots"]) == 0
    assert "Throw-Away" in (report / "report.md").read_text()  # the entry's display name

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--format", "json", "--topk", "2", str(image)]) == 0
    from_run = json.loads(capsys.readouterr().out)

    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    capsys.readouterr()
    assert main(["predict", "--run", str(export), "--format", "json", "--topk", "2", str(image)]) == 0
    assert json.loads(capsys.readouterr().out) == from_run  # the exported prompt predicts the same

    # the official code's checkpoint, as Dassl writes it: <learner>/model.pth.tar-N holding
    # {"state_dict", "epoch", "optimizer", "scheduler", "val_result"} (PREC fp32: the tensors as trained)
    trained = vlprompt.load_prompt(run)
    ctx = trained.prompt_state_dict()["ctx"]
    learner = tmp_path / "official" / "prompt_learner"
    learner.mkdir(parents=True)
    checkpoint = {
        "state_dict": {"throwaway_ctx": ctx.clone()},
        "epoch": 1,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0]}]},
        "scheduler": {"last_epoch": 1, "base_lrs": [0.01]},
        "val_result": None,
    }
    torch.save(checkpoint, learner / "model.pth.tar-1")
    imported = tmp_path / "imported"
    argv = ["import", str(learner), "--out", str(imported), "--dataset", "demo", "--model", "vlp-tiny"]
    assert main([*argv, "--pretrained", "none"]) == 0  # the method is detected by its layout's signature
    assert "imported throwaway" in capsys.readouterr().out
    again = vlprompt.load_prompt(imported, backbone=trained.backbone)
    assert again.manifest["imported_from"]["method"] == "detected from the tensor names"
    assert again.manifest["options"] == {"n_ctx": 3}  # read from the tensor's shape by the file's mapping
    size = trained.backbone.preprocess_cfg["size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(pixels), trained(pixels))  # the same logits
    assert main(["predict", "--run", str(imported), "--format", "json", "--topk", "2", str(image)]) == 0
    assert json.loads(capsys.readouterr().out) == from_run

    assert main(["config", "show", "--method", "throwaway"]) == 0
    shown = capsys.readouterr().out
    assert "options.n_ctx" in shown and "learnable context vectors" in shown

    # the official trainer's YAML, as its repository would keep it: the entry maps its keys
    dassl = tmp_path / "configs" / "trainers" / "ThrowAway" / "vit_b16.yaml"
    dassl.parent.mkdir(parents=True)
    dassl.write_text("OPTIM:\n  LR: 0.05\nTRAINER:\n  THROWAWAY:\n    N_CTX: 5\n")
    assert main(["config", "show", "--trainer", "ThrowAway", "--config-file", str(dassl)]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:] if line}
    assert rows["options.n_ctx"] == "5" and rows["train.lr"] == "0.05"

    bench = tmp_path / "bench"
    quick = [
        "--quick",
        "--classes",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--no-reference",
        "--threads",
        "1",
    ]
    names = ["--methods", "throwaway", "--eval-methods", "throwaway", "--memory-methods", "throwaway"]
    assert main(["bench", *quick, *names, "--out", str(bench)]) == 0
    results = json.loads(next(bench.glob("*.json")).read_text())
    assert {r["method"] for r in results["train"]} == {"throwaway"}


def test_the_registration_is_undone(throwaway):
    assert throwaway.preset()["options"] == {"n_ctx": 3}
    unregister_method("throwaway")
    assert "throwaway" not in list_methods()
