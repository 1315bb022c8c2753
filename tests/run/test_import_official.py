"""`vlprompt import` on checkpoints written by the official code itself (tests/fixtures/official).

Each fixture was made by ``tests/fixtures/official/make_official_checkpoints.py``: the official
repository's own trainer built its model, trained through the recipe's warm-up epoch and saved with
its own ``save_model`` (Dassl's nested warm-up scheduler and optimizer state included); its logits on
fixed images are stored beside.  Here each is imported and must give those logits.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import vlprompt
from vlprompt import torchfile
from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError
from vlprompt.run import dassl_import

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "official"
CASES = sorted(p.name for p in FIX.iterdir() if (p / "meta.json").is_file())
PETS = "a photo of a {}, a type of pet."  # the OxfordPets template every fixture was trained with
TOL = 1e-5  # official fp32 CPU vs ours: measured max |diff| <= 1.7e-6 (see docs/import.md)


def _meta(case: str) -> dict:
    return json.loads((FIX / case / "meta.json").read_text())


@pytest.fixture(scope="module")
def micro():
    open_clip.add_model_config(str(FIX / "official-micro.json"))
    b = vlprompt.load_backbone("official-micro", init_seed=0)
    # the fixtures were made on this random CLIP: a checkpoint's frozen text tower must be it
    sd = torchfile.read(FIX / "ivlp" / _meta("ivlp")["checkpoint"]).obj["state_dict"]
    same = torch.equal(sd["text_encoder.text_projection"], b.clip.state_dict()["text_projection"])
    assert same, "open_clip's random init changed: re-make the fixtures (tests/fixtures/official/README.md)"
    return b


@pytest.fixture(scope="module")
def images():
    u8 = load_file(str(FIX / "images.safetensors"))["images"]
    return (u8.float() / 255 - 0.45) / 0.27  # as make_official_checkpoints.images_from_bytes


def test_every_method_family_has_a_fixture():
    methods = {_meta(c)["method"] for c in CASES}
    assert methods == {
        "coop",
        "cocoop",
        "ivlp",
        "vpt",
        "maple",
        "mpl",
        "kgcoop",
        "prograd",
        "promptsrc",
        "mma",
        "tcp",
    }


@pytest.mark.parametrize("case", CASES)
def test_warmup_checkpoint_is_what_torch_refuses_and_we_read(case):
    path = FIX / case / _meta(case)["checkpoint"]
    with pytest.raises(pickle.UnpicklingError):  # torch's weights-only reader stops at these globals
        torch.load(path, weights_only=True)
    ck = torchfile.read(path)
    sched = ck.obj["scheduler"]  # Dassl's ConstantWarmupScheduler.state_dict(): its successor inside
    assert sched["successor"].stub_name == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert {"torch.optim.sgd.SGD", "torch.optim.adam.Adam"} & set(ck.stubs) and ck.obj[
        "epoch"
    ] == 2  # TCP: Adam


@pytest.mark.parametrize("case", CASES)
def test_official_checkpoint_gives_the_official_logits(case, micro, images):
    meta = _meta(case)
    path = FIX / case / meta["checkpoint"]
    imp = dassl_import.import_checkpoint(path)  # ProGrad: CoOp tensors + frozen words CoOp never keeps
    assert imp.method == meta["method"] and imp.epoch == 2
    opts = meta.get("vlprompt_options", {})  # what no tensor records and the case changed (TCP's block)
    model = dassl_import.build_model(imp, micro, meta["classnames"], template=PETS, **opts).eval()
    want = load_file(str(FIX / case / "official_logits.safetensors"))["logits"]
    with torch.no_grad():
        got = model(images)
    diff = (got - want).abs().max().item()
    print(f"{case}: max |logit diff| {diff:.3g}")
    assert diff < TOL


def test_coop_and_prograd_alike_are_refused_with_the_candidates(tmp_path):
    ck = torchfile.read(FIX / "prograd_n16" / _meta("prograd_n16")["checkpoint"]).obj
    sd = {"ctx": ck["state_dict"]["ctx"], "token_suffix": torch.randn(3, 60, 64)}  # no frozen words
    torch.save({"state_dict": sd, "epoch": 2}, tmp_path / "model.pth.tar-2")  # no val_result either
    with pytest.raises(VlpromptError, match="fit coop and prograd alike.*--method coop or --method prograd"):
        dassl_import.import_checkpoint(tmp_path / "model.pth.tar-2")
    assert dassl_import.import_checkpoint(tmp_path / "model.pth.tar-2", "prograd").method == "prograd"
    torch.save({"state_dict": sd, "epoch": 2, "val_result": None}, tmp_path / "model.pth.tar-2")
    assert dassl_import.import_checkpoint(tmp_path / "model.pth.tar-2").method == "coop"  # original Dassl


def test_prograd_frozen_words_come_from_the_data_set_or_are_refused(micro, images):
    meta = _meta("prograd")  # OxfordPets: "a type of pet, a photo of a" in 8 slots, "a" stays frozen
    imp = dassl_import.import_checkpoint(FIX / "prograd" / meta["checkpoint"])
    assert imp.frozen_tokens == 1 and imp.ctx_tokens == 8
    want = load_file(str(FIX / "prograd" / "official_logits.safetensors"))["logits"]
    phrase = dassl_import.build_model(imp, micro, meta["classnames"], ctx_init="a type of pet, a photo of a")
    with torch.no_grad():
        assert (phrase.eval()(images) - want).abs().max() < TOL
    with pytest.raises(VlpromptError, match="keeps 1 frozen word token.*keeps 0.*ctx_init=PHRASE"):
        dassl_import.build_model(imp, micro, meta["classnames"])  # no data set: the words would be dropped
    with pytest.raises(VlpromptError, match="1 frozen word token.* differ .*same CLIP, other words"):
        dassl_import.build_model(imp, micro, meta["classnames"], ctx_init="a type of dog, a photo of the")


def test_frozen_words_of_maple_ivlp_promptsrc_are_read_from_the_suffix():
    for case in ("maple", "ivlp", "promptsrc"):
        imp = dassl_import.import_checkpoint(FIX / case / _meta(case)["checkpoint"])
        assert imp.ctx_tokens == 2 and imp.frozen_tokens == 2  # "a photo" learnt, "of a" frozen
        assert imp.options["ctx_init"] == "a photo of a"


def test_cli_import_records_the_detected_method(tmp_path, micro, images, capsys):
    meta = _meta("promptsrc")
    out = tmp_path / "imported"
    args = ["import", str(FIX / "promptsrc"), "--out", str(out), "--model", "official-micro", "--pretrained",
            "none", "--classes", ",".join(meta["classnames"])]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert "imported promptsrc" in capsys.readouterr().out
    loaded = vlprompt.load_prompt(out, backbone=micro)
    assert loaded.manifest["method"] == "promptsrc"
    want = load_file(str(FIX / "promptsrc" / "official_logits.safetensors"))["logits"]
    with torch.no_grad():
        assert (loaded(images) - want).abs().max() < TOL
    fewer = ["--classes", ",".join(meta["classnames"][:2]), "--out", str(tmp_path / "fewer")]
    assert main([*args[:-2], *fewer]) == 0  # shared context transfers to other classes: said, not refused
    err = capsys.readouterr().err
    n = len(meta["classnames"])
    assert f"the checkpoint was trained on {n} classes (its token_prefix has {n} rows), 2 class names" in err


def test_cli_import_refusals_are_one_line(tmp_path, micro, capsys):
    meta = _meta("prograd")
    base = ["import", str(FIX / "prograd"), "--out", str(tmp_path / "p"), "--model", "official-micro",
            "--pretrained", "none", "--classes", ",".join(meta["classnames"])]  # fmt: skip
    for extra, msg in (
        (["--option", "n_ctx=abc"], "n_ctx='abc': prograd's n_ctx takes int"),
        (["--method", "prograd", "--option", "nope=1"], "prograd has no option 'nope'"),
        ([], "keeps 1 frozen word token"),  # no --dataset: ProGrad's phrase unknown
    ):
        assert main(base + extra) != 0
        err = capsys.readouterr().err.strip()
        assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err


_PL = "prompt_learner."
DAMAGED = {
    "ctx 1-D": ({"ctx": torch.randn(4)}, r"'ctx' has shape \(4,\); a coop checkpoint holds a 2-D or 3-D"),
    "ctx of bools": ({"ctx": torch.zeros(4, 8, dtype=torch.bool)}, "holds torch.bool values, not weights"),
    "meta-net 1-D": (
        {
            "ctx": torch.randn(4, 8),
            "meta_net.linear1.weight": torch.zeros(8),
            "meta_net.linear2.weight": torch.zeros(8),
        },
        "'meta_net.linear1.weight' has shape \\(8,\\); a cocoop checkpoint holds a 2-D",
    ),
    "deep prompts with a gap": (
        {
            _PL + "ctx": torch.randn(2, 8),
            "text_encoder.transformer.resblocks.2.VPT_shallow": torch.randn(2, 8),
        },
        "layers \\[2\\] are not consecutive",
    ),
    "MPL projection names": (
        {
            _PL + "ctx": torch.randn(1, 8),
            _PL + "proj.weight": torch.randn(8, 8),
            _PL + "proj.bias": torch.randn(8),
        }
        | {_PL + "txt2img_proj.x.0.weight": torch.randn(2)},
        "not named txt2img_proj",
    ),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_checkpoints_are_one_line(tmp_path, name):
    sd, msg = DAMAGED[name]
    torch.save(
        {"state_dict": {1: torch.zeros(1), **sd}, "epoch": 1, "val_result": None}, tmp_path / "m.pth.tar-1"
    )
    with pytest.raises(VlpromptError, match=msg) as e:
        dassl_import.import_checkpoint(tmp_path / "m.pth.tar-1")
    assert "\n" not in str(e.value)


def _as_torch1_zip(src: Path, dest: Path) -> None:
    """The zip layout torch 1.6-1.13 wrote: entries under the file's own name, no byteorder or
    serialization id (torch 2 writes ``archive/`` and both)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rest = info.filename.split("/", 1)[1]
            if rest in ("byteorder", ".data/serialization_id"):
                continue
            zout.writestr(f"{dest.name}/{rest}", zin.read(info))


