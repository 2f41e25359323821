"""The per-sample interaction readout (`interaction_weights`) and the gate (`gate_weights`) of DMIL."""

import math

import pytest
import torch

from conftest import ModelTester
from dmil_hf import DmilForMultimodalClassification
from dmil_hf.modeling_dmil import pointwise_interaction_weights

NAMES = ("redundancy", "unique_a", "unique_b", "synergy")
CONFIDENT, FLAT = torch.tensor([8.0, 0.0, 0.0, 0.0]), torch.zeros(4)


def readout(first, second, fused, mask=(True, True), log_prior=None, component_mask=None):
    unimodal = torch.stack([first, second]).unsqueeze(0)
    return pointwise_interaction_weights(unimodal, fused.unsqueeze(0), torch.tensor([mask]), log_prior,
                                         component_mask)[0]


@pytest.mark.parametrize("first, second, expected", [
    (CONFIDENT, CONFIDENT, "redundancy"),  # either modality alone predicts the fused class
    (CONFIDENT, FLAT, "unique_a"),  # only the first one does
    (FLAT, CONFIDENT, "unique_b"),
    (FLAT, FLAT, "synergy"),  # neither does, the fusion does
    (torch.tensor([0.0, 8.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 8.0, 0.0]), "synergy"),  # both point elsewhere
])
def test_readout_names_the_interaction_of_each_sample(first, second, expected):
    weights = readout(first, second, CONFIDENT)
    assert weights.sum().item() == pytest.approx(1.0)
    assert bool((weights >= 0).all())
    assert NAMES[int(weights.argmax())] == expected


def test_readout_values_are_the_pointwise_mmi_split():
    # p(ŷ | a) = 0.5, p(ŷ | b) = 0.25 = p(ŷ) (uninformative), p(ŷ | a, b) = 1 with a uniform prior over 4 classes.
    half = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])  # softmax -> (0.5, 1/6, 1/6, 1/6)
    weights = readout(half, FLAT, torch.tensor([30.0, 0.0, 0.0, 0.0]))
    i_a, i_joint = math.log(0.5 / 0.25), math.log(1.0 / 0.25)
    expected = torch.tensor([0.0, i_a, 0.0, i_joint - i_a]) / i_joint
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=0)


def test_readout_uses_the_label_prior():
    # With p(ŷ) = 0.7, a unimodal p(ŷ | b) = 0.7 carries no information about ŷ.
    prior = torch.tensor([0.7, 0.1, 0.1, 0.1]).log()
    b = torch.tensor([math.log(7.0), 0.0, 0.0, 0.0])  # softmax -> (0.7, 0.1, 0.1, 0.1)
    weights = readout(CONFIDENT, b, CONFIDENT, log_prior=prior)
    assert NAMES[int(weights.argmax())] == "unique_a"
    assert weights[2].item() == pytest.approx(0.0, abs=1e-6)


def test_absent_modalities_carry_nothing_and_missing_components_get_no_weight():
    component_mask = torch.tensor([[True, True, False, False]])  # b absent: no unique_b, no synergy
    weights = readout(CONFIDENT, CONFIDENT, CONFIDENT, mask=(True, False), component_mask=component_mask)
    assert weights[2].item() == 0.0 and weights[3].item() == 0.0
    assert weights.sum().item() == pytest.approx(1.0)
    # Nothing informative at all: uniform over the components that exist.
    flat = readout(FLAT, FLAT, FLAT, mask=(True, False), component_mask=component_mask)
    torch.testing.assert_close(flat, torch.tensor([0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("confident, expected", [((0, 1), "redundancy"), ((0, 1, 2), "redundancy"),
                                                  ((2,), "unique_c"), ((), "synergy")])
def test_with_three_modalities_redundancy_is_what_two_of_them_share(confident, expected):
    # One uninformative modality (e.g. an unheard speaker) does not turn a sample that two modalities predict into a
    # unique one; a sample only one modality predicts stays unique.
    unimodal = torch.stack([CONFIDENT if m in confident else FLAT for m in range(3)]).unsqueeze(0)
    weights = pointwise_interaction_weights(unimodal, CONFIDENT.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool))[0]
    names = ("redundancy", "unique_a", "unique_b", "unique_c", "synergy")
    assert names[int(weights.argmax())] == expected
    assert weights.sum().item() == pytest.approx(1.0)


@pytest.fixture
def model_and_inputs():
    tester = ModelTester(("alpha", "beta"), batch_size=6)
    torch.manual_seed(0)
    return DmilForMultimodalClassification(tester.config()), tester.inputs(), tester


def test_model_reports_readout_and_gate_separately(model_and_inputs):
    model, inputs, _ = model_and_inputs
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.interaction_weights.shape == out.gate_weights.shape == (6, len(model.config.component_names))
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(6))
    expected = pointwise_interaction_weights(out.modality_logits, out.logits, out.modality_mask,
                                             model.label_prior.log_prior())
    torch.testing.assert_close(out.interaction_weights, expected)
    # The gate mixes the component logits into the prediction; the readout is not the gate.
    torch.testing.assert_close(out.logits, (out.gate_weights.unsqueeze(-1) * out.component_logits).sum(1))
    assert not torch.allclose(out.interaction_weights, out.gate_weights)


def test_label_prior_counts_training_labels_only_and_is_saved(model_and_inputs, tmp_path):
    model, inputs, tester = model_and_inputs
    labels = torch.tensor([0, 0, 0, 1, 2, 0])
    model.eval()
    model(labels=labels, **inputs)
    assert model.label_prior.counts.sum().item() == 0  # evaluation does not count
    model.train()
    model(labels=labels, **inputs)
    assert model.label_prior.counts.tolist() == [4.0, 1.0, 1.0]
    model.save_pretrained(tmp_path)
    reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path)
    assert reloaded.label_prior.counts.tolist() == [4.0, 1.0, 1.0]
    prior = reloaded.label_prior.log_prior().exp()
    torch.testing.assert_close(prior, torch.tensor([5.0, 2.0, 2.0]) / 9.0)


