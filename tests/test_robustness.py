"""Graceful degradation: the degradation kinds, corrupted training rows, modality dropout and DMIL's per-sample,
per-modality reliability (a modality judged unreliable is handled like a missing one)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.baselines import DmilJointConfig
from dmil_hf.configuration_dmil import CORRUPTION_INPUT
from dmil_hf.data import (DEGRADATIONS, Degradation, add_training_corruption, degrade_split, make_synthetic,
                          parse_degraded_name)
from dmil_hf.data.degrade import TRAINING_KINDS
from dmil_hf.modeling_dmil import component_reliability, drop_modalities
from dmil_hf.preprocess import encode_split

from conftest import ModelTester


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(num_samples=400, bayes_samples=200)


def _raw_split(n=6):
    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "labels": [i % 2 for i in range(n)],
        "text": ["the digit seven is shown here"] * n,
        "image": [rng.integers(60, 200, (12, 12), dtype=np.uint8) for _ in range(n)],
        "audio": [(0.3 * np.sin(np.arange(8000) / 7.0)).astype(np.float32) for _ in range(n)],
        "audio_sampling_rate": [16000] * n,
    })


# --------------------------------------------------------------------------------------------- degradation kinds
def test_every_degradation_name_parses_back():
    for degradation in DEGRADATIONS:
        for modality in ("text", "a", "my_feature"):
            assert parse_degraded_name(f"{degradation.name}_{modality}") == (degradation, modality)
    assert parse_degraded_name("partial30_b") == (Degradation("partial", 0.3), "b")
    with pytest.raises(ValueError, match="not a degraded-set name"):
        parse_degraded_name("smudged")


def test_held_out_kinds_are_not_training_kinds():
    held_out = {d.kind for d in DEGRADATIONS if d.held_out}
    assert held_out == {"blank", "blur", "occlusion", "background", "word_dropout"}
    assert not held_out & set(TRAINING_KINDS)
    assert {d.kind for d in DEGRADATIONS if d.removes_information} == {"missing", "noise", "blank"}


def test_feature_blank_and_partial_mix_signal_with_noise(synthetic):
    test = synthetic["test"]
    clean = np.asarray(test["a_features"])
    blank = np.asarray(degrade_split(test, "a", "blank")["a_features"])
    assert np.all(blank == 0) and blank.shape == clean.shape
    half = np.asarray(degrade_split(test, "a", "partial", level=0.5)["a_features"])
    # half the signal plus half a noise with the column's mean and std, independent of the signal
    residual = (half - 0.5 * clean) / 0.5
    assert np.mean(residual.std(0) / clean.std(0)) == pytest.approx(1.0, abs=0.15)
    assert np.mean(np.abs(residual.mean(0) - clean.mean(0))) < 0.2
    assert abs(np.corrcoef(residual.ravel(), clean.ravel())[0, 1]) < 0.2
    assert np.asarray(degrade_split(test, "a", "partial", level=0.5)["b_features"]).tolist() == test["b_features"]
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\]"):
        degrade_split(test, "a", "partial", level=1.5)


def test_raw_input_corruptions():
    split = _raw_split()
    image = np.asarray(split.with_format("numpy")["image"][0], dtype=np.float64)
    black = np.asarray(degrade_split(split, "vision", "blank").with_format("numpy")["image"][0])
    assert black.shape == image.shape and black.max() == 0
    blurred = np.asarray(degrade_split(split, "vision", "blur", level=1.5).with_format("numpy")["image"][0], float)
    assert blurred.std() < image.std() and abs(blurred.mean() - image.mean()) < 3
    occluded = np.asarray(degrade_split(split, "vision", "occlusion", level=0.25).with_format("numpy")["image"][0])
    assert (occluded == 0).sum() == 36 and (image > 0).all()  # a 6 x 6 square of a 12 x 12 image
    clip = np.asarray(split["audio"][0])
    assert not np.any(degrade_split(split, "audio", "blank")["audio"][0])
    noisy = np.asarray(degrade_split(split, "audio", "background", level=5.0)["audio"][0])
    snr = 10 * np.log10((clip ** 2).mean() / ((noisy - clip) ** 2).mean())
    assert snr == pytest.approx(5.0, abs=0.5)
    assert degrade_split(split, "text", "blank")["text"][0] == ""
    dropped = degrade_split(_raw_split(200), "text", "word_dropout", level=0.5)["text"]
    assert 0.35 < np.mean([len(t.split()) for t in dropped]) / 6 < 0.65
    with pytest.raises(ValueError, match="'background' applies to the columns"):
        degrade_split(split, "text", "background")


# ------------------------------------------------------------------------------------------ training corruption
def test_training_corruption_copies_rows_with_one_modality_corrupted(synthetic):
    train = synthetic["train"]
    out = add_training_corruption(train, ["a", "b"], fraction=0.2, seed=3)
    count = round(0.2 * len(train))
    assert len(out) == len(train) + 2 * count
    levels = np.asarray(out[CORRUPTION_INPUT])
    assert levels.shape == (len(out), 2) and np.all(levels[: len(train)] == 0)
    added = levels[len(train):]
    assert np.all((added > 0).sum(1) == 1)
    assert all(np.isclose(level, [0.4, 0.7, 1.0]).any() for level in np.unique(added[added > 0]))
    assert (added[:, 0] > 0).sum() == count == (added[:, 1] > 0).sum()
    a, b = (np.asarray(out[f"{m}_features"]) for m in "ab")
    clean_a = np.asarray(train["a_features"])
    assert not np.all(a[len(train):] == 0, axis=1).any()  # no blank rows by default
    for row in np.flatnonzero(added[:, 0] > 0):  # b untouched, a changed, the label kept
        source = np.flatnonzero(np.all(np.asarray(train["b_features"]) == b[len(train) + row], axis=1))
        assert len(source) == 1 and not np.allclose(clean_a[source[0]], a[len(train) + row])
        assert train["labels"][source[0]] == out["labels"][len(train) + row]
    again = add_training_corruption(train, ["a", "b"], fraction=0.2, seed=3)
    assert again["a_features"] == out["a_features"]  # deterministic in the seed
    with pytest.raises(ValueError, match="already has"):
        add_training_corruption(out, ["a", "b"])
    with pytest.raises(ValueError, match="no column"):
        add_training_corruption(train, ["a", "z"])
    with pytest.raises(ValueError, match="kinds"):  # a natural corruption is refused
        add_training_corruption(train, ["a", "b"], degradations=[Degradation("word_dropout", 0.3)])


def test_training_corruption_can_add_blank_copies(synthetic):
    train = synthetic["train"]
    out = add_training_corruption(train, ["a", "b"], fraction=0.2, degradations=[Degradation("noise"),
                                                                                 Degradation("blank")])
    a, levels = np.asarray(out["a_features"])[len(train):], np.asarray(out[CORRUPTION_INPUT])[len(train):]
    blank = np.all(a == 0, axis=1)
    assert blank.any() and np.all(levels[blank, 0] == 1.0)  # blank and noise rows both carry level 1
    assert ((levels[:, 0] == 1.0) & ~blank).any()


def test_corruption_levels_reach_the_model_inputs(synthetic):
    out = add_training_corruption(synthetic["train"], ["a", "b"], fraction=0.1)
    encoded = encode_split(out, None, ["a", "b"])
    assert CORRUPTION_INPUT in encoded.column_names
    assert encoded[-1:][CORRUPTION_INPUT].shape == (1, 2)


# --------------------------------------------------------------------------------------- modality dropout
def test_modality_dropout_keeps_one_modality_per_sample():
    torch.manual_seed(0)
    mask = torch.ones(4000, 3, dtype=torch.bool)
    mask[:1000, 2] = False
    dropped = drop_modalities(mask, 0.3)
    assert dropped.any(1).all() and not (dropped & ~mask).any()
    assert 0.25 < 1 - dropped[1000:].float().mean().item() < 0.32
    assert torch.equal(drop_modalities(mask, 0.0), mask)


def test_component_reliability():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]])
    out = component_reliability(r)  # redundancy, unique_a, unique_b, synergy
    expected = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.75, 0.5, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    three = component_reliability(torch.tensor([[1.0, 1.0, 0.0]]))
    assert three[0, -1] == 1.0  # synergy needs two of three


# ------------------------------------------------------------------------------------------- reliability
def _features_tester(**kwargs):
    return ModelTester(("alpha", "beta"), batch_size=8, **kwargs)


def test_without_corrupted_training_reliability_is_one_and_changes_nothing():
    tester = _features_tester()
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config()).eval()
    plain = DmilForMultimodalClassification(tester.config(reliability_gating=False)).eval()
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert all(k.startswith("dmil.reliability.") for k in missing.unexpected_keys) and not missing.missing_keys
    inputs = tester.inputs()
    out, reference = model(**inputs), plain(**inputs)
    assert torch.equal(out.modality_reliability, torch.ones(8, 2))
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.interaction_weights, reference.interaction_weights, rtol=0, atol=0)
    assert reference.modality_reliability is None


def test_unreliable_modality_is_handled_like_a_missing_one():
    tester = _features_tester()
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config()).eval()
    heads = model.dmil.reliability
    heads.calibrated.fill_(1.0)
    with torch.no_grad():  # alpha judged broken (logit -30), beta working (+30)
        for name, bias in (("alpha", -30.0), ("beta", 30.0)):
            heads.heads[name][-1].weight.zero_()
            heads.heads[name][-1].bias.fill_(bias)
    inputs = tester.inputs()
    out = model(**inputs)
    names = model.config.component_names
    assert out.modality_reliability[:, 0].max() < 1e-6 and out.modality_reliability[:, 1].min() > 1 - 1e-6
    for component in ("unique_alpha", "synergy"):
        assert out.gate_weights[:, names.index(component)].max() < 1e-3
        assert out.interaction_weights[:, names.index(component)].max() < 1e-6
    # the prediction is what the model predicts with alpha missing: within a tenth of what trusting alpha changes.
    # (Not to a fixed tolerance: the gate still reads the embeddings of the components it weighs ~0, so the distance
    # depends on the random weights; over seeds 0-7 the ratio was 0.004-0.07.)
    heads.calibrated.zero_()
    without = model(beta_features=inputs["beta_features"])
    trusted = model(**inputs)
    out, without, trusted = (o.logits.log_softmax(-1) for o in (out, without, trusted))
    assert (out - without).abs().max() <= 0.1 * (trusted - without).abs().max()
    # marginalising over which modalities work, a modality judged broken is exactly a missing one
    model.config.reliability_marginalization = True
    heads.calibrated.fill_(1.0)
    marginal = model(**inputs).logits
    torch.testing.assert_close(marginal, without, atol=1e-5, rtol=0)


def test_reliability_learns_to_spot_corrupted_rows():
    tester = _features_tester()
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config()).train()
    model.set_training_stage(1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def batch(n):  # alpha shows the label as a one-hot pattern; its noise is Gaussian with the same mean and std
        labels = torch.randint(0, 3, (n,), generator=g)
        alpha = 2.0 * torch.nn.functional.one_hot(labels, 6).float() + 0.1 * torch.randn(n, 6, generator=g)
        noise = alpha.mean(0) + alpha.std(0) * torch.randn(n, 6, generator=g)
        return labels, alpha, noise, {"beta_features": torch.randn(n, 4, generator=g)}

    for _ in range(300):
        labels, alpha, noise, inputs = batch(32)
        broken = torch.rand(32, generator=g) < 0.3
        corruption = torch.zeros(32, 2)
        corruption[broken, 0] = 1.0
        alpha = torch.where(broken.unsqueeze(1), noise, alpha)
        loss = model(alpha_features=alpha, **inputs, labels=labels, modality_corruption=corruption).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.dmil.reliability.calibrated == 1
    model.eval()
    _, alpha, noise, inputs = batch(64)
    clean, noisy = dict(inputs, alpha_features=alpha), dict(inputs, alpha_features=noise)
    assert model(**clean).modality_reliability[:, 0].mean() > 0.8
    assert model(**noisy).modality_reliability[:, 0].mean() < 0.3
    assert model(**noisy).modality_reliability[:, 1].mean() > 0.8


def test_corrupted_samples_train_the_gate_not_the_components():
    """A sample with a corrupted modality trains the gate only: its gated loss leaves the component heads' gradient
    alone (and reaches the gate); an intact sample's gated loss trains both."""
    tester = _features_tester()
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(tester.config(modality_dropout=0.0)).train()
    model.set_training_stage(3)
    inputs, labels = tester.inputs(), tester.labels()
    corruption = torch.zeros(8, 2)
    corruption[:, 0] = 1.0

    def gradients(corruption):
        model.zero_grad()
        out = model(**inputs, labels=labels, modality_corruption=corruption)
        out.loss_terms["task_gated"].backward()
        parameters = [*model.component_heads.parameters(), *model.synergy_head.parameters()]
        heads = sum(p.grad.abs().sum() for p in parameters if p.grad is not None)
        gate = sum(p.grad.abs().sum() for p in model.gate.parameters() if p.grad is not None)
        return float(heads), float(gate)

    heads, gate = gradients(corruption)
    assert heads == 0.0 and gate > 0.0
    heads, gate = gradients(torch.zeros(8, 2))
    assert heads > 0.0 and gate > 0.0


