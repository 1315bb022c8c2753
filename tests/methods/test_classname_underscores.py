"""Class names with underscores: spaces, as the official trainers make them, wherever names enter."""

from __future__ import annotations

import pytest
import torch

from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model


@pytest.mark.parametrize("method", ["zeroshot", "coop", "dpl"])
def test_underscores_give_the_same_logits_as_spaces(tiny, method):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    kw = {"depth_image": 2, "depth_text": 2} if method == "dpl" else {}
    torch.manual_seed(0)
    a = create_model(method, tiny, ["golden_retriever", "sea_lion"], **kw)
    torch.manual_seed(0)
    b = create_model(method, tiny, ["golden retriever", "sea lion"], **kw)
    assert a.classnames == ["golden retriever", "sea lion"]
    with torch.no_grad():
        assert torch.equal(a(images), b(images))
        # predict / set_classnames (what `vlprompt predict --classes` calls) do the same
        pa, ia = a.predict(images, ["cat", "golden_retriever"], topk=2)
        pb, ib = b.predict(images, ["cat", "golden retriever"], topk=2)
    assert torch.equal(pa, pb) and torch.equal(ia, ib)
    assert a.classnames == ["cat", "golden retriever"]
    # what the tokenizer would have seen without the replacement differs
    raw = tiny.encode_words("a photo of a golden_retriever.")
    assert raw != tiny.encode_words("a photo of a golden retriever.")


def test_underscore_and_space_spellings_collide(tiny):
    with pytest.raises(VlpromptError, match="duplicate class names"):
        create_model("zeroshot", tiny, ["sea_lion", "sea lion"])
