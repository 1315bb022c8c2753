"""``--weights FILE`` alone: the open_clip architecture is found from the state dict's shapes."""

from __future__ import annotations

import open_clip
import pytest
import torch

import vlprompt
from vlprompt.backbones import loading
from vlprompt.errors import VlpromptError


def _plain_vit_configs() -> list[str]:
    loading._register_configs()
    return [m for m in open_clip.list_models() if loading._is_plain_vit_clip(open_clip.get_model_config(m))]


def test_every_shipped_vit_config_is_recognised_from_shapes():
    """Meta-device state dicts of every plain ViT config map back to that config (or its QuickGELU twin)."""
    names = _plain_vit_configs()
    assert {"ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ViT-g-14", "ViT-e-14"} <= set(names)
    for name in names:
        sd = {k: torch.empty(s, device="meta") for k, s in loading.shipped_shapes(name).items()}
        found, cfg = loading.match_architecture(sd)
        same_arch = open_clip.get_model_config(found) == open_clip.get_model_config(name)  # vlp-world-v2
        assert found == name.replace("-quickgelu", "") or same_arch, name
        want = {k: v for k, v in open_clip.get_model_config(name).items() if k != "quick_gelu"}
        assert cfg == want, name  # head widths etc. come from the config, not a guess


def test_head_width_is_taken_from_the_matching_config():
    sd = {k: torch.empty(s, device="meta") for k, s in loading.shipped_shapes("ViT-H-14").items()}
    cfg = loading.infer_clip_config(sd)
    assert cfg["vision_cfg"]["head_width"] == 80  # the 64 a generic guess would give is wrong here


@pytest.mark.parametrize("fmt", ["safetensors", "open_clip", "openai"])
def test_weights_file_alone_loads_the_right_architecture(tmp_path, fmt):
    from safetensors.torch import save_file

    ref = vlprompt.load_backbone("ViT-S-32", init_seed=3)
    sd = {k: v.contiguous() for k, v in ref.clip.state_dict().items() if not k.endswith("attn_mask")}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))  # no vlprompt metadata: shapes only
    elif fmt == "open_clip":
        path = tmp_path / "w.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "w.pt"
        torch.save({**sd, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77)}, path)
    bb = vlprompt.load_backbone(None, str(path))
    assert bb.meta["architecture"] == "ViT-S-32"
    assert bb.meta["quick_gelu"] is (fmt == "openai")
    assert bb.image.heads == ref.image.heads and bb.text.width == ref.text.width
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(bb.clip.token_embedding.weight, ref.clip.token_embedding.weight)
    if fmt != "openai":  # same weights, same activation: the same features
        with torch.no_grad():
            torch.testing.assert_close(bb.clip.encode_image(x), ref.clip.encode_image(x))


def test_shape_mismatch_error_names_the_tensor_whole(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in vlprompt.load_backbone("vlp-tiny").clip.state_dict().items()}
    sd.pop("attn_mask", None)
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    with pytest.raises(VlpromptError) as e:
        vlprompt.load_backbone("vlp-small", str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "in the file" in msg and "in the model" in msg and "pass the matching open_clip model name" in msg
    assert "torc)" not in msg  # the old message was cut mid-word


def test_cli_weights_alone_is_not_taken_for_vit_b16(tmp_path, capsys):
    """`eval --weights FILE` without --model: the file's own architecture (here vlp-tiny), not ViT-B-16."""
    from safetensors.torch import save_file

    from vlprompt.cli.main import main

    bb = vlprompt.load_backbone("vlp-tiny", init_seed=1)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items() if k != "attn_mask"}, str(path))
    rc = main(["eval", "--method", "zeroshot", "--dataset", "demo", "--weights", str(path), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "demo" in out and "540" in out  # the built-in digits test split, evaluated