def test_reliability_tower_gradient_comes_from_corrupted_rows_in_stage_3_only():
    """The reliability loss reaches a text, image or audio tower that trains through the corrupted rows only, scaled
    by `reliability_tower_gradient`, and only in stage 3; 0 keeps the heads on detached outputs; feature towers never
    get it."""
    tester = ModelTester(("text", "alpha"), batch_size=8)
    inputs = tester.inputs()
    corruption = torch.zeros(8, 2)
    corruption[:3] = 1.0

    def tower_gradient(factor, stage, corruption, modality="text"):
        torch.manual_seed(0)
        model = DmilForMultimodalClassification(tester.config(reliability_tower_gradient=factor)).train()
        model.set_training_stage(stage)
        out = model.dmil(**inputs, modality_corruption=corruption, return_dict=True)
        out.loss_terms[f"reliability_{modality}"].backward()
        tower = model.dmil.encoders.towers[modality]
        return sum(float(p.grad.abs().sum()) for p in tower.parameters() if p.grad is not None), model

    half, _ = tower_gradient(0.5, 3, corruption)
    full, _ = tower_gradient(1.0, 3, corruption)
    assert half > 0 and half == pytest.approx(full / 2, rel=1e-4)
    assert tower_gradient(0.0, 3, corruption)[0] == 0.0
    assert tower_gradient(1.0, 2, corruption)[0] == 0.0  # towers are frozen in stage 2 ...
    assert tower_gradient(1.0, 1, corruption)[0] == 0.0  # ... and read detached in stage 1
    assert tower_gradient(1.0, 3, torch.zeros(8, 2))[0] == 0.0  # clean rows send nothing
    assert tower_gradient(1.0, 3, corruption, "alpha")[0] == 0.0  # nor does a feature tower


