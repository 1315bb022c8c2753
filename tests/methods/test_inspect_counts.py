"""Issue 25 item 4: `inspect` counts every prompt token per layer and tower, and draws them."""

from __future__ import annotations

import json

import torch

from vlprompt.cli.main import main
from vlprompt.engine.plan import ALL, LayerOps, TowerPlan
from vlprompt.methods.inspection import prompt_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_counts_follow_the_plan_exactly():
    d = 8
    plan = TowerPlan(
        shallow=torch.ones(2, d),
        layers={
            1: LayerOps(remove=1, append=torch.full((3, d), 2.0)),
            2: LayerOps(replace=torch.zeros(4, d), replace_at=1),
            3: LayerOps(remove=ALL, append=torch.ones(1, d)),
        },
    )
    rows = prompt_counts(plan, 5)
    got = [(r["inserted"], r["replaced"], r["removed"], r["carried"], r["prompts"]) for r in rows]
    assert got == [
        (2, 0, 0, 0, 2),  # the shallow prompts
        (3, 0, 1, 1, 4),  # one removed, one carried, three appended
        (0, 4, 0, 4, 8),  # four instance slots overwritten, the tail carried
        (1, 0, 4, 4, 5),  # every appended token removed; the 4 slot prompts carried
        (0, 0, 0, 5, 5),
    ]
    assert rows[1]["new_norm"] == torch.full((d,), 2.0).norm().item()


def test_input_slots_count_as_replaced_then_carried():
    rows = prompt_counts(None, 3, input_slots=4, input_norm=1.5)
    assert [(r["replaced"], r["carried"], r["prompts"]) for r in rows] == [(4, 0, 4), (0, 4, 4), (0, 4, 4)]
    assert rows[0]["new_norm"] == 1.5 and rows[1]["new_norm"] is None


def test_inspect_mpl_counts_its_text_prompts_and_writes_a_figure(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    out = tmp_path / "mpl.json"
    assert main(["inspect", "--method", "mpl", "--model", "vlp-world", "--json", str(out), str(img)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    text = report["text"]["layers"]
    assert len(text) == 9 and all(r["prompts"] == 1 for r in text)  # n_ctx = 1 slot, in all 9 layers
    assert [r["replaced"] for r in text] == [1] * 9  # layer 0: the context; 1..8: the deep prompts
    image = report["image"]["layers"]
    assert [r["prompts"] for r in image] == list(range(1, 10))  # add 2, remove 1 per layer (MPL preset)
    assert [r["inserted"] for r in image] == [1] + [2] * 8 and [r["removed"] for r in image] == [0] + [1] * 8
    fig = tmp_path / "mpl.png"
    assert fig.read_bytes()[:8] == PNG_MAGIC and f"wrote figure {fig}" in printed
