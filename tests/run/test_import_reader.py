"""`vlprompt.torchfile`: tensors of torch.save / TorchScript files, and nothing of the file executed.

Each hostile payload is first shown to run under plain ``torch.load``/``torch.jit.load`` (so the test
can fail), then read with the restricted reader, which must give the tensors and run nothing.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

import vlprompt
from vlprompt import torchfile
from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError


class _Payload:
    """Pickles as a call of ``exec`` -- what a hostile checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _stateful_module():
    """A module ``evil.Sched`` whose ``__setstate__`` writes a file (as a scheduler class could)."""
    mod = types.ModuleType("evil_sched")

    class Sched:
        def __init__(self, marker):
            self.marker = marker

        def __setstate__(self, state):
            open(state["marker"], "w").write("pwned")  # noqa: SIM115
            self.__dict__.update(state)

    Sched.__module__ = "evil_sched"
    Sched.__qualname__ = "Sched"
    mod.Sched = Sched
    return mod


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_malicious_payload_is_never_executed(tmp_path, monkeypatch, zipped):
    mod = _stateful_module()
    monkeypatch.setitem(sys.modules, "evil_sched", mod)
    m1, m2 = tmp_path / "reduce.txt", tmp_path / "setstate.txt"
    w = torch.randn(3, 4)
    ck = {"state_dict": {"ctx": w}, "epoch": 2, "a": _Payload(str(m1)), "scheduler": mod.Sched(str(m2))}
    path = tmp_path / "model.pth.tar-2"
    torch.save(ck, path, _use_new_zipfile_serialization=zipped)
    torch.load(path, weights_only=False)  # the payload is real: plain unpickling runs both
    assert m1.read_text() == "pwned" and m2.read_text() == "pwned"
    m1.unlink(), m2.unlink()
    tf = torchfile.read(path)
    assert not m1.exists() and not m2.exists()
    assert torch.equal(tf.obj["state_dict"]["ctx"], w) and tf.obj["epoch"] == 2
    assert isinstance(tf.obj["a"], torchfile.Stub) and tf.obj["a"].stub_name == "builtins.exec"
    assert tf.obj["scheduler"].stub_name == "evil_sched.Sched"
    assert tf.obj["scheduler"].state == {"marker": str(m2)}  # the state, held, not applied
    assert {"builtins.exec", "evil_sched.Sched"} <= tf.stubs


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_load_reads(tmp_path, zipped):
    """A checkpoint with an optimizer, a scheduler, a numpy scalar, shared and viewed storages."""
    lin = torch.nn.Linear(3, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5)
    base = torch.randn(10).half()
    ck = {
        "state_dict": lin.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched,
        "val_result": np.float64(0.5),
        "view": base[2:6],
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "bf16": torch.randn(2, 2).bfloat16(),
    }
    path = tmp_path / "ck.pth"
    torch.save(ck, path, _use_new_zipfile_serialization=zipped)
    want = torch.load(path, weights_only=False)
    got = torchfile.read(path).obj
    for k in ("view", "strided", "param", "scalar", "bf16"):
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k].detach()), k
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v)
    buf = want["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(got["optimizer"]["state"][0]["momentum_buffer"], buf)
    assert got["scheduler"].stub_name == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert got["scheduler"].state["T_max"] == 5
    assert isinstance(got["val_result"], torchfile.Stub)  # numpy scalars are not rebuilt either


def _bomb(path, nbytes):
    """A torch.save zip whose one storage is ``nbytes`` of zeros, deflated (torch stores it plain)."""
    src = io.BytesIO()
    torch.save({"ctx": torch.zeros(4)}, src)
    src.seek(0)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"K\x04", b"J" + (nbytes // 4).to_bytes(4, "little"))  # numel 4 -> n
            if info.filename.endswith("data/0"):
                zout.writestr(info.filename, bytes(nbytes), compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info.filename, data)


def test_deflate_bomb_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.pth.tar-1"
    _bomb(path, 256 * 2**20)
    assert path.stat().st_size < 2 * 2**20  # a 256 MiB storage in a file under 2 MiB
    tracemalloc.start()
    try:
        with pytest.raises(VlpromptError, match=r"declares 256\.0 MiB of tensors in a 0\.\d MiB file") as e:
            torchfile.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20 and "\n" not in str(e.value)


def test_import_cli_refuses_a_bomb_in_one_line(tmp_path, capsys):
    _bomb(tmp_path / "bomb.pth.tar-1", 512 * 2**20)
    rc = main(["import", str(tmp_path / "bomb.pth.tar-1"), "--out", str(tmp_path / "o"), "--classes", "a,b"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "declares 512.0 MiB of tensors" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_torchscript_weights_never_run_the_archive(tmp_path, monkeypatch):
    """``--weights`` with a TorchScript file: read as tensors, ``torch.jit.load`` is never called."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_Block())
    path = tmp_path / "evil.pt"
    scripted.save(str(path))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    with pytest.raises(VlpromptError, match="not a ViT CLIP checkpoint"):
        vlprompt.load_backbone(None, str(path))


def test_damaged_files_are_one_line(tmp_path):
    w = tmp_path / "w.pth"
    torch.save({"ctx": torch.randn(64, 64)}, w, _use_new_zipfile_serialization=False)
    data = w.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk" * 20)
    (tmp_path / "text.pth").write_bytes(b"hello")
    for name in ("cut.pth", "junk.pth", "text.pth"):
        with pytest.raises(VlpromptError) as e:
            torchfile.read(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.full((3,), 2.0))

    def forward(self, x):
        return x * self.weight * self.scale

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, bool]):
        self.weight = state[0]
        self.scale = state[1] * 100.0  # the archive's own code, run by torch.jit.load
        self.training = state[2]


def test_torchscript_state_dict_without_running_its_code(tmp_path):
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(plain, torch.randn(1, 3))
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    tf = torchfile.read(path)
    assert tf.torchscript
    got, want = torchfile.torchscript_state_dict(tf, path), torch.jit.load(str(path)).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_torchscript_setstate_is_not_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(_Block())
        except Exception as e:  # noqa: BLE001 -- a torch without custom TorchScript __setstate__
            pytest.skip(f"this torch cannot script a custom __setstate__ ({type(e).__name__})")
    path = tmp_path / "evil.pt"
    scripted.save(str(path))
    ran = torch.jit.load(str(path)).state_dict()["scale"]
    assert torch.equal(ran, torch.full((3,), 200.0))  # torch.jit.load ran the archive's __setstate__
    tf = torchfile.read(path)
    stub = tf.obj
    assert isinstance(stub, torchfile.Stub)
    # the state is held as written (scale 2), never passed to the archive's __setstate__
    assert any(isinstance(v, torch.Tensor) and torch.equal(v, torch.full((3,), 2.0)) for v in stub.state)
