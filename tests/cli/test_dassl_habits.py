"""Issue 25 item 2: the habits of the official (Dassl-based) repositories map onto vlprompt."""

from __future__ import annotations

import pytest

from vlprompt.cli.common import apply_dassl_habits
from vlprompt.cli.main import build_parser, main
from vlprompt.errors import VlpromptError
from vlprompt.train.config import resolve_config
from vlprompt.train.dassl_config import map_dassl, read_dassl_file

# The values of muzairkhattak/multimodal-prompt-learning
# configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml
MAPLE_YAML = """\
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 4
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8
INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]
OPTIM:
  NAME: "sgd"
  LR: 0.0035
  MAX_EPOCH: 5
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5
TRAIN:
  PRINT_FREQ: 20
MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
TRAINER:
  MAPLE:
    N_CTX: 2
    CTX_INIT: "a photo of a"
    PREC: "fp16"
    PROMPT_DEPTH: 9
"""

# Zhenhan-Huang/Modular-Prompt-Learning configs/trainers/MPL/vit_b4_c1_add2_rm1.yaml (its TRAINER part,
# with the optimiser changed so that the mapping is visible against the preset)
MPL_YAML = """\
OPTIM:
  NAME: "adam"
  LR: 0.01
  MAX_EPOCH: 3
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 8
TRAINER:
  MPL:
    N_CTX: 1
    CTX_INIT: "a photo of a"
    PREC: "fp32"
    PROMPT_DEPTH: 5
    N_ADD_OP: 3
    N_RM_OP: 1
"""


@pytest.mark.parametrize(
    "trainer, method",
    [("CoOp", "coop"), ("CoCoOp", "cocoop"), ("MaPLe", "maple"), ("IVLP", "ivlp"), ("VPT", "vpt"),
     ("KgCoOp", "kgcoop"), ("ProGrad", "prograd"), ("PromptSRC", "promptsrc"), ("MPL", "mpl"),
     ("ZeroshotCLIP", "zeroshot"), ("MAPLE", "maple")],
)  # fmt: skip
def test_trainer_names_are_method_names(trainer, method):
    args = build_parser().parse_args(["train", "--trainer", trainer, "--dataset", "demo", "--out", "o"])
    apply_dassl_habits(args)
    assert args.method == method
    args = build_parser().parse_args(["run", "--protocol", "base2new", "--methods", trainer, "CoOp"])
    apply_dassl_habits(args)
    assert args.method == f"{method},coop"


def test_official_maple_yaml_maps_every_key_that_decides_the_result(tmp_path):
    path = tmp_path / "configs" / "trainers" / "MaPLe" / "vit_b16_c2_ep5_batch4_2ctx.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(MAPLE_YAML)
    mapped = read_dassl_file(path)  # the method from the folder name (configs/trainers/MaPLe)
    assert mapped.method == "maple"
    cfg = resolve_config("maple", "demo", overrides=mapped.overrides)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.optimizer) == (
        0.0035,
        5,
        4,
        "sgd",
    )
    assert (cfg.train.warmup_epochs, cfg.train.warmup_lr, cfg.train.scheduler) == (1, 1e-5, "cosine")
    assert (cfg.options.n_ctx, cfg.options.depth, cfg.options.ctx_init) == (2, 9, "a photo of a")
    assert cfg.backbone.name == "ViT-B-16" and cfg.train.precision == "auto"
    assert any("PREC=fp16" in n for n in mapped.notes)


def test_mpl_yaml_values_reach_the_config(tmp_path):
    path = tmp_path / "mpl.yaml"
    path.write_text(MPL_YAML)
    mapped = read_dassl_file(path)  # TRAINER.MPL names the method
    cfg = resolve_config(mapped.method, "demo", overrides=mapped.overrides)
    assert cfg.method == "mpl"
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == ("adam", 0.01, 3, 8)
    assert (cfg.options.depth, cfg.options.add, cfg.options.remove, cfg.train.precision) == (5, 3, 1, "fp32")


