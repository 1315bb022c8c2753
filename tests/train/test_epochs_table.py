"""Per-shot and per-data-set epoch tables of the presets (CoOp's official schedule)."""

from vlprompt.train.config import resolve_config


def test_coop_epochs_follow_shots_and_imagenet():
    epochs = {k: resolve_config("coop", "caltech101", shots=k).train.epochs for k in (1, 2, 4, 8, 16)}
    assert epochs == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    assert resolve_config("coop", "imagenet", shots=16).train.epochs == 50
    # an explicit --set train.epochs wins over both tables, --epochs over everything
    assert resolve_config("coop", "imagenet", shots=16, overrides=["train.epochs=7"]).train.epochs == 7
    assert resolve_config("coop", "imagenet", shots=16, epochs=3).train.epochs == 3
