"""The synergy MLP's own width (`DmilConfig.synergy_hidden_size`), and configs saved before the field existed."""

import json

import pytest
import torch

from dmil_hf import DmilConfig, DmilForMultimodalClassification

from conftest import ModelTester


def _synergy_width(model):
    return model.dmil.synergy[0].out_features


def test_the_synergy_mlp_has_its_own_width(tmp_path):
    assert DmilConfig().synergy_hidden_size == 256
    DmilConfig(feature_modalities={"a": 3, "b": 4}).save_pretrained(tmp_path)
    assert DmilConfig.from_pretrained(tmp_path).synergy_hidden_size == 256
    tester = ModelTester(("alpha", "beta", "gamma"))
    model = DmilForMultimodalClassification(tester.config(synergy_hidden_size=40))
    assert _synergy_width(model) == 40
    assert model.dmil.synergy[2].in_features == 40
    # None: the width of everything else, as before the field existed
    assert _synergy_width(DmilForMultimodalClassification(tester.config(synergy_hidden_size=None))) == \
        tester.config().hidden_size
    pairs = DmilForMultimodalClassification(tester.config(synergy_structure="pairs", synergy_hidden_size=24))
    assert pairs.dmil.synergy.mlp[0].out_features == 24


@pytest.mark.parametrize("width", [0, -3])
def test_a_width_below_one_is_refused(width):
    with pytest.raises(ValueError, match="`synergy_hidden_size` is"):
        DmilConfig(feature_modalities={"a": 3, "b": 4}, synergy_hidden_size=width)


def test_a_checkpoint_saved_before_the_field_loads_with_the_old_width(tmp_path):
    tester = ModelTester(("alpha", "beta"))
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config(synergy_hidden_size=None)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["synergy_hidden_size"]  # as a config written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.synergy_hidden_size is None
    assert _synergy_width(reloaded) == model.config.hidden_size
    inputs = tester.inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
