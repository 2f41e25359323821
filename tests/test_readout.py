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
