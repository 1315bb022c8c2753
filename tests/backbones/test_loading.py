"""Backbone loading: every supported file format round-trips; bad input fails in one clear line."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

import vlprompt
from vlprompt.errors import VlpromptError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def inputs(tiny):
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224), tiny.tokenize(["a photo of a dog.", "a diagram"])


def _outputs(bb, inputs):
    img, txt = inputs
    with torch.no_grad():
        return bb.clip.encode_image(img), bb.clip.encode_text(txt)


def _assert_same(a, b, tol=0.0):
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= tol


def test_random_init_is_frozen_and_reads_dims(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.clip.training
    tiny.train()  # parents calling train() must not un-freeze CLIP's mode
    assert not tiny.clip.training
    assert (tiny.text.width, tiny.text.layers, tiny.text.heads) == (128, 4, 2)
    assert (tiny.image.width, tiny.image.layers, tiny.image.heads) == (128, 4, 2)
    assert tiny.num_image_tokens == 50 and tiny.embed_dim == 64 and tiny.context_length == 77


def test_real_architecture_dims():
    b = vlprompt.load_backbone("ViT-B-16")
    assert (b.text.width, b.text.layers, b.text.heads) == (512, 12, 8)
    assert (b.image.width, b.image.layers, b.image.heads) == (768, 12, 12)
    assert b.num_image_tokens == 197 and b.embed_dim == 512
    assert b.meta["quick_gelu"] is False


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_open_clip_checkpoint_roundtrip(tmp_path, tiny, inputs, wrap):
    sd = tiny.clip.state_dict()
    if wrap == "state_dict":
        obj = {"epoch": 3, "name": "x", "state_dict": sd}
    elif wrap == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = sd
    path = tmp_path / ("ckpt.bin" if wrap == "plain" else "ckpt.pt")
    torch.save(obj, path)
    named = vlprompt.load_backbone("vlp-tiny", str(path))
    inferred = vlprompt.load_backbone(None, str(path))  # architecture inferred from the weights
    ref = _outputs(tiny, inputs)
    _assert_same(_outputs(named, inputs), ref)
    _assert_same(_outputs(inferred, inputs), ref)
    assert inferred.meta["quick_gelu"] is False


def test_safetensors_roundtrip_with_and_without_metadata(tmp_path, inputs):
    qg = vlprompt.load_backbone("vlp-tiny-quickgelu")
    with_meta = tmp_path / "m.safetensors"
    qg.save_safetensors(str(with_meta))
    loaded = vlprompt.load_backbone(None, str(with_meta))
    assert loaded.meta["quick_gelu"] is True  # recorded in the file's metadata
    _assert_same(_outputs(loaded, inputs), _outputs(qg, inputs))

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in qg.clip.state_dict().items() if k != "attn_mask"}, str(bare))
    gelu = vlprompt.load_backbone(None, str(bare))
    assert gelu.meta["quick_gelu"] is False  # nothing says QuickGELU: activation differs, outputs differ
    assert (_outputs(gelu, inputs)[0] - _outputs(qg, inputs)[0]).abs().max() > 1e-4
    forced = vlprompt.load_backbone(None, str(bare), quick_gelu=True)
    _assert_same(_outputs(forced, inputs), _outputs(qg, inputs))


def test_openai_torchscript_archive_uses_quickgelu(tmp_path, inputs):
    qg = vlprompt.load_backbone("vlp-tiny-quickgelu")
    path = tmp_path / "openai.pt"
    torch.jit.script(qg.clip).save(str(path))
    loaded = vlprompt.load_backbone(None, str(path))
    assert loaded.meta["format"] == "openai-torchscript" and loaded.meta["quick_gelu"] is True
    _assert_same(_outputs(loaded, inputs), _outputs(qg, inputs), tol=1e-6)


def test_openai_plain_state_dict_fp16_uses_quickgelu(tmp_path, inputs):
    qg = vlprompt.load_backbone("vlp-tiny-quickgelu")
    sd = {k: v.half() for k, v in qg.clip.state_dict().items() if k != "attn_mask"}
    sd.update(
        input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    path = tmp_path / "openai_sd.pt"
    torch.save(sd, path)
    loaded = vlprompt.load_backbone(None, str(path))
    assert loaded.meta["quick_gelu"] is True
    # reference: the same fp16-rounded weights in an fp32 QuickGELU model
    ref = vlprompt.load_backbone("vlp-tiny-quickgelu")
    ref.clip.load_state_dict({k: v.float() for k, v in sd.items() if v.dim() > 0}, strict=False)
    _assert_same(_outputs(loaded, inputs), _outputs(ref, inputs))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_path_as_name_and_frozen(tmp_path, tiny, inputs):
    # weights unlike the default random init (init_seed=0), so loading them is distinguishable from it
    other = vlprompt.load_backbone("vlp-tiny", init_seed=1)
    path = tmp_path / "w.safetensors"
    other.save_safetensors(str(path))
    b = vlprompt.load_backbone(str(path))
    assert all(not p.requires_grad for p in b.parameters())
    want, got = other.clip.state_dict(), b.clip.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    _assert_same(_outputs(b, inputs), _outputs(other, inputs))
    assert (_outputs(b, inputs)[1] - _outputs(tiny, inputs)[1]).abs().max() > 1e-3


def test_errors_are_one_line(tmp_path):
    with pytest.raises(VlpromptError, match="weights file not found: .*missing.pt"):
        vlprompt.load_backbone("ViT-B-16", str(tmp_path / "missing.pt"))
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(VlpromptError, match="corrupt or not a CLIP checkpoint") as e:
        vlprompt.load_backbone(None, str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(VlpromptError, match="did you mean ViT-B-16"):
        vlprompt.load_backbone("ViT-B-61")
    with pytest.raises(
        VlpromptError, match="unknown pretrained tag 'nope' for ViT-B-16; available tags: .*openai"
    ):
        vlprompt.load_backbone("ViT-B-16", "nope")
    notclip = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, notclip)
    with pytest.raises(VlpromptError, match="not a ViT CLIP checkpoint"):
        vlprompt.load_backbone(None, str(notclip))
    wrong = tmp_path / "tiny.safetensors"
    vlprompt.load_backbone("vlp-tiny").save_safetensors(str(wrong))
    with pytest.raises(VlpromptError, match="do not fit"):
        vlprompt.load_backbone("ViT-B-32", str(wrong))


def test_offline_tag_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(VlpromptError, match="not in the local cache and there is no network.*--weights PATH"):
        vlprompt.load_backbone("ViT-B-16", "openai")
    assert time.perf_counter() - t < 5.0


def test_random_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = vlprompt.load_backbone("vlp-tiny")
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG did not move
    b = vlprompt.load_backbone("vlp-tiny")
    c = vlprompt.load_backbone("vlp-tiny", init_seed=1)
    w = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(a.clip.state_dict()[w], b.clip.state_dict()[w])
    assert not torch.equal(a.clip.state_dict()[w], c.clip.state_dict()[w])
