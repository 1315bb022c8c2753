"""Hostile inputs to the run layer (issue 26, item 5): each is a one-line error or a correct result.

Data loss (a user's folder as ``--out``, export into a run), damaged resume state, tampered or
bit-rotted run files, values that drive a run to absurd magnitudes, non-finite prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlprompt.cli.main import main  # noqa: E402
from vlprompt.run import RunDir  # noqa: E402
from vlprompt.run.load import load_run  # noqa: E402
from vlprompt.train.config import resolve_config  # noqa: E402
from vlprompt.utils import sha256_json  # noqa: E402

BASE = [
    "--method", "tinyctx", "--dataset", "demo", "--shots", "2", "--model", "vlp-tiny", "--no-progress",
    "--set", "train.batch_size=4", "--set", "train.lr=0.01",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("tinyctx")  # the test-only method, for every test here


def train(out: Path, *extra: str, epochs: int = 1) -> int:
    return main(["train", *BASE, "--epochs", str(epochs), "--out", str(out), *extra])


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert errors, err
    return errors[-1]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    assert train(out) == 0
    return out


def copy(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ data loss
def test_users_folder_is_never_a_run_directory(tmp_path, capsys):
    user = tmp_path / "mine"
    (user / "checkpoint").mkdir(parents=True)
    (user / "checkpoint" / "model.bin").write_bytes(b"weights")
    (user / "deep").mkdir()
    (user / "deep" / ".notes.abc.tmp").write_text("draft")
    for name in ("config.yaml", "metrics.json", "manifest.json"):
        (user / name).write_text("the user's own " + name)
    (user / ".metrics.json.x1.tmp").write_text("the user's")
    before = snapshot(user)
    for extra in ((), ("--force",)):
        assert train(user, *extra) == 2
        err = last_error(capsys)
        assert "is a folder that is not a vlprompt run" in err and "pass a new or empty folder" in err, err
        assert snapshot(user) == before  # nothing deleted, nothing overwritten
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(empty) == 0 and RunDir(empty).is_complete()


def test_stale_temps_only_of_the_run_layers_own_names_at_the_top(done_run, tmp_path):
    run = copy(done_run, tmp_path)
    own = [run / ".metrics.json.abc.tmp", run / "checkpoint" / ".state.json.x.tmp"]
    theirs = [run / ".mydata.csv.q.tmp", run / "notes" / ".config.yaml.z.tmp"]
    (run / "notes").mkdir()
    for p in own + theirs:
        p.write_text("half")
    assert RunDir(run).remove_stale_temps() == 2
    assert not any(p.exists() for p in own) and all(p.exists() for p in theirs)


def test_export_into_a_complete_run_needs_force(done_run, tmp_path, capsys):
    a = done_run
    b = tmp_path / "b"
    assert train(b, "--set", "train.lr=0.02") == 0
    before = snapshot(b)
    assert main(["export", str(a), str(b)]) == 2
    assert "is a run; exporting would replace its prompt" in last_error(capsys)
    assert snapshot(b) == before
    assert main(["export", str(a), str(b), "--force"]) == 0
    capsys.readouterr()
    rb = RunDir(b)
    assert not rb.is_complete() and rb.fingerprint() is None and not rb.checkpoint_dir.exists()
    assert (b / "prompt.safetensors").read_bytes() == (a / "prompt.safetensors").read_bytes()
    rb.verify()  # the export is consistent: manifest, prompt and its hash agree
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    assert main(["export", str(a), str(user)]) == 2
    assert "not a vlprompt run" in last_error(capsys)
    assert main(["export", str(a), str(b)]) == 0  # an earlier export may be refreshed


# ------------------------------------------------------------------ damaged resume state
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "half"
    cfg = resolve_config(
        "tinyctx",
        "demo",
        shots=2,
        model="vlp-tiny",
        epochs=2,
        overrides=["train.batch_size=4", "train.lr=0.01"],
    )
    from vlprompt.run import train_run

    train_run(cfg, out, progress=False, stop_after_epoch=1)
    return out


def _edit_state(run: Path, edit, rehash: bool) -> None:
    path = run / "checkpoint" / "state.json"
    head = json.loads(path.read_text())
    edit(head["state"])
    if rehash:  # as a checkpoint of an older vlprompt (no hash) or a deliberate forgery would be
        head["state_sha256"] = sha256_json(head["state"])
    path.write_text(json.dumps(head))


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("no-rng", lambda s: s.pop("rng")),
        ("optimizer-5", lambda s: s.__setitem__("optimizer", 5)),
        ("epoch-two", lambda s: s.__setitem__("epoch", "two")),
        ("epoch-99", lambda s: s.__setitem__("epoch", 99)),
    ],
)
def test_damaged_resume_state_is_one_line(interrupted, tmp_path, capsys, name, edit):
    run = copy(interrupted, tmp_path)
    _edit_state(run, edit, rehash=True)
    assert train(run, "--resume", epochs=2) == 2
    err = last_error(capsys)
    assert "checkpoint/state.json is damaged" in err and "--force" in err, err
    assert not (run / "done").exists()


def test_edited_epoch_in_state_json_is_caught_by_its_hash(interrupted, tmp_path, capsys):
    run = copy(interrupted, tmp_path)
    _edit_state(run, lambda s: s.__setitem__("epoch", 0), rehash=False)
    assert train(run, "--resume", epochs=2) == 2
    err = last_error(capsys)
    assert "state.json does not match the sha256 recorded in it" in err, err
    assert train(run, "--resume", "--force", epochs=2) == 0  # --force starts over


def test_checkpoint_of_an_older_vlprompt_without_state_hash_resumes(interrupted, tmp_path):
    run = copy(interrupted, tmp_path)
    _edit_json(run / "checkpoint" / "state.json", lambda h: h.pop("state_sha256"))
    assert train(run, "--resume", epochs=2) == 0 and RunDir(run).is_complete()


# ------------------------------------------------------------------ tampered / bit-rotted run files
def _flip_byte(path: Path, offset_from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _edit_lr(r: Path) -> None:
    _edit_json(r / "fingerprint.json", lambda o: o["identity"]["train"].__setitem__("lr", 0.5))


def _edit_shots(r: Path) -> None:
    (r / "config.yaml").write_text((r / "config.yaml").read_text().replace("shots: 2", "shots: 16"))


def _edit_method(r: Path) -> None:
    _edit_json(r / "manifest.json", lambda o: o.__setitem__("method", "coop"))


TAMPER = {
    "fingerprint-edited": ("fingerprint.json", _edit_lr),
    "config-edited": ("config.yaml", _edit_shots),
    "manifest-edited": ("manifest.json", _edit_method),
    "prompt-bit-flip": ("prompt.safetensors", lambda r: _flip_byte(r / "prompt.safetensors")),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_run_file_is_named(done_run, tmp_path, capsys, case):
    name, tamper = TAMPER[case]
    run = copy(done_run, tmp_path)
    tamper(run)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    for argv in (["predict", "--run", str(run), str(img)], ["export", str(run), str(tmp_path / "e")]):
        assert main(argv) == 2, argv
        err = last_error(capsys)
        assert name in err and err.count("\n") == 0, err
    assert train(run) == 2  # train never believes the run is complete
    assert name in last_error(capsys)
    from vlprompt.protocols.report import load_run_record

    rec = load_run_record(run)
    assert rec is not None and not rec.done and name in rec.error and rec.evaluations == []


def test_fingerprint_swapped_from_another_run(done_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(other, "--set", "train.lr=0.03") == 0
    run = copy(done_run, tmp_path)
    shutil.copy(other / "fingerprint.json", run / "fingerprint.json")
    assert train(run, "--set", "train.lr=0.03") == 2  # the request the swapped fingerprint names
    err = last_error(capsys)
    assert "config.yaml disagrees with" in err and "fingerprint.json" in err and "train.lr" in err, err


def test_untampered_run_verifies_and_older_runs_without_hashes_still_load(done_run, tmp_path):
    RunDir(done_run).verify()
    run = copy(done_run, tmp_path)
    _edit_json(run / "manifest.json", lambda o: o.pop("prompt_sha256"))  # as written before the hashes
    RunDir(run).verify()

    assert load_run(run).n_classes >= 2


# ------------------------------------------------------------------ silently accepted values
def test_huge_lr_is_refused_before_training(tmp_path, capsys):
    # the option range refuses it at once (train.lr <= 10); the magnitude guard below catches what
    # a legal but unstable recipe does
    out = tmp_path / "r"
    assert train(out, "--set", "train.lr=1e12", epochs=2) == 2
    err = last_error(capsys)
    assert "train.lr='1e12' is invalid" in err and "<= 10" in err, err
    assert not (out / "done").exists() and not (out / "prompt.safetensors").exists()


def test_guard_names_magnitude_and_non_finite():
    from vlprompt.errors import VlpromptError
    from vlprompt.train.trainer import _guard_finite

    ok = [torch.nn.Parameter(torch.ones(3))]
    _guard_finite(1.0, ok, 1, 1, 0.1, "fp32")
    with pytest.raises(VlpromptError, match=r"prompt parameter #1 reached \|x\| = 1.5e\+30"):
        _guard_finite(1.0, [*ok, torch.nn.Parameter(torch.full((2,), 1.5e30))], 1, 1, 1e30, "fp32")
    with pytest.raises(VlpromptError, match="became non-finite"):
        _guard_finite(1.0, [torch.nn.Parameter(torch.tensor([float("nan")]))], 1, 1, 1.0, "fp32")
    with pytest.raises(VlpromptError, match="the loss reached"):
        _guard_finite(3e7, ok, 1, 1, 1.0, "fp32")


def test_all_nan_prompt_is_refused_on_load_and_on_save(done_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vlprompt.errors import VlpromptError
    from vlprompt.run.train import save_prompt

    run = copy(done_run, tmp_path)
    path = run / "prompt.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: torch.full_like(f.get_tensor(k), float("nan")) for k in f.keys()}
    save_file(state, str(path), metadata=meta)
    _edit_json(run / "manifest.json", lambda o: o.pop("prompt_sha256"))  # as an older import wrote it
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    assert main(["predict", "--run", str(run), str(img)]) == 2
    assert "holds non-finite values" in last_error(capsys)
    manifest = json.loads((done_run / "manifest.json").read_text())
    with pytest.raises(VlpromptError, match="non-finite"):
        save_prompt(tmp_path / "new", state, manifest)
    assert not (tmp_path / "new" / "prompt.safetensors").exists()


def test_predict_never_reports_nan_probabilities(done_run):
    from vlprompt.errors import VlpromptError

    model = load_run(done_run)
    size = model.backbone.preprocess_cfg["size"]
    images = torch.zeros(1, 3, size, size)
    assert torch.isfinite(model.predict(images).probs).all()
    with pytest.raises(VlpromptError, match="non-finite probabilities"):
        model.predict(torch.full((1, 3, size, size), float("nan")))


def test_custom_set_run_written_with_its_absolute_path_still_verifies(tmp_path):
    """A fingerprint of an older vlprompt named a folder: set by its path; it still matches its config."""
    from vlprompt.errors import VlpromptError
    from vlprompt.run.identity import fingerprint_record, identity, verify_fingerprint
    from vlprompt.train.config import RunConfig

    cfg = {"method": "tinyctx", "data": {"dataset": f"folder:{tmp_path}/pets", "shots": 2}}
    ident = identity(RunConfig.from_dict(cfg), split_hash="h", precision="fp32")
    ident["data"]["dataset"] = f"folder:{tmp_path}/pets"  # as written before
    where = {"fp_path": "fingerprint.json", "config_path": "config.yaml"}
    verify_fingerprint(fingerprint_record(ident), cfg, **where)
    ident["data"]["shots"] = 4
    with pytest.raises(VlpromptError, match="data.shots: 4 -> 2"):
        verify_fingerprint(fingerprint_record(ident), cfg, **where)
