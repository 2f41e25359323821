"""Dropout on frozen towers' embeddings (`DmilConfig.frozen_tower_dropout`): DMIL's default by model type, the
baselines' `dropout`, and configs saved before the field existed."""

import json

import pytest
import torch

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.methods import build_model

from conftest import ModelTester


def _rates(model) -> dict[str, float]:
    encoders = model.dmil.encoders if hasattr(model, "dmil") else model.encoders
    return {m: module.p for m, module in encoders.dropouts.items()}


def test_frozen_towers_get_their_own_dropout_by_model_type():
    config = ModelTester(("text", "vision", "alpha")).config(freeze_towers=["text"])
    assert config.frozen_tower_dropout is None
    assert config.dropout_probabilities() == {"text": 0.5, "vision": 0.1, "alpha": 0.1}
    assert _rates(build_model("dmil", config)) == {"text": 0.5, "vision": 0.1, "alpha": 0.1}
    for method in ("joint", "ensemble", "i2moe"):  # the baselines train as published: `dropout` everywhere
        assert _rates(build_model(method, config)) == {"text": 0.1, "vision": 0.1, "alpha": 0.1}, method
    config.frozen_tower_dropout = 0.5  # an explicit value holds for every method
    for method in ("dmil", "joint"):
        assert _rates(build_model(method, config))["text"] == 0.5
    # freeze_towers=True freezes towers only: feature vectors keep `dropout`
    config = ModelTester(("text", "alpha")).config(freeze_towers=True, dropout=0.2)
    assert config.dropout_probabilities() == {"text": 0.5, "alpha": 0.2}


def test_a_frozen_towers_embedding_is_dropped_at_its_own_rate_in_training_only():
    tester = ModelTester(("text", "vision"), batch_size=64)
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config(freeze_towers=["text"], frozen_tower_dropout=0.6))
    encoders = model.dmil.encoders
    model.train()
    captured = {}
    hooks = [encoders.dropouts[m].register_forward_hook(lambda mod, args, out, m=m: captured.__setitem__(m, out))
             for m in ("text", "vision")]
    model(**tester.inputs())
    zeros = {m: (captured[m] == 0).float().mean().item() for m in captured}
    assert 0.5 < zeros["text"] < 0.7 and zeros["vision"] < 0.25, zeros
    model.eval()
    with torch.no_grad():
        model(**tester.inputs())
    assert (captured["text"] == 0).float().mean().item() < 0.05
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("field", ["dropout", "frozen_tower_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_a_rate_outside_zero_to_one_is_refused(field, value):
    with pytest.raises(ValueError, match=f"`{field}` is"):
        DmilConfig(feature_modalities={"a": 3, "b": 4}, **{field: value})


def test_a_checkpoint_saved_before_the_field_keeps_dropout_on_its_frozen_towers(tmp_path):
    tester = ModelTester(("text", "alpha"))
    model = DmilForMultimodalClassification(tester.config(freeze_towers=["text"], dropout=0.15))
    model.save_pretrained(tmp_path)
    assert DmilForMultimodalClassification.from_pretrained(tmp_path).config.dropout_probabilities()["text"] == 0.5
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["frozen_tower_dropout"]  # as a config written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path)
    assert reloaded.config.frozen_tower_dropout == 0.15
    assert _rates(reloaded) == {"text": 0.15, "alpha": 0.15}