def test_reliability_tower_gradient_defaults_to_detached_for_configs_saved_before_it():
    from dmil_hf import DmilConfig

    assert DmilConfig().reliability_tower_gradient == 0.25
    saved = DmilConfig().to_dict()
    saved.pop("reliability_tower_gradient")
    assert DmilConfig.from_dict(saved).reliability_tower_gradient == 0.0
    with pytest.raises(ValueError, match="reliability_tower_gradient"):
        DmilConfig(reliability_tower_gradient=1.5)


def test_gap_on_a_dataset_without_metadata_uses_the_majority_label_and_leaves_synergy_out():
    """A dataset of one's own (no Bayes metadata), three modalities, imbalanced labels: a type that needs the lost
    modality falls to its most frequent label's share (not 1 / num_labels), and synergy, whose modalities nobody
    named, is left out of both sides of the gap."""
    from dmil_hf.data.degrade import degradation_report

    types = ["redundancy"] * 4 + ["unique_a"] * 4 + ["unique_b"] * 4 + ["unique_c"] * 4 + ["synergy"] * 4
    labels = [0, 1, 2, 3] + [0, 0, 0, 1] + [0, 1, 2, 3] * 2 + [0, 1, 2, 3]
    rows = {"labels": labels, "interaction": types,
            **{f"{m}_features": np.random.default_rng(0).normal(size=(20, 3)).astype("float32") for m in "abc"}}
    dsd = DatasetDict({k: Dataset.from_dict(rows) for k in ("train", "validation", "test")})
    clean_by_type = {"redundancy": 1.0, "unique_a": 1.0, "unique_b": 1.0, "unique_c": 1.0, "synergy": 0.5}

    def evaluate(split):  # a model that loses unique_a (to 0.5), unique_b (to 0.25) and synergy with either
        by_type = dict(clean_by_type)
        if "a_features" not in split.column_names:
            by_type.update(unique_a=0.5, synergy=0.0)
        if "b_features" not in split.column_names:
            by_type.update(unique_b=0.25, synergy=0.0)
        return {"accuracy": float(np.mean([by_type[t] for t in split["interaction"]])), "by_interaction": by_type}

    report = degradation_report(evaluate, dsd, num_labels=4, degradations=(Degradation("missing"),))
    assert report["gap_excludes"] == ["synergy"]
    # unique_a's most frequent label covers 3 of its 4 rows: attainable (1 + 0.75 + 1 + 1) / 4, accuracy
    # (1 + 0.5 + 1 + 1) / 4; synergy (0 with a missing) counts on neither side
    assert report["attainable"]["missing_a"] == pytest.approx(3.75 / 4)
    assert report["gap"]["missing_a"] == pytest.approx(0.25 / 4)
    assert report["gap"]["missing_b"] == pytest.approx(0.0)  # unique_b's labels are balanced: 0.25 is its best
    # two modalities: synergy needs both, stays in, and falls to its own best constant guess
    two = DatasetDict({k: v.remove_columns("c_features").filter(lambda r: r["interaction"] != "unique_c")
                       for k, v in dsd.items()})
    report = degradation_report(evaluate, two, num_labels=4, degradations=(Degradation("missing"),))
    assert "gap_excludes" not in report
    assert report["attainable"]["missing_a"] == pytest.approx((1 + 0.75 + 1 + 0.25) / 4)


