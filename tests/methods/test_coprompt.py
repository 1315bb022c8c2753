"""CoPrompt and the contract pieces it brought: post-encoder feature adapters, two views per training
image (seeded, resume bitwise equal), class descriptions (read once, checked, in the run identity)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from vlprompt.data import (
    MultiView,
    build_transform,
    fewshot,
    get_dataset,
    randaugment_transform,
    read_descriptions,
    subsample,
)
from vlprompt.engine import TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method
from vlprompt.run import RunDir
from vlprompt.train.config import RunConfig, resolve_config
from vlprompt.train.trainer import fit

CLASSES = ["cat", "dog", "car"]
DESC = {
    "cat": ["A cat is a small furry pet.", "A cat has whiskers.", "Cats purr."],
    "dog": ["A dog barks.", "A dog is a loyal pet."],
    "car": ["A car has four wheels."],
}
SHAPES = {  # the classes of world-shapes, two sentences each
    "triangle": ["A triangle has three straight sides.", "A triangle has three corners."],
    "square": ["A square has four equal sides.", "A square has four right angles."],
    "moon": ["A moon shape is a curved crescent.", "A crescent is a thin curved sliver."],
    "ring": ["A ring is a hollow circle.", "A ring has a hole in the middle."],
    "cross": ["A cross is two bars meeting at the centre.", "A cross looks like a plus sign."],
    "star": ["A star has pointed tips.", "A star has points around a centre."],
    "diamond": ["A diamond is a square on its corner.", "A diamond has four slanted sides."],
    "circle": ["A circle is perfectly round.", "A circle has no corners."],
}
TRAIN = {"optimizer": "sgd", "lr": 0.0035, "batch_size": 4, "epochs": 2, "warmup_epochs": 0,
         "scheduler": "cosine", "precision": "fp32", "device": "cpu", "log_every": 1}  # fmt: skip


def _desc_file(tmp_path, data=DESC, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return read_descriptions(p)


def _model(tiny, seed=0, **opts):
    torch.manual_seed(seed)
    m = create_model("coprompt", tiny, CLASSES, depth=3, **opts)
    with torch.no_grad():  # off the initialisation, so that every piece matters
        for p in m.method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def views(tiny):
    g = torch.Generator().manual_seed(0)
    s = tiny.preprocess_cfg["size"]
    return torch.randn(4, 2, 3, s, s, generator=g), torch.tensor([0, 1, 2, 0])


def test_counts_vit_b16_and_tiny(tiny):
    from vlprompt.backbones import load_backbone

    vitb16 = load_backbone("ViT-B-16")
    maple = create_model("maple", vitb16, CLASSES).num_trainable()
    assert create_model("coprompt", vitb16, CLASSES).num_trainable() == maple + 2 * 2 * 512 * 128 == 3_817_216
    e = tiny.embed_dim
    assert _model(tiny).num_trainable() == create_model(
        "maple", tiny, CLASSES, depth=3
    ).num_trainable() + 4 * e * (e // 4)


def test_adapters_by_hand_never_on_frozen_features(tiny, views):
    model = _model(tiny).eval()
    x = views[0][:, 0]
    m = model.method
    with torch.no_grad():
        v = model.encode_image(x)  # prompted tower, normalised
        inputs = m.text_inputs()
        t = model.run_text(inputs.embeds, inputs.eot, inputs.plan)
        va = F.normalize(0.1 * m.adapter_image(v) + 0.9 * v, dim=-1)
        ta = F.normalize(0.2 * m.adapter_text(t) + 0.8 * t, dim=-1)
        want = model.backbone.logit_scale * va @ ta.t()
        out = model.run(views[0], need={"frozen_image", "frozen_text"})
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_features, va, atol=1e-6, rtol=0)
    # frozen CLIP: no prompts, no adapter, and the second view
    with torch.no_grad():
        frozen = model.encode_image(views[0][:, 1], plan=TowerPlan())
    torch.testing.assert_close(out.frozen_image_features, frozen, atol=1e-6, rtol=0)
    assert not torch.allclose(out.frozen_image_features, model.frozen_image_features(x), atol=1e-3)
    # ratios 0: the adapters vanish and CoPrompt's logits are MaPLe's with the same prompts
    plain = create_model("coprompt", tiny, CLASSES, depth=3, image_adapter_ratio=0.0, text_adapter_ratio=0.0)
    plain.load_prompt_state_dict(model.prompt_state_dict())
    maple = create_model("maple", tiny, CLASSES, depth=3)
    maple.load_prompt_state_dict({k: v for k, v in model.prompt_state_dict().items() if "adapter" not in k})
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), maple.eval()(x), atol=1e-6, rtol=0)


def test_default_contract_is_identity_and_one_view(tiny):
    coop = create_model("coop", tiny, CLASSES)
    assert not coop.method.adapts_image and not coop.method.adapts_text and coop.method.views == 1
    cfg = tiny.preprocess_cfg
    assert repr(coop.method.train_transform(cfg)) == repr(build_transform(True, **cfg))
    cp = create_model("coprompt", tiny, CLASSES, depth=3)
    assert cp.method.adapts_image and cp.method.adapts_text
    tf = cp.method.train_transform(cfg)
    assert isinstance(tf, MultiView) and len(tf.transforms) == 2 and "RandAugment(n=2, m=10" in repr(tf)
    # a method without image prompts and without adapters still takes cached frozen features
    feats = F.normalize(torch.randn(2, tiny.embed_dim), dim=-1)
    with torch.no_grad():
        assert coop(feats).shape == (2, 3)


def test_two_views_are_seeded_and_differ():
    from PIL import Image

    img = Image.fromarray((torch.rand(64, 80, 3) * 255).to(torch.uint8).numpy())
    tiny_cfg = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}
    mv = MultiView([randaugment_transform(**tiny_cfg), randaugment_transform(**tiny_cfg)])
    torch.manual_seed(3)
    a = mv(img)
    torch.manual_seed(3)
    b = mv(img)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    outs = set()
    for s in range(12):
        torch.manual_seed(s)
        x = mv(img)
        outs.add(bool(torch.equal(x[0], x[1])))
    assert False in outs  # the views are drawn independently


def test_loss_terms_by_hand(tiny, views, tmp_path):
    model = _model(tiny).train()
    model.set_descriptions(_desc_file(tmp_path))
    x, y = views
    random.seed(11)
    r = random.randint(0, 2)
    random.seed(11)
    out = model.run(x, need=model.method.needs)
    loss, terms = model.method.objective(out, y)
    feats = model.description_features()
    assert feats.features.shape == (6, tiny.embed_dim) and feats.counts.tolist() == [3, 2, 1]
    ref = torch.stack([feats.features[[0, 3, 5][c] + r % n] for c, n in enumerate([3, 2, 1])])
    ce = F.cross_entropy(out.logits, y)
    text = 1 - (out.text_features * ref).sum(-1).mean()
    image = 1 - (out.image_features * out.frozen_image_features).sum(-1).mean()
    for k, v in {"ce": ce, "text_consistency": text, "image_consistency": image}.items():
        torch.testing.assert_close(terms[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, ce + text + image, atol=1e-6, rtol=0)
    # the sentences: frozen CLIP on each sentence as it is, normalised
    with torch.no_grad():
        frozen = create_model("zeroshot", tiny, ["A car has four wheels."], template="{}")
        want = frozen.encode_text()
    torch.testing.assert_close(feats.features[5:6], want, atol=1e-6, rtol=0)
    # weight and mse: W scales both consistency terms
    m2 = _model(tiny, consistency_weight=3.0, distill="mse").train()
    m2.set_descriptions(model.descriptions)
    random.seed(11)
    o2 = m2.run(x, need=m2.method.needs)
    l2, t2 = m2.method.objective(o2, y)
    torch.testing.assert_close(
        t2["image_consistency"], F.mse_loss(o2.image_features, o2.frozen_image_features)
    )
    torch.testing.assert_close(l2, t2["ce"] + 3.0 * (t2["text_consistency"] + t2["image_consistency"]))
    # gradients reach prompts and both adapters, never CLIP
    loss.backward()
    got = {n for n, p in model.named_trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"ctx", "adapter_image.0.weight", "adapter_text.0.weight", "compound_prompts_text.0"} <= got
    assert all(p.grad is None for p in model.backbone.parameters())


def test_descriptions_read_once_and_refused_in_one_line(tmp_path):
    d = _desc_file(tmp_path)
    assert read_descriptions(tmp_path / "d.json") is d  # read once per file state
    csv = tmp_path / "d.csv"
    csv.write_text("class,sentence\n" + "".join(f'{c},"{s}"\n' for c, ss in DESC.items() for s in ss))
    assert read_descriptions(csv).by_class == d.by_class
    assert d.for_classes(["Dog", "car"]) == [tuple(DESC["dog"]), tuple(DESC["car"])]
    bad = {
        "missing.json": None,
        "broken.json": '{"cat": ["x"],',
        "list.json": '["cat"]',
        "numbers.json": '{"cat": [1, 2]}',
        "empty.json": '{"cat": []}',
        "rows.csv": "cat,a,b\n",
    }
    for name, text in bad.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(VlpromptError) as e:
            read_descriptions(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value), name
    with pytest.raises(VlpromptError, match=r"no sentences for 1 of 2 classes \('bird'\)") as e:
        d.for_classes(["cat", "bird"])
    assert "\n" not in str(e.value)


def test_objective_without_descriptions_uses_the_template(tiny, views):
    model = _model(tiny).train()
    out = model.run(views[0], need=model.method.needs)
    assert out.description_features is None
    loss, terms = model.method.objective(out, views[1])
    torch.testing.assert_close(
        terms["text_consistency"], 1 - (out.text_features * out.frozen_text_features).sum(-1).mean()
    )


def _world_cfg(path, **train):
    return resolve_config(
        "coprompt", "world-shapes", shots=1, model="vlp-tiny", device="cpu",
        overrides=("options.depth=3", f"data.descriptions={json.dumps(str(path))}",
                   *(f"train.{k}={v}" for k, v in train.items())),
    )  # fmt: skip


def test_descriptions_enter_the_run_identity(tmp_path):
    from vlprompt.run.identity import request_fingerprint

    a = tmp_path / "a.json"
    a.write_text(json.dumps(SHAPES))
    b = tmp_path / "moved" / "b.json"
    b.parent.mkdir()
    b.write_text(json.dumps(SHAPES))
    fa, fb = request_fingerprint(_world_cfg(a)), request_fingerprint(_world_cfg(b))
    assert fa["fingerprint"] == fb["fingerprint"]  # the content, not the path
    assert len(fa["identity"]["data"]["descriptions_sha256"]) == 64
    b.write_text(json.dumps({**SHAPES, "ring": ["A ring is round."]}))
    assert request_fingerprint(_world_cfg(b))["fingerprint"] != fa["fingerprint"]
    plain = resolve_config("coop", "world-shapes", shots=1, model="vlp-tiny")
    assert "descriptions_sha256" not in request_fingerprint(plain)["identity"]["data"]


def test_run_layer_end_to_end_and_refusals(tmp_path):
    from vlprompt.run.load import load_run
    from vlprompt.run.train import train_run

    f = tmp_path / "shapes.json"
    f.write_text(json.dumps(SHAPES))
    res = train_run(_world_cfg(f, epochs=1, batch_size=4), tmp_path / "run", progress=False)
    assert res["status"] == "trained"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    step = next(r for r in log if r["kind"] == "step")
    assert {"loss_ce", "loss_text_consistency", "loss_image_consistency"} <= set(step)
    assert step["loss_image_consistency"] > 0
    back = load_run(tmp_path / "run")  # no descriptions needed to evaluate
    assert back.method.name == "coprompt" and back.descriptions is None
    # refused in one line, nothing written
    few = {k: v for k, v in SHAPES.items() if k != "star"}
    g = tmp_path / "few.json"
    g.write_text(json.dumps(few))
    desc_set = f"data.descriptions={json.dumps(str(f))}"
    for cfg, match in (
        (_world_cfg(g, epochs=1), "no sentences for 1 of"),
        (_world_cfg(f).but(data={"descriptions": None}), "reads class descriptions; pass --descriptions"),
        (resolve_config("coop", "world-shapes", shots=1, model="vlp-tiny", overrides=(desc_set,)),
         "reads no class descriptions"),
    ):  # fmt: skip
        with pytest.raises(VlpromptError, match=match):
            train_run(cfg, tmp_path / "refused", progress=False)
        assert not (tmp_path / "refused").exists()


def test_two_view_training_resume_is_bitwise_equal(tiny, tmp_path):
    splits = subsample(fewshot(get_dataset("world-shapes"), shots=1, seed=1), "base")
    desc = _desc_file(tmp_path, SHAPES, "shapes.json")
    cfg = RunConfig.from_dict({"train": TRAIN, "data": {"seed": 1}}, partial=True)

    def model():
        torch.manual_seed(0)
        m = create_model("coprompt", tiny, splits.classnames, template=splits.template, depth=3)
        m.set_descriptions(desc)
        return m

    straight = model()
    ref = fit(straight, splits.train, cfg, RunDir(tmp_path / "a"), progress=False)
    assert fit(model(), splits.train, cfg, RunDir(tmp_path / "b"), progress=False, stop_after_epoch=1)[
        "stopped"
    ]
    random.seed(123)  # the checkpoint restores Python's RNG (the description pick) and torch's (the views)
    torch.manual_seed(123)
    resumed = model()
    res = fit(resumed, splits.train, cfg, RunDir(tmp_path / "b"), resume=True, progress=False)
    a, b = straight.prompt_state_dict(), resumed.prompt_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in ref["history"]]


def test_save_load_round_trip_and_official_import_mapping(tiny, views, tmp_path):
    from vlprompt.methods.official import map_coprompt

    model = _model(tiny).eval()
    sd = {"prompt_learner." + k: v for k, v in model.prompt_state_dict().items() if "adapter" not in k}
    for side in ("image", "text"):
        for j in (0, 2):
            sd[f"adapter_{side}.fc.{j}.weight"] = model.prompt_state_dict()[f"adapter_{side}.{j}.weight"]
    m = map_coprompt(sd, "coprompt")
    assert m.options["adapter_reduction"] == 4 and m.options["depth"] == 3 and m.options["n_ctx"] == 2
    back = create_model("coprompt", tiny, CLASSES, depth=3)
    back.load_prompt_state_dict(m.state)
    x = views[0][:, 0]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))
    # MaPLe's signature does not claim a CoPrompt checkpoint, CoPrompt's claims no MaPLe one
    keys = set(sd)
    assert get_method("coprompt").official.signature.matches(keys, set())
    assert not get_method("maple").official.signature.matches(keys, set())
    maple_keys = {k for k in keys if not k.startswith("adapter_")}
    assert not get_method("coprompt").official.signature.matches(maple_keys, set())


def test_preset_is_the_official_recipe():
    p = get_method("coprompt").preset()
    assert p["options"]["n_ctx"] == 2 and p["options"]["depth"] == 9
    assert p["options"]["consistency_weight"] == 1.0 and p["options"]["distill"] == "cosine"
    t = p["train"]
    assert (t["lr"], t["batch_size"], t["epochs"], t["warmup_lr"]) == (0.0035, 4, 8, 1.0e-5)
    fields = {f.name: f.default for f in dataclasses.fields(get_method("coprompt").Config)}
    assert {k: fields[k] for k in p["options"]} == p["options"]  # defaults = the preset


def test_shared_coprompt_files_cover_their_data_sets(shared_data):
    """CoPrompt's own gpt_file JSONs (Caltech101, DTD) read cleanly and name every class of our splits."""
    cal = read_descriptions(shared_data / "descriptions" / "caltech101_coprompt.json")
    dtd = read_descriptions(shared_data / "descriptions" / "dtd_coprompt.json")
    assert len(cal.by_class) == 100 and len(dtd.by_class) == 47
    assert {len(v) for v in cal.by_class.values()} == {50} == {len(v) for v in dtd.by_class.values()}
    names = get_dataset("caltech101", root=str(shared_data)).classnames
    assert len(cal.for_classes(names)) == 100
    split = json.loads((shared_data / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    dtd_names = sorted({row[2] for rows in split.values() for row in rows})
    assert len(dtd_names) == 47 and not dtd.missing(dtd_names)


def test_image_adapter_is_exact_on_cached_frozen_features(tiny, views):
    """A method without image prompts but with an (affine, not homogeneous) image adapter: cached
    frozen features give the same logits as images, and frozen CLIP's features stay unadapted."""
    from vlprompt.methods import PromptModel
    from vlprompt.methods.base import build_config

    coop = get_method("coop")

    class Shifted(coop):
        name = "coop-shifted"

        def __init__(self, cfg, backbone):
            super().__init__(cfg, backbone)
            self.shift = torch.nn.Parameter(torch.linspace(-1, 1, backbone.embed_dim))

        def adapt_image_features(self, features):
            return features + self.shift

    torch.manual_seed(0)
    model = PromptModel(Shifted(build_config(coop, {}), tiny), tiny, CLASSES).eval()
    x = views[0][:, 0]
    with torch.no_grad():
        feats = model.frozen_image_features(x)
        by_images, by_features = model(x), model(feats)
        out = model.run(x, need={"frozen_image"})
    torch.testing.assert_close(by_features, by_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.frozen_image_features, feats)
    want = F.normalize(feats + model.method.shift, dim=-1)
    torch.testing.assert_close(out.image_features, want, atol=1e-6, rtol=0)


def test_cli_run_base2new_with_descriptions(tmp_path, capsys):
    """`vlprompt run --method coprompt --descriptions FILE` on a world set: trained on the base classes,
    evaluated on the new ones, the file's sha256 in the fingerprint; a missing file is one line."""
    from vlprompt.cli.main import main

    f = tmp_path / "shapes.csv"
    f.write_text("class,sentence\n" + "".join(f'{c},"{s}"\n' for c, ss in SHAPES.items() for s in ss))
    args = ["run", "--protocol", "base2new", "--method", "coprompt", "--datasets", "world-shapes",
            "--seeds", "1", "--shots", "1", "--model", "vlp-tiny", "--epochs", "1",
            "--set", "options.depth=3", "--no-progress"]  # fmt: skip
    assert main([*args, "--descriptions", str(f), "--out", str(tmp_path / "out")]) == 0
    assert "1 runs: 1 done" in capsys.readouterr().out
    fp = next((tmp_path / "out").rglob("fingerprint.json"))
    assert (
        json.loads(fp.read_text())["identity"]["data"]["descriptions_sha256"] == read_descriptions(f).sha256
    )
    assert main([*args, "--descriptions", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o2")]) != 0
    err = capsys.readouterr()
    assert "descriptions file not found" in err.out + err.err
