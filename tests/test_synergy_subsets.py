"""The synergy component's leave-one-out subsets (`synergy_subset_weight`): in training, with three or more
modalities, the joint synergy MLP also predicts with each modality left out (as a missing one is read), and its task
loss gains the weighted mean of those subsets' losses."""

import json

import pytest
import torch
import torch.nn.functional as F

from dmil_hf import DmilConfig, DmilForMultimodalClassification

from conftest import ModelTester


def _model(modalities=("alpha", "beta", "gamma"), **overrides):
    tester = ModelTester(modalities, batch_size=6)
    torch.manual_seed(0)
    config = tester.config(modality_dropout=0.0, **{"synergy_subset_weight": 0.5, **overrides})
    model = DmilForMultimodalClassification(config).set_training_stage(3).train()
    for dropout in model.dmil.encoders.dropouts.values():
        dropout.p = 0.0
    return tester, model


def test_each_subset_is_the_synergy_of_the_others_read_as_missing():
    tester, model = _model()
    inputs = tester.inputs()
    out = model.dmil(**inputs)
    assert out.synergy_subset_embeds.shape == (6, 3, 16) and out.synergy_subset_mask.all()
    # leaving gamma out gives what the model computes when gamma is missing (the same tower views, gamma's zeroed)
    model.eval()
    without = model.dmil(alpha_features=inputs["alpha_features"], beta_features=inputs["beta_features"])
    torch.testing.assert_close(out.synergy_subset_embeds[:, 2], without.component_embeds[:, -1])
    assert not torch.allclose(out.synergy_subset_embeds[:, 2], out.component_embeds[:, -1])
    # a sample with one modality missing keeps only the subset that leaves that one out
    model.train()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[0, 1] = False
    partial = model.dmil(**inputs, modality_mask=mask)
    assert partial.synergy_subset_mask[0].tolist() == [False, True, False] and partial.synergy_subset_mask[1:].all()


def test_the_synergy_loss_adds_the_weighted_mean_of_the_subsets():
    tester, model = _model()
    inputs, labels = tester.inputs(), tester.labels(6)
    out = model(**inputs, labels=labels)
    subsets = model.dmil(**inputs).synergy_subset_embeds
    full = F.cross_entropy(out.component_logits[:, -1], labels)
    left_out = F.cross_entropy(model.synergy_head(subsets).flatten(0, 1), labels.repeat_interleave(3))
    torch.testing.assert_close(out.loss_terms["task_component_synergy"], full + 0.5 * left_out)


def test_on_by_default_off_in_eval_and_with_two_modalities(tmp_path):
    assert DmilConfig().synergy_subset_weight == 2.0
    DmilConfig(feature_modalities={"a": 3, "b": 4}).save_pretrained(tmp_path)
    assert DmilConfig.from_pretrained(tmp_path).synergy_subset_weight == 2.0
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["synergy_subset_weight"]  # as a config written before the field existed: the paper's 0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert DmilConfig.from_pretrained(tmp_path).synergy_subset_weight == 0.0
    tester, model = _model(synergy_subset_weight=0.0)
    assert model.dmil(**tester.inputs()).synergy_subset_embeds is None
    tester, model = _model()
    assert model.eval().dmil(**tester.inputs()).synergy_subset_embeds is None
    tester, model = _model(("alpha", "beta"))  # leaving one of two out leaves no synergy to learn
    assert model.dmil(**tester.inputs()).synergy_subset_embeds is None
    with pytest.raises(ValueError, match="synergy_subset_weight"):
        DmilConfig(synergy_subset_weight=-1.0)