def test_corruption_input_shape_is_checked():
    tester = _features_tester()
    model = DmilForMultimodalClassification(tester.config())
    with pytest.raises(ValueError, match="modality_corruption must be a tensor of shape"):
        model(**tester.inputs(), modality_corruption=torch.zeros(8, 3))


def test_reliability_survives_save_and_reload(tmp_path):
    tester = _features_tester()
    model = DmilForMultimodalClassification(tester.config()).eval()
    model.dmil.reliability.calibrated.fill_(1.0)
    model.save_pretrained(tmp_path)
    again = DmilForMultimodalClassification.from_pretrained(tmp_path).eval()
    assert again.dmil.reliability.calibrated == 1
    inputs = tester.inputs()
    torch.testing.assert_close(again(**inputs).modality_reliability, model(**inputs).modality_reliability)


def test_pipeline_reports_modality_reliability(tmp_path):
    from transformers import pipeline

    import dmil_hf  # noqa: F401  (registers the task)

    tester = _features_tester()
    DmilForMultimodalClassification(tester.config()).save_pretrained(tmp_path)
    classifier = pipeline("multimodal-classification", model=str(tmp_path))
    result = classifier({"alpha_features": np.zeros(6, np.float32), "beta_features": np.ones(4, np.float32)})
    assert result["modality_reliability"] == {"alpha": 1.0, "beta": 1.0}
    alone = classifier({"beta_features": np.ones(4, np.float32)})
    assert alone["modality_reliability"] == {"beta": 1.0}