def test_unmappable_keys_are_refused_in_one_line_listing_them():
    data = {"OPTIM": {"LR": 0.1, "STAGED_LR": True}, "TRAINER": {"MAPLE": {"N_CTX": 2, "FOO": 1}},
            "INPUT": {"TRANSFORMS": ["random_crop"]}}  # fmt: skip
    with pytest.raises(VlpromptError) as e:
        map_dassl(data)
    msg = str(e.value)
    assert "\n" not in msg
    assert "OPTIM.STAGED_LR" in msg and "TRAINER.MAPLE.FOO" in msg and "INPUT.TRANSFORMS" in msg
    assert "OPTIM.LR" not in msg


def test_cli_config_file_and_trainer(tmp_path, capsys):
    path = tmp_path / "maple.yaml"
    path.write_text(MAPLE_YAML)
    assert (
        main(["config", "show", "--trainer", "MaPLe", "--config-file", str(path), "--set", "train.lr=0.5"])
        == 0
    )
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:] if line}
    assert rows["train.batch_size"] == "4" and rows["options.depth"] == "9" and rows["train.lr"] == "0.5"
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  LR: 0.1\n  ADAM_BETA1: 0.8\n")
    rc = main(["config", "show", "--trainer", "CoOp", "--config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot map OPTIM.ADAM_BETA1" in err and len(err.strip().splitlines()) == 1


def test_trailing_dassl_pairs_get_the_equivalent_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--trainer", "CoOp", "--dataset", "demo", "--out", "o",
              "DATASET.NUM_SHOTS", "4", "OPTIM.LR", "0.01", "TRAINER.COOP.N_CTX", "8"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--shots 4" in err and "--set train.lr=0.01" in err and "--set options.n_ctx=8" in err


def test_space_separated_lists():
    args = build_parser().parse_args(
        ["run", "--protocol", "base2new", "--method", "coop", "--seeds", "1", "2", "3",
         "--datasets", "world-colour-shape", "world-colour-background", "--shots", "4", "8"]
    )  # fmt: skip
    assert args.seeds == "1,2,3" and args.datasets == "world-colour-shape,world-colour-background"
    assert args.shots == "4,8"
    args = build_parser().parse_args(["run", "--protocol", "base2new", "--method", "coop", "--seeds", "1,2"])
    assert args.seeds == "1,2"


def test_set_without_equals_gets_the_key_value_hint(capsys):
    assert (
        main(["train", "--method", "coop", "--dataset", "demo", "--out", "o", "--set", "train.lr", "0.01"])
        == 2
    )
    err = capsys.readouterr().err
    assert "write --set train.lr=0.01" in err and len(err.strip().splitlines()) == 1
    args = build_parser().parse_args(
        [
            "train",
            "--method",
            "coop",
            "--dataset",
            "demo",
            "--out",
            "o",
            "--set",
            "train.lr=0.1",
            "options.n_ctx=4",
            "--set",
            "train.epochs=2",
        ]
    )
    assert args.overrides == ["train.lr=0.1", "options.n_ctx=4", "train.epochs=2"]


def test_method_still_required(capsys):
    assert main(["train", "--dataset", "demo", "--out", "o"]) == 2
    assert "--method (or --trainer)" in capsys.readouterr().err


def test_config_show_resolves_every_section_model_included(capsys):
    """`config show` lists each key with its resolved value: a `--set model.*` key shows the value set
    (it showed the default for every model.* key, so the checkpointing switch looked off)."""
    assert main(["config", "show", "--method", "mpl", "--set", "model.checkpoint_text=true"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:] if line}
    assert rows["model.checkpoint_text"] == ["true", "false"]  # value, default
    assert rows["model.attention"] == ["auto", "auto"] and rows["options.depth"][0] == "9"


def test_config_show_without_a_method_refuses_what_it_would_ignore(capsys):
    assert main(["config", "show", "--set", "train.lr=0.5"]) == 2  # it listed the defaults, lr 0.002
    err = capsys.readouterr().err.strip()
    assert "--set: values are resolved for a method's preset; add --method NAME" in err
    assert len(err.splitlines()) == 1


def test_config_show_refuses_an_unknown_data_set_as_train_does(capsys):
    assert main(["config", "show", "--method", "coop", "--dataset", "nosuch"]) == 2
    assert "unknown data set 'nosuch'" in capsys.readouterr().err