@pytest.mark.parametrize("case", ["coop", "maple"])
@pytest.mark.parametrize("layout", ["torch1-zip", "legacy"])
def test_older_torch_file_layouts_give_the_same_logits(tmp_path, case, layout, micro, images):
    meta = _meta(case)
    src = FIX / case / meta["checkpoint"]
    dest = tmp_path / meta["checkpoint"]
    dest.parent.mkdir(parents=True)
    if layout == "legacy":  # torch < 1.6; our own fixture, so plain unpickling is safe here
        obj = torch.load(src, weights_only=False)
        torch.save(obj, dest, _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(dest)
    else:
        _as_torch1_zip(src, dest)
    imp = dassl_import.import_checkpoint(dest)
    opts = meta.get("vlprompt_options", {})  # what no tensor records and the case changed (TCP's block)
    model = dassl_import.build_model(imp, micro, meta["classnames"], template=PETS, **opts).eval()
    want = load_file(str(FIX / case / "official_logits.safetensors"))["logits"]
    with torch.no_grad():
        assert (model(images) - want).abs().max() < TOL


def test_cli_import_with_a_torchscript_clip_as_weights(tmp_path, micro, images, capsys, monkeypatch):
    """The user's path: an OpenAI-style TorchScript CLIP as --weights (read tensors-only, never
    ``torch.jit.load``ed), the official words checked against it, the official logits reproduced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(micro.clip).save(str(tmp_path / "clip.pt"))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    meta = _meta("prograd")
    out = tmp_path / "pets"
    args = ["import", str(FIX / "prograd"), "--out", str(out), "--model", "official-micro", "--weights",
            str(tmp_path / "clip.pt"), "--classes", ",".join(meta["classnames"]),
            "--option", "ctx_init=a type of pet, a photo of a"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    loaded = vlprompt.load_prompt(out, backbone=micro)
    assert loaded.manifest["method"] == "prograd"
    assert loaded.manifest["imported_from"]["method"] == "detected from the tensor names"
    want = load_file(str(FIX / "prograd" / "official_logits.safetensors"))["logits"]
    with torch.no_grad():
        assert (loaded(images) - want).abs().max() < TOL
    bad = args[:-1] + ["ctx_init=a type of dog, a photo of the"]  # same token count, other words
    assert main(bad + ["--force"]) != 0
    assert "same CLIP, other words" in capsys.readouterr().err