def test_dataset_dict_of_corrupted_train_trains_end_to_end(tmp_path, synthetic):
    from dmil_hf.experiment import RunSettings, run_training

    small = DatasetDict({k: v.select(range(min(len(v), 80))) for k, v in synthetic.items()})
    small.save_to_disk(str(tmp_path / "data"))
    metrics = run_training(RunSettings(dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
                                       stage_epochs=(1, 1, 1), train_corruption=0.25))
    model = DmilForMultimodalClassification.from_pretrained(tmp_path / "run")
    assert model.dmil.reliability.calibrated == 1 and metrics["test"]["n"] == 60
    assert metrics["stages"][-1]["stage"] == "reliability_refit"  # on its own copy (refit_split)
    # Stages without corrupted rows leave the heads untrained: no refit copy is built, and no refit runs.
    metrics = run_training(RunSettings(dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "clean"),
                                       stage_epochs=(1, 1, 1), train_corruption=0.0))
    assert "reliability_refit" not in [stage["stage"] for stage in metrics["stages"]]


def test_attainable_accuracy_keeps_what_the_lost_modality_does_not_carry():
    from dmil_hf.data.degrade import attainable_accuracy

    clean = {"redundancy": 1.0, "unique_a": 0.9, "unique_b": 0.8, "synergy": 0.6}
    shares = {"redundancy": 0.25, "unique_a": 0.25, "unique_b": 0.25, "synergy": 0.25}
    # no metadata: unique_a and (two modalities) synergy fall to chance
    assert attainable_accuracy(clean, shares, "a", 4) == pytest.approx(0.25 * (1.0 + 0.25 + 0.8 + 0.25))
    # metadata: no type beats its Bayes accuracy with the modality missing (synergy 0.91 > clean 0.6 keeps 0.6)
    bayes = {"bayes_accuracy_degraded": {"missing_a": {"redundancy": 1.0, "unique_a": 0.1, "unique_b": 1.0,
                                                       "synergy": 0.91}}}
    assert attainable_accuracy(clean, shares, "a", 4, bayes) == pytest.approx(0.25 * (1.0 + 0.1 + 0.8 + 0.6))


# ------------------------------------------------------------------------- the target of partly corrupted rows
def test_responsibility_target_moves_reliability_towards_the_path_that_predicts_better():
    """On a partly corrupted row the target is the trusted path's share of the label's probability: the loss raises
    the reliability where trusting the modality predicts the label better than leaving it out and lowers it where it
    predicts worse; clean and fully noised rows keep the target 1 - level."""
    heads = DmilForMultimodalClassification(_features_tester().config()).dmil.reliability
    mask = torch.ones(5, 2, dtype=torch.bool)
    corruption = torch.tensor([[0.4, 0.0], [0.4, 0.0], [0.7, 0.0], [1.0, 0.0], [0.0, 0.0]])
    rows = torch.tensor([0, 1, 2])
    trusted = torch.log(torch.tensor([0.9, 0.2, 0.5]))
    left_out = torch.log(torch.tensor([0.3, 0.6, 0.5]))
    logits = torch.zeros(5, 2, requires_grad=True)
    learned = torch.tensor([[True, False]] * 3)
    target = heads.responsibility_target(corruption, rows, learned, trusted, left_out)
    terms = heads._terms(logits, target, mask)
    terms["reliability_alpha"].backward()
    assert logits.grad[0, 0] < 0 and logits.grad[1, 0] > 0 and logits.grad[2, 0] == 0  # descent: up, down, stay
    logits = torch.full((5, 2), 0.5)
    terms = heads._terms(logits, target, mask)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(terms["reliability_alpha"], bce(logits[:, 0], torch.tensor([0.75, 0.25, 0.5, 0.0, 1.0])))
    torch.testing.assert_close(terms["reliability_beta"], bce(logits[:, 1], torch.ones(5)))