# --- multi-label: the split of the predicted label set ---------------------------------------------------------------
SET = torch.tensor([8.0, 8.0, -8.0])  # labels 0 and 1 present, 2 absent, confidently
UNSURE = torch.zeros(3)  # every label at 1/2: nothing about the set


def multi_label_readout(first, second, fused, log_prior=None):
    unimodal = torch.stack([first, second]).unsqueeze(0)
    return pointwise_interaction_weights(unimodal, fused.unsqueeze(0), torch.ones(1, 2, dtype=torch.bool), log_prior,
                                         multi_label=True)[0]


@pytest.mark.parametrize("first, second, expected", [
    (SET, SET, "redundancy"),  # either modality alone predicts the whole set
    (SET, UNSURE, "unique_a"),
    (UNSURE, SET, "unique_b"),
    (UNSURE, UNSURE, "synergy"),  # only the fusion does
    (-SET, -SET, "synergy"),  # both predict the opposite set
])
def test_multi_label_readout_names_the_interaction_of_each_sample(first, second, expected):
    weights = multi_label_readout(first, second, SET)
    assert weights.sum().item() == pytest.approx(1.0)
    assert NAMES[int(weights.argmax())] == expected


def test_multi_label_readout_values_sum_the_labels_and_use_the_prior():
    # Modality a is sure of label 0 only (p = 1/2 on the others); the fusion of all three. Uniform prior: each label
    # carries log 2 at most, so i_a = log 2 (label 0), i = 3 log 2.
    first = torch.tensor([30.0, 0.0, 0.0])
    weights = multi_label_readout(first, UNSURE, torch.tensor([30.0, 30.0, -30.0]))
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.0, 0.0, 2.0]) / 3.0, atol=1e-5, rtol=0)
    # With p(label 0 present) = 0.99, knowing label 0 is present tells almost nothing: a's share nearly vanishes.
    prior = torch.tensor([0.99, 0.5, 0.5]).log()
    weights = multi_label_readout(first, UNSURE, torch.tensor([30.0, 30.0, -30.0]), log_prior=prior)
    assert weights[1].item() < 0.01 and weights[3].item() > 0.99


def test_multi_label_model_prior_counts_each_label_and_is_saved(tmp_path):
    tester = ModelTester(("alpha", "beta"), batch_size=4)
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config(problem_type="multi_label_classification")).train()
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    model(labels=labels, **tester.inputs())
    assert model.label_prior.counts.tolist() == [3.0, 1.0, 1.0] and model.label_prior.samples.item() == 4
    # p(label k present), Laplace-smoothed: (count + 1) / (samples + 2).
    torch.testing.assert_close(model.label_prior.log_prior().exp(), torch.tensor([4.0, 2.0, 2.0]) / 6.0)
    model.eval()
    with torch.no_grad():
        out = model(**tester.inputs())
    expected = pointwise_interaction_weights(out.modality_logits, out.logits, out.modality_mask,
                                             model.label_prior.log_prior(), multi_label=True)
    torch.testing.assert_close(out.interaction_weights, expected)
    model.save_pretrained(tmp_path)
    reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path).eval()
    assert reloaded.label_prior.samples.item() == 4
    with torch.no_grad():
        again = reloaded(**tester.inputs())
    torch.testing.assert_close(again.interaction_weights, out.interaction_weights)
    torch.testing.assert_close(again.logits, out.logits)


def test_readout_plot_names_the_interaction_weights_it_plots(tmp_path, monkeypatch):
    """The run's `interaction_weights.png` plots the readout, so its axis must say so, not "gate weight"."""
    from matplotlib.figure import Figure

    from dmil_hf.plots import plot_interaction_weights

    labels = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (labels.append(fig.axes[0].get_ylabel()),
                                                                  save(fig, *a, **k)))
    weights = torch.softmax(torch.randn(8, 4), -1).numpy()
    path = plot_interaction_weights(weights, ["redundancy", "synergy"] * 4, NAMES, tmp_path / "weights.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert labels == ["interaction weight (readout)"]
