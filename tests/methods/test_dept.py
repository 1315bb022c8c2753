"""DePT as a plug-in: ``base+dept`` composition (naming, preset, refusal), the cwT + linear-probe head
(counts, gradients, objective terms and evaluation fusion by hand, lr groups), learning on the world,
save/load/export round-trip and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from toy import make_toy_task

from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method, list_methods
from vlprompt.run import RunDir
from vlprompt.train import fit
from vlprompt.train.config import RunConfig, TrainConfig, load_preset
from vlprompt.train.schedule import EpochSchedule, build_optimizer
from vlprompt.train.trainer import lr_scales

PHOTO = "a photo of a {}."
TRAIN = {
    "optimizer": "sgd",
    "lr": 0.01,
    "batch_size": 8,
    "epochs": 2,
    "warmup_epochs": 0,
    "precision": "fp32",
}


def _cfg(d: dict) -> RunConfig:
    return RunConfig.from_dict(d, partial=True)


@pytest.fixture(scope="module")
def toy(tiny):
    return make_toy_task(tiny, n_classes=4, n_per_class=4)


def _model(tiny, names, method="coop+dept", seed=0, **opts):
    torch.manual_seed(seed)
    model = create_model(method, tiny, names, PHOTO, **opts)
    with torch.no_grad():  # move the cwT off the identity so a wrong placement shows
        for f in (model.method.film_lp_img, model.method.film_lp_text):
            f.scale.add_(0.3 * torch.randn(f.scale.shape))
            f.bias.normal_(0, 0.1)
    return model


# --- composition -----------------------------------------------------------------------------------
def test_composed_entries_name_both_and_take_the_dept_recipe():
    for base, label in (("coop", "CoOp"), ("cocoop", "CoCoOp"), ("kgcoop", "KgCoOp"), ("maple", "MaPLe")):
        cls = get_method(f"{base}+dept")
        assert cls.name == f"{base}+dept" and cls.label() == f"{label} + DePT" and cls.name in list_methods()
        assert issubclass(cls, get_method(base)) and cls.Base is get_method(base)
    p = load_preset("coop+dept", "base2new")  # the base paper's protocol section (200 epochs) is not used
    assert p["options"] == {
        "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end",
        "lp_weight": 0.7, "fusion": True, "cwt": True, "head_lr_mult": 6.5,
    }  # fmt: skip
    t = p["train"]
    assert (t["lr"], t["batch_size"], t["epochs"], t["epochs_by_shots"], t["epochs_by_dataset"]) == (
        0.0035, 4, 10, None, None,
    )  # fmt: skip
    assert load_preset("kgcoop+dept")["options"]["weight"] == 2.0
    assert load_preset("maple+dept")["options"]["depth"] == 9
    assert (load_preset("cocoop+dept")["train"]["lr"], load_preset("cocoop+dept")["train"]["batch_size"]) == (
        0.002,
        1,
    )
    # the base's own entry is untouched
    assert "lp_weight" not in load_preset("coop")["options"] and load_preset("coop")["train"]["epochs"] == 200


@pytest.mark.parametrize(
    "name, words",
    [
        ("promptsrc+dept", "does not support base method 'promptsrc'"),
        ("dept", "unknown method"),
        ("coop+maple", "is a method, not a plug-in"),
        ("coop+nope", "unknown plug-in"),
        ("+dept", "empty part"),
    ],
)
def test_bad_combinations_are_one_line_errors(name, words):
    with pytest.raises(VlpromptError) as e:
        get_method(name)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_fingerprint_and_artefacts_name_both(tmp_path):
    from vlprompt.cli.main import main

    out = tmp_path / "run"
    args = ["train", "--method", "coop+dept", "--dataset", "demo", "--shots", "2", "--model", "vlp-tiny"]
    args += ["--no-progress", "--epochs", "1", "--set", "train.batch_size=4", "--out", str(out)]
    assert main(args) == 0
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["identity"]["method"] == "coop+dept" and fp["identity"]["options"]["lp_weight"] == 0.7
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "coop+dept"
    from vlprompt.protocols.display import method_label

    assert method_label("coop+dept") == "CoOp + DePT"


# --- the head --------------------------------------------------------------------------------------
def test_counts_and_official_names(tiny, toy):
    _, _, names = toy
    e, c = tiny.embed_dim, len(names)
    for base in ("coop", "kgcoop", "maple", "cocoop"):
        opts = {"depth": 2} if base == "maple" else {}
        plain = create_model(base, tiny, names, PHOTO, **opts).num_trainable()
        m = create_model(f"{base}+dept", tiny, names, PHOTO, **opts)
        assert m.num_trainable() == plain + 4 * e + c * (e + 1)
    keys = set(m.prompt_state_dict())
    assert {"film_lp_img.scale", "film_lp_img.bias", "film_lp_text.scale", "linear_probe_proj.weight"} <= keys
    assert create_model(
        "coop+dept", tiny, names, PHOTO, cwt=False
    ).num_trainable() == 16 * tiny.text.width + c * (e + 1)


def test_objective_terms_by_hand_and_gradients_only_into_the_method(tiny, toy):
    x, y, names = toy
    for method in ("coop+dept", "kgcoop+dept"):
        model = _model(tiny, names, method)
        model.train()
        out = model.run(x[:6], need=model.method.needs)
        loss, terms = model.method.objective(out, y[:6])
        m = model.method
        img = model.encode_image(x[:6], normalize=False)
        inputs = m.text_inputs(None)
        txt = model._text_tower(inputs.embeds, inputs.eot, inputs.plan)
        sim = model.backbone.logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
        ce = F.cross_entropy(sim, y[:6])
        feats = torch.cat([m.film_lp_text(txt[y[:6]]), m.film_lp_img(img)])
        lp = feats @ m.linear_probe_proj.weight.t() + m.linear_probe_proj.bias
        ce_lp = F.cross_entropy(lp, torch.cat([y[:6], y[:6]]))
        want = 0.3 * ce + 0.7 * ce_lp
        if method == "kgcoop+dept":
            frozen = model.frozen_text_features()
            kg = 1 - F.cosine_similarity(F.normalize(txt, dim=-1), frozen, dim=1, eps=1e-7).mean()
            torch.testing.assert_close(terms["kg"], kg, atol=1e-6, rtol=0)
            want = want + 2.0 * kg
        torch.testing.assert_close(out.logits, sim, atol=1e-5, rtol=0)  # training logits: similarity only
        torch.testing.assert_close(terms["ce"], ce, atol=1e-6, rtol=0)
        torch.testing.assert_close(terms["ce_lp"], ce_lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(loss, want, atol=1e-6, rtol=0)
        assert ce_lp.item() > 0.1 and abs(loss.item() - ce.item()) > 1e-3  # the head term counts
        loss.backward()
        for n, p in model.method.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert all(p.grad is None for p in model.backbone.parameters())


def test_evaluation_fuses_on_training_classes_only(tiny, toy):
    x, _, names = toy
    model = _model(tiny, names)
    plain = create_model("coop", tiny, names, PHOTO)
    plain.load_prompt_state_dict({"ctx": model.method.ctx.detach()})
    model.eval()
    m = model.method
    with torch.no_grad():
        img = model.encode_image(x[:5], normalize=False)
        head = m.linear_probe_proj(m.film_lp_img(img))
        sim = plain(x[:5])
        torch.testing.assert_close(model(x[:5]), 0.3 * sim + 0.7 * head, atol=1e-5, rtol=0)
        # a reordered subset of the training classes: the head's rows of those classes
        sub = [names[2], names[0]]
        model.set_classnames(sub)
        plain.set_classnames(sub)
        torch.testing.assert_close(
            model(x[:5]), 0.3 * plain(x[:5]) + 0.7 * head[:, [2, 0]], atol=1e-5, rtol=0
        )
        # any class the head never saw: the base's similarity logits alone
        other = [names[1], "a class never trained"]
        model.set_classnames(other)
        plain.set_classnames(other)
        torch.testing.assert_close(model(x[:5]), plain(x[:5]), atol=1e-6, rtol=0)
        model.set_classnames(names)
        model.method.cfg.fusion = False
        torch.testing.assert_close(model(x[:5]), head, atol=1e-5, rtol=0)


def test_cached_features_are_refused_and_the_head_learns_faster(tiny, toy):
    _, _, names = toy
    model = _model(tiny, names)
    assert not model.method.takes_cached_image_features
    with pytest.raises(VlpromptError, match="unnormalised"):
        model(torch.randn(2, tiny.embed_dim))
    train = TrainConfig(**load_preset("coop+dept")["train"])
    opt = build_optimizer(model.trainable_parameters(), train, lr_scales(model))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 6]  # ctx | cwT x 2 + head
    sched = EpochSchedule(opt, train)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-5]  # the constant warm-up is not scaled
    sched.set_epoch(1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0035, 0.0035 * 6.5], abs=1e-12)


# --- training ---------------------------------------------------------------------------------------
def _data(toy):
    x, y, _ = toy
    return [(x[i], int(y[i])) for i in range(len(y))]


def test_resume_is_exact(tiny, toy, tmp_path):
    _, _, names = toy
    cfg = _cfg({"train": TRAIN, "data": {"seed": 1}})

    def run(out, stop=None, resume=False):
        torch.manual_seed(0)
        m = create_model("coop+dept", tiny, names, PHOTO)
        fit(m, _data(toy), cfg, RunDir(out), resume=resume, progress=False, stop_after_epoch=stop)
        return m.prompt_state_dict()

    full = run(tmp_path / "a")
    run(tmp_path / "b", stop=1)
    resumed = run(tmp_path / "b", resume=True)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    torch.manual_seed(0)
    start = create_model("coop+dept", tiny, names, PHOTO).prompt_state_dict()
    assert (full["linear_probe_proj.weight"] - start["linear_probe_proj.weight"]).abs().max() > 1e-3


def test_cli_save_load_export_round_trip_and_new_classes(cli_round_trip):
    a, _, _ = cli_round_trip("maple+dept", "--set", "options.depth=2")
    assert a.method.name == "maple+dept" and a.method.linear_probe_proj.weight.shape[0] == len(a.classnames)
    size = a.backbone.preprocess_cfg["size"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = a.predict(x, ["zebra", "violin"])  # new classes: the base's similarity logits
    assert p.probs.shape == (3, 2) and a.method._rows is None


def test_learns_on_the_world():
    """vlp-world, world-textures base classes, 4 shots, the DePT recipe for 6 epochs: the objective falls
    and base accuracy rises.  Measured: 45.31 % before (similarity fused with the untrained head) ->
    52.08 % after; epoch losses 2.501, 1.292, 0.986, 0.999, 0.974, 0.840."""
    from vlprompt.backbones import load_backbone
    from vlprompt.data import build_loader, build_transform, fewshot, get_dataset, subsample
    from vlprompt.train.evaluate import evaluate

    torch.set_num_threads(1)
    backbone = load_backbone("vlp-world")
    splits = subsample(fewshot(get_dataset("world-textures"), shots=4, seed=1), "base")
    test = build_loader(splits.test, build_transform(False, **backbone.preprocess_cfg), 256, shuffle=False)
    torch.manual_seed(0)
    model = create_model(
        "coop+dept", backbone, splits.classnames, template=splits.template, ctx_init="a photo of a", n_ctx=4
    )
    before = evaluate(model, test)["accuracy"]
    train = {**load_preset("coop+dept")["train"], "epochs": 6, "precision": "fp32"}
    res = fit(model, splits.train, _cfg({"train": train, "data": {"seed": 1}}), progress=False)
    losses = [h["loss"] for h in res["history"]]
    after = evaluate(model, test)["accuracy"]
    assert losses[-1] < losses[0] - 0.3, losses
    assert after > before + 5, (before, after)


def test_published_numbers_are_under_the_composed_names():
    from vlprompt.protocols import reference as ref

    for base, label in (("coop", "CoOp"), ("cocoop", "CoCoOp"), ("kgcoop", "KgCoOp"), ("maple", "MaPLe")):
        name = f"{label} + DePT"
        assert ref.paper_name(f"{base}+dept") == name
        b, n, hm = ref.BASE2NEW_AVERAGE[name]
        assert abs(2 * b * n / (b + n) - hm) < 0.01  # the transcribed row is self-consistent
        assert (
            len(ref.BASE2NEW_HM[name]) == 11 and name in ref.CROSS_DATASET_AVERAGE and name in ref.DG_AVERAGE
        )


def test_import_of_an_official_dept_checkpoint(tiny, toy, tmp_path):
    """The official trainers save the whole CustomCLIP: the base's learner under ``prompt_learner.``, the
    cwT and head beside it, frozen CLIP too.  Detected as the composed entry (not the plain base, whose
    tensors it also holds) and imported to the same logits."""
    from vlprompt.run.dassl_import import build_model, import_checkpoint

    x, _, names = toy
    for method in ("coop+dept", "maple+dept"):
        opts = {"depth": 2} if method == "maple+dept" else {}
        src = _model(tiny, names, method, **opts)
        own = src.method.state_dict()
        sd = {
            (k if k.startswith(("film_lp_", "linear_probe_proj.")) else "prompt_learner." + k): v
            for k, v in own.items()
        }
        sd["prompt_learner.token_prefix"] = torch.zeros(len(names), 1, tiny.text.width)
        sd["image_encoder.conv1.weight"] = torch.zeros(2, 3, 4, 4)  # frozen CLIP, ignored
        path = tmp_path / f"{method}.pth.tar-5"
        torch.save({"state_dict": sd, "epoch": 5}, path)
        imp = import_checkpoint(path)
        assert imp.method == method and imp.epoch == 5 and imp.options["cwt"] is True
        model = build_model(imp, tiny, names, PHOTO)
        model.eval()
        src.eval()
        with torch.no_grad():
            assert torch.equal(model(x[:4]), src(x[:4]))
        with pytest.raises(VlpromptError, match="shape"):  # the head's rows are the training classes
            build_model(imp, tiny, names[:3], PHOTO)


def test_official_trainer_names_map_to_the_composed_entries():
    from vlprompt.train.dassl_config import trainer_to_method

    for base in ("CoOp", "CoCoOp", "KgCoOp", "MaPLe"):
        assert trainer_to_method(f"ExtrasLinearProbe{base}") == f"{base.lower()}+dept"


def test_composed_options_cross_process_boundaries():
    """A grid's worker processes receive each run's options by pickle: a composed (run-time) options
    class travels by its composed name (before: PicklingError, and `run --jobs 2` hung on coop+dept)."""
    import pickle

    from vlprompt.methods import list_methods
    from vlprompt.methods.base import build_config

    combos = [m for m in list_methods() if "+" in m]
    assert combos
    for name in combos:
        cfg = build_config(get_method(name), {"lp_weight": 0.5})
        back = pickle.loads(pickle.dumps(cfg))
        assert type(back) is type(cfg) and back == cfg and back.lp_weight == 0.5