def test_responsibility_target_learns_on_partly_corrupted_rows_in_stages_2_and_3_only(monkeypatch):
    """The rows with a partly corrupted modality are predicted twice, the modality trusted and left out, and its
    reliability learns the responsibility from those paths; a fully noised modality and clean rows keep the target
    1 - level; stage 1 and `"level"` prepare nothing."""
    from dmil_hf.modeling_dmil import DmilReliability

    tester = ModelTester(("vision", "alpha"), batch_size=8)
    inputs, labels = tester.inputs(), tester.labels()
    corruption = torch.zeros(8, 2)
    corruption[:3, 0] = 0.4
    corruption[3, 1] = 0.4  # a feature vector
    corruption[4, 0] = 1.0  # fully noised: target 0
    seen = {}
    original_target, original_terms = DmilReliability.responsibility_target, DmilReliability._terms

    def spy(corruption, rows, learned, trusted_log_p, left_out_log_p):
        seen.update(rows=rows, learned=learned, trusted=trusted_log_p, left_out=left_out_log_p)
        return original_target(corruption, rows, learned, trusted_log_p, left_out_log_p)

    def terms_spy(self, logits, target, mask):
        if seen:
            seen.update(logits=logits.detach())
        return original_terms(self, logits, target, mask)

    monkeypatch.setattr(DmilReliability, "responsibility_target", staticmethod(spy))
    monkeypatch.setattr(DmilReliability, "_terms", terms_spy)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for stage, target, prepared in ((3, "responsibility", True), (2, "responsibility", True),
                                    (1, "responsibility", False), (3, "level", False)):
        seen.clear()
        torch.manual_seed(0)
        model = DmilForMultimodalClassification(tester.config(reliability_partial_target=target,
                                                              modality_dropout=0.0)).train()
        model.set_training_stage(stage)
        out = model(**inputs, labels=labels, modality_corruption=corruption)
        assert bool(seen) == prepared, (stage, target)
        if not prepared:
            continue
        assert seen["rows"].tolist() == [0, 1, 2, 3]
        assert seen["learned"].tolist() == [[True, False]] * 3 + [[False, True]]
        responsibility = torch.sigmoid(seen["trusted"] - seen["left_out"])
        vision = torch.cat([responsibility[:3], torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])])
        alpha = torch.cat([torch.ones(3), responsibility[3:], torch.ones(4)])
        torch.testing.assert_close(out.loss_terms["reliability_vision"], bce(seen["logits"][:, 0], vision))
        torch.testing.assert_close(out.loss_terms["reliability_alpha"], bce(seen["logits"][:, 1], alpha))
        assert not torch.allclose(responsibility, torch.full((4,), 0.6))  # not the level's target


def test_partial_target_defaults_to_the_level_for_configs_saved_before_it():
    from dmil_hf import DmilConfig

    assert DmilConfig().reliability_partial_target == "responsibility"
    saved = DmilConfig().to_dict()
    saved.pop("reliability_partial_target")
    assert DmilConfig.from_dict(saved).reliability_partial_target == "level"
    with pytest.raises(ValueError, match="reliability_partial_target"):
        DmilConfig(reliability_partial_target="binary")


# --------------------------------------------------------------------------------------- refitting the heads
def _refit_data(synthetic, n=160):
    corrupted = add_training_corruption(synthetic["train"].select(range(n)), ["a", "b"], fraction=0.3, seed=1)
    return encode_split(corrupted, None, ["a", "b"])


def _refit_model(synthetic, **kwargs):
    torch.manual_seed(0)
    width = len(synthetic["train"][0]["a_features"])
    config = DmilConfig(feature_modalities={"a": width, "b": width}, num_labels=4, hidden_size=16, latent_size=8,
                        feature_hidden_size=16, **kwargs)
    return DmilForMultimodalClassification(config)


def test_refit_reliability_trains_the_heads_alone_towards_their_targets(synthetic):
    encoded = _refit_data(synthetic)
    model = _refit_model(synthetic).train()
    batches = list(torch.utils.data.DataLoader(encoded.with_format("torch"), batch_size=32, shuffle=True,
                                               generator=torch.Generator().manual_seed(0)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = model.refit_reliability(batches, steps=40, learning_rate=1e-2)
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("dmil.reliability.heads.") for n in changed)
    assert model.training  # the mode it had
    # Only the heads named (default: the feature modalities, here both); the same seed draws the same steps.
    model.load_state_dict(before, strict=False)
    again = model.refit_reliability(batches, steps=40, learning_rate=1e-2)
    assert again == losses
    model.load_state_dict(before, strict=False)
    one = model.refit_reliability(batches, steps=5, learning_rate=1e-2, modalities=["b"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("dmil.reliability.heads.b.") for n in changed) and len(one) == 5
    with pytest.raises(ValueError, match="unknown modalities"):
        model.refit_reliability(batches, steps=1, modalities=["c"])
    with pytest.raises(ValueError, match="no heads to refit"):
        model.refit_reliability(batches, steps=1, modalities=[])
    with pytest.raises(ValueError, match="modality_corruption"):
        model.refit_reliability([{k: v for k, v in encoded.with_format("torch")[:8].items()
                                  if k != CORRUPTION_INPUT}], steps=1)


def test_train_staged_refits_the_heads_after_the_last_stage(tmp_path, synthetic):
    from transformers import TrainingArguments

    from dmil_hf.interactions import make_compute_metrics
    from dmil_hf.training import train_staged

    encoded = _refit_data(synthetic)
    weights = {}
    for steps in (0, 5):
        model = _refit_model(synthetic, reliability_refit_steps=steps, stage1_epochs=1, stage2_epochs=0,
                             stage3_epochs=1)
        args = TrainingArguments(output_dir=str(tmp_path / str(steps)), per_device_train_batch_size=32,
                                 report_to="none", seed=0, disable_tqdm=True, use_cpu=True)
        records = train_staged(model, args, encoded, encoded, compute_metrics=make_compute_metrics())
        weights[steps] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert (records[-1]["stage"] == "reliability_refit" and records[-1]["steps"] == 5) == bool(steps)
    differ = {n for n in weights[0] if not torch.equal(weights[0][n], weights[5][n])}
    assert differ and all(n.startswith("dmil.reliability.heads.") for n in differ)


def test_train_staged_refits_on_the_refit_dataset(tmp_path, synthetic):
    from transformers import TrainingArguments

    from dmil_hf.interactions import make_compute_metrics
    from dmil_hf.training import refit_split, train_staged

    model = _refit_model(synthetic, reliability_refit_steps=5, stage1_epochs=1, stage2_epochs=0, stage3_epochs=1)
    clean = synthetic["train"].select(range(160))
    refit = refit_split(model, clean, ["a", "b"])  # its own copy: half the rows again per modality, corrupted
    assert len(refit) == 160 + 2 * 80 and (np.asarray(refit[CORRUPTION_INPUT]) > 0).sum(0).tolist() == [80, 80]
    # A split larger than the refit reads is sampled before it is copied: 100 rows at most, here 50 + 2 x 25.
    capped = refit_split(model, clean, ["a", "b"], max_rows=100)
    kept = [tuple(row) for row, level in zip(capped["a_features"], capped[CORRUPTION_INPUT]) if not any(level)]
    assert len(capped) == 100 and len(kept) == 50 and set(kept) <= {tuple(row) for row in clean["a_features"]}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=32, report_to="none",
                             seed=0, disable_tqdm=True, use_cpu=True)
    encoded = _refit_data(synthetic)
    # The refit reads refit_dataset, not the training split: without the corruption column there is nothing to refit.
    records = train_staged(model, args, encoded, encoded, compute_metrics=make_compute_metrics(),
                           refit_dataset=encoded.remove_columns([CORRUPTION_INPUT]))
    assert [r["stage"] for r in records] == ["stage1", "stage3"]  # no "reliability_refit" record
    records = train_staged(model, dataclasses.replace(args, output_dir=str(tmp_path / "again")), encoded, encoded,
                           compute_metrics=make_compute_metrics(), refit_dataset=_refit_data(synthetic, n=64))
    assert records[-1]["stage"] == "reliability_refit"
    # Configs without the field's copy (saved before it) and models that refit nothing get no split.
    assert refit_split(_refit_model(synthetic, reliability_refit_corruption=None), clean, ["a", "b"]) is None
    assert refit_split(_refit_model(synthetic, reliability_refit_steps=0), clean, ["a", "b"]) is None


def test_reliability_refit_steps_is_checked():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="reliability_refit_steps"):
            DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_refit_steps=bad)
    assert DmilConfig(feature_modalities={"a": 3, "b": 4}).reliability_refit_steps == 3000
    saved = DmilConfig(feature_modalities={"a": 3, "b": 4}).to_dict()
    saved.pop("reliability_refit_steps")
    assert DmilConfig.from_dict(saved).reliability_refit_steps == 0  # configs saved before the field: no refit
    assert DmilConfig(feature_modalities={"a": 3, "b": 4}).refit_modalities() == ["a", "b"]
    assert DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_refit_modalities=["b"]).refit_modalities() == ["b"]
    with pytest.raises(ValueError, match="reliability_refit_modalities"):
        DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_refit_modalities=["c"])
    with pytest.raises(TypeError, match="reliability_refit_modalities"):
        DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_refit_modalities="a")


def test_reliability_refit_corruption_is_checked_and_adds_the_frozen_towers():
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="reliability_refit_corruption"):
            DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_refit_corruption=bad)
    assert DmilConfig(feature_modalities={"a": 3, "b": 4}).reliability_refit_corruption == 0.5
    tester = ModelTester(("text", "vision", "alpha"))
    # The feature modalities and the frozen towers; a tower that trains keeps its head as trained.
    assert tester.config(freeze_towers=["text"]).refit_modalities() == ["text", "alpha"]
    assert tester.config().refit_modalities() == ["alpha"]
    # Configs saved before the field: the refit read the training split and refitted feature heads only.
    saved = tester.config(freeze_towers=["text"]).to_dict()
    saved.pop("reliability_refit_corruption")
    old = DmilConfig.from_dict(saved)
    assert old.reliability_refit_corruption is None and old.refit_modalities() == ["alpha"]


@pytest.mark.parametrize("weight", [None, 0.0, 0.3, 1.0])
def test_partly_corrupted_rows_train_the_components_with_their_weight(weight):
    """`partial_corruption_weight`: a row whose modality is partly noised counts with this weight in the task losses of
    the heads that read that modality (its unimodal head, its unique component, synergy); a row with the modality
    replaced by noise never does. By default (None) feature vectors weigh such rows 0."""
    tester = _features_tester()
    torch.manual_seed(0)
    config = tester.config(modality_dropout=0.0, partial_corruption_weight=weight)
    weight = weight or 0.0
    model = DmilForMultimodalClassification(config).eval()
    model.set_training_stage(3)
    inputs, labels = tester.inputs(), tester.labels()
    heads = ("task_unimodal_alpha", "task_component_unique_alpha", "task_component_synergy")

    def terms(rows, corruption):
        batch = {k: v[rows] for k, v in inputs.items()}
        out = model(**batch, labels=labels[rows], modality_corruption=corruption)
        return {name: float(out.loss_terms[name].detach()) for name in heads + ("task_component_unique_beta",)}

    partial, intact = list(range(4)), list(range(4, 8))
    alone = {key: terms(rows, torch.zeros(4, 2)) for key, rows in (("partial", partial), ("intact", intact))}
    corruption = torch.zeros(8, 2)
    corruption[:4, 0] = 0.4
    mixed = terms(partial + intact, corruption)
    for name in heads:  # the weighted mean of the two halves' losses (each row's loss as if it were intact)
        expected = (4 * alone["intact"][name] + 4 * weight * alone["partial"][name]) / (4 + 4 * weight)
        assert mixed[name] == pytest.approx(expected, rel=1e-5), name
    # beta's own head reads an intact beta on every row
    assert mixed["task_component_unique_beta"] == pytest.approx(
        (alone["intact"]["task_component_unique_beta"] + alone["partial"]["task_component_unique_beta"]) / 2, rel=1e-5)
    corruption[:4, 0] = 1.0  # replaced by noise: never a component's training row
    assert terms(partial + intact, corruption)["task_component_unique_alpha"] == pytest.approx(
        alone["intact"]["task_component_unique_alpha"], rel=1e-5)


def test_partial_corruption_weight_is_checked_and_saved(tmp_path):
    tester = _features_tester()
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="partial_corruption_weight"):
            tester.config(partial_corruption_weight=bad)
    DmilForMultimodalClassification(tester.config(partial_corruption_weight=0.3)).save_pretrained(tmp_path)
    assert DmilForMultimodalClassification.from_pretrained(tmp_path).config.partial_corruption_weight == 0.3


def test_partial_corruption_weight_defaults_to_frozen_towers_only():
    """None (default): DMIL weighs partly corrupted rows 0.3 for its frozen towers and 0 for towers that train and
    feature vectors; a set weight holds for every modality; the baselines and configs saved before the field: 0."""
    tester = ModelTester(("text", "vision", "alpha"))
    config = tester.config(freeze_towers=["text"])
    assert config.partial_corruption_weight is None
    assert config.partial_corruption_weights() == {"text": 0.3, "vision": 0.0, "alpha": 0.0}
    assert tester.config().partial_corruption_weights() == {"text": 0.0, "vision": 0.0, "alpha": 0.0}
    assert tester.config(freeze_towers=["text"], partial_corruption_weight=0.1).partial_corruption_weights() == {
        "text": 0.1, "vision": 0.1, "alpha": 0.1}
    joint = DmilJointConfig.from_dict(config.to_dict())
    assert set(joint.partial_corruption_weights().values()) == {0.0}
    saved = config.to_dict()
    saved.pop("partial_corruption_weight")
    assert set(DmilConfig.from_dict(saved).partial_corruption_weights().values()) == {0.0}
