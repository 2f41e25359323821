"""Interaction estimators: exact PID values, information identities, estimates on synthetic data, metrics, plots."""

import itertools

import numpy as np
import pytest

from dmil_hf.interactions import (
    PIDConvergenceWarning,
    estimate_interactions,
    joint_table,
    make_compute_metrics,
    metric_path,
    mutual_information,
    per_sample_interactions,
    pid_from_samples,
    pid_from_table,
    plot_per_sample,
    pointwise_interactions,
)

# I(X1; Y) for y = x1 AND x2 with uniform bits: h(1/4) - 1/2 (about 0.311).
AND_REDUNDANCY = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75)) - 0.5


def with_entry(value):
    table = np.full((2, 2, 2), 0.125)
    table[0, 0, 0], table[1, 1, 1] = 0.125 + value, 0.125 - value
    return table


def binary_table(fn):
    table = np.zeros((2, 2, 2))
    for a, b in itertools.product((0, 1), repeat=2):
        table[a, b, fn(a, b)] += 0.25
    return table


def random_table(rng, shape=None, alpha=1.0):
    shape = shape or tuple(rng.integers(2, 6, size=3))
    return rng.dirichlet(np.full(int(np.prod(shape)), alpha)).reshape(shape)


def components(result):
    return (result.redundancy, *result.unique, result.synergy)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (lambda a, b: a ^ b, (0.0, 0.0, 0.0, 1.0)),
        (lambda a, b: a & b, (AND_REDUNDANCY, 0.0, 0.0, 0.5)),
        (lambda a, b: a | b, (AND_REDUNDANCY, 0.0, 0.0, 0.5)),
        (lambda a, b: a, (0.0, 1.0, 0.0, 0.0)),
        (lambda a, b: b, (0.0, 0.0, 1.0, 0.0)),
    ],
    ids=["xor", "and", "or", "y=x1", "y=x2"],
)
def test_exact_binary_cases(fn, expected):
    result = pid_from_table(binary_table(fn))
    assert result.converged
    np.testing.assert_allclose(components(result), expected, atol=1e-3)
    assert result.total == pytest.approx(sum(expected), abs=1e-9)


def test_copied_variable_is_pure_redundancy():
    table = np.zeros((2, 2, 2))
    table[0, 0, 0] = table[1, 1, 1] = 0.5
    np.testing.assert_allclose(components(pid_from_table(table)), (1.0, 0.0, 0.0, 0.0), atol=1e-3)


def test_independent_parts_add_up():
    # x1 = (a, c), x2 = (b, c), y = (a xor b, c): one redundant bit (c) and one synergistic bit (a xor b).
    a, b, c = np.array(list(itertools.product((0, 1), repeat=3))).T
    result = pid_from_samples(np.stack([a, c], 1), np.stack([b, c], 1), 2 * (a ^ b) + c)
    np.testing.assert_allclose(components(result), (1.0, 0.0, 0.0, 1.0), atol=1e-3)


def test_identities_on_random_tables():
    rng = np.random.default_rng(0)
    for k in range(20):
        table = random_table(rng, alpha=1.0 if k % 2 else 0.2)
        result = pid_from_table(table)
        n1, n2, ny = table.shape
        assert result.converged, result.solver_message
        assert min(components(result)) >= 0.0
        assert result.redundancy + result.unique[0] == pytest.approx(mutual_information(table.sum(1)), abs=1e-6)
        assert result.redundancy + result.unique[1] == pytest.approx(mutual_information(table.sum(0)), abs=1e-6)
        assert sum(components(result)) == pytest.approx(mutual_information(table.reshape(n1 * n2, ny)), abs=1e-6)
        assert result.total == pytest.approx(sum(components(result)), abs=1e-6)


def test_barrier_agrees_with_scipy_trust_constr():
    rng = np.random.default_rng(1)
    for shape in [(2, 3, 2), (3, 3, 3), (4, 3, 2)]:
        table = random_table(rng, shape)
        barrier = pid_from_table(table)
        scipy_result = pid_from_table(table, method="trust-constr", tol=1e-9)
        np.testing.assert_allclose(components(barrier), components(scipy_result), atol=1e-3)
        # The barrier solution is at least as good: synergy is I_p - min I_q.
        assert barrier.synergy >= scipy_result.synergy - 1e-6


def test_largest_supported_table_converges():
    result = pid_from_table(random_table(np.random.default_rng(2), (20, 20, 10), alpha=0.5))
    assert result.converged, result.solver_message


def test_result_serialises():
    result = pid_from_table(binary_table(lambda a, b: a ^ b))
    as_dict = result.to_dict()
    assert as_dict["units"] == "bits" and as_dict["synergy"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(AttributeError):
        result.synergy = 0.0  # frozen


def test_not_converged_warns():
    with pytest.warns(PIDConvergenceWarning, match="did not converge"):
        result = pid_from_table(random_table(np.random.default_rng(3), (4, 4, 3)), max_iterations=2)
    assert not result.converged


def test_joint_table_from_discrete_samples():
    table = joint_table(["u", "v", "u", "v"], [0, 0, 1, 1], [1, 0, 0, 1])
    assert table.shape == (2, 2, 2) and table.sum() == pytest.approx(1.0)
    assert table[0, 0, 1] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "table, match",
    [
        (with_entry(0.25), "negative"),
        (np.full((2, 2, 2), 0.2), "sum to 1"),
        (np.full((2, 4), 0.125), "3-D"),
        (with_entry(np.nan), "NaN"),
    ],
    ids=["negative", "not-normalised", "rank", "nan"],
)
def test_bad_tables(table, match):
    with pytest.raises(ValueError, match=f"`table`.*{match}|{match}.*`table`"):
        pid_from_table(table)


def test_bad_solver_arguments():
    table = binary_table(lambda a, b: a ^ b)
    with pytest.raises(ValueError, match="`method`"):
        pid_from_table(table, method="newton")
    with pytest.raises(ValueError, match="`tol`"):
        pid_from_table(table, tol=0)


def test_bad_modalities():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="at least two"):
        estimate_interactions({"a": x}, np.zeros(10, int))
    with pytest.raises(ValueError, match="same number of rows"):
        estimate_interactions({"a": x, "b": np.zeros((9, 2))}, np.zeros(10, int))
    with pytest.raises(ValueError, match="same number of rows"):
        estimate_interactions({"a": x, "b": x}, np.zeros(11, int))
    with pytest.raises(ValueError, match=r"modalities\['b'\].*NaN"):
        estimate_interactions({"a": x, "b": np.full((10, 2), np.inf)}, np.zeros(10, int))
    with pytest.raises(ValueError, match="`labels`.*discrete"):
        estimate_interactions({"a": x, "b": x}, np.linspace(0, 1, 10))
    with pytest.raises(ValueError, match=r"same number of rows.*'x2': 2"):
        pid_from_samples([0, 1, 0], [0, 1], [0, 1, 1])


def test_bad_probabilities():
    probs = np.full((4, 2), 0.5)
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="at least two"):
        pointwise_interactions({"a": probs}, probs, labels)
    with pytest.raises(ValueError, match=r"unimodal_probs\['b'\].*sum to 1"):
        pointwise_interactions({"a": probs, "b": probs * 1.1}, probs, labels)
    with pytest.raises(ValueError, match="`joint_probs`.*negative"):
        pointwise_interactions({"a": probs, "b": probs}, probs * np.array([2.0, -1.0]), labels)
    with pytest.raises(ValueError, match="same number of rows"):
        pointwise_interactions({"a": probs, "b": probs}, probs, labels[:3])
    with pytest.raises(ValueError, match="`labels`"):
        pointwise_interactions({"a": probs, "b": probs}, probs, labels + 1)


# ---- continuous features: gaussian clusters around the ids of hidden discrete variables ----

def embed(ids, n_ids, rng, noise=0.4):
    """Each id becomes a gaussian blob on a circle of radius 3 in the first two of three feature dimensions."""
    angle = 2 * np.pi * np.asarray(ids) / n_ids
    centres = np.stack([3 * np.cos(angle), 3 * np.sin(angle), np.zeros(len(angle))], axis=1)
    return centres + noise * rng.normal(size=centres.shape)


def synthetic(kind, n=2000, seed=0, synergy_share=0.5):
    rng = np.random.default_rng(seed)
    a, b, c = (rng.integers(0, 2, n) for _ in range(3))
    if kind == "redundancy":  # both modalities see the label
        return {"x1": embed(c, 2, rng), "x2": embed(c, 2, rng)}, c
    if kind == "synergy":  # the label is the xor of what each modality sees
        return {"x1": embed(a, 2, rng), "x2": embed(b, 2, rng)}, a ^ b
    if kind == "unique":  # only x1 sees the label
        return {"x1": embed(a, 2, rng), "x2": embed(b, 2, rng)}, a
    # mixture: a share of samples is xor-labelled, the rest redundant; the ids 2, 3 mark the redundant ones
    xor = rng.random(n) < synergy_share
    modalities = {"x1": embed(np.where(xor, a, 2 + c), 4, rng), "x2": embed(np.where(xor, b, 2 + c), 4, rng)}
    return modalities, np.where(xor, a ^ b, c)


@pytest.mark.parametrize("kind", ["redundancy", "synergy", "unique"])
def test_continuous_estimate_finds_the_dominant_interaction(kind):
    result = estimate_interactions(*synthetic(kind), n_clusters=4)
    values = {"redundancy": result["redundancy"], "unique": result["unique"]["x1"], "synergy": result["synergy"],
              "other unique": result["unique"]["x2"]}
    assert values[kind] > 0.8, values
    assert all(v < 0.1 for k, v in values.items() if k != kind), values
    assert result["units"] == "bits"
    assert result["method"] == {"estimator": "broja-kmeans", "n_clusters": 4, "seed": 0, "n_samples": 2000,
                                "converged": True}
    assert len(result["pairs"]) == 1 and result["pairs"][0]["modalities"] == ["x1", "x2"]


def test_synergy_estimate_increases_with_synergy_share():
    synergy = [estimate_interactions(*synthetic("mixture", synergy_share=share), n_clusters=8)["synergy"]
               for share in (0.0, 0.5, 1.0)]
    assert synergy[0] < synergy[1] < synergy[2], synergy
    np.testing.assert_allclose(synergy, [0.0, 0.5, 1.0], atol=0.1)


def test_discrete_modalities_skip_clustering():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    result = estimate_interactions({"a": a, "b": b}, a ^ b)
    expected = pid_from_samples(a, b, a ^ b)
    assert result["synergy"] == pytest.approx(expected.synergy, abs=1e-12)


def test_three_modalities_report_pairs_and_means():
    modalities, labels = synthetic("redundancy", n=1000)
    modalities["noise"] = np.random.default_rng(1).normal(size=(1000, 2))
    result = estimate_interactions(modalities, labels, n_clusters=3)
    assert [p["modalities"] for p in result["pairs"]] == [["x1", "x2"], ["x1", "noise"], ["x2", "noise"]]
    assert result["redundancy"] == pytest.approx(np.mean([p["redundancy"] for p in result["pairs"]]))
    assert result["unique"]["x1"] == pytest.approx(np.mean([p["unique"]["x1"] for p in result["pairs"][:2]]))
    assert result["unique"]["x1"] > 0.4 > result["unique"]["noise"]


# ---- per sample ----

def test_pointwise_rule():
    probs = {"a": np.array([[0.5, 0.5], [0.1, 0.9]]), "b": np.array([[0.5, 0.5], [0.3, 0.7]])}
    joint = np.array([[0.0, 1.0], [0.05, 0.95]])
    out = pointwise_interactions(probs, joint, np.array([1, 1]), prior=np.array([0.5, 0.5]))
    i_a, i_b = np.log2(0.9 / 0.5), np.log2(0.7 / 0.5)
    np.testing.assert_allclose(out["synergy"], [1.0, np.log2(0.95 / 0.5) - i_a])
    np.testing.assert_allclose(out["redundancy"], [0.0, i_b])
    np.testing.assert_allclose(out["unique_a"], [0.0, i_a - i_b])
    np.testing.assert_allclose(out["unique_b"], [0.0, 0.0])


def test_per_sample_synergy_dominates_on_xor():
    modalities, labels = synthetic("synergy", n=600)
    per_sample = per_sample_interactions(modalities, labels, unimodal="logistic")
    assert all(v.shape == (600,) for v in per_sample.values())
    others = per_sample["redundancy"] + per_sample["unique_x1"] + per_sample["unique_x2"]
    assert per_sample["synergy"].mean() > 0.7 > 0.2 > others.mean()


def test_plot_per_sample(tmp_path):
    per_sample = {"redundancy": np.zeros(6), "unique_a": np.ones(6), "synergy": np.arange(6.0)}
    path = plot_per_sample(per_sample, ["r", "s"] * 3, tmp_path / "plots" / "per_sample.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


# ---- evaluate metric and Trainer compute_metrics ----

def test_metric_module_loads_offline():
    import evaluate  # conftest.py sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 before anything imports it

    metric = evaluate.load(metric_path())
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    result = metric.compute(x1=a.tolist(), x2=b.tolist(), references=(a ^ b).tolist())
    assert result["synergy"] == pytest.approx(1.0, abs=0.02)
    assert result["converged"] and result["n_samples"] == 400
    modalities, labels = synthetic("unique", n=500)
    result = metric.compute(x1=modalities["x1"].tolist(), x2=modalities["x2"].tolist(), references=labels.tolist(),
                            n_clusters=4)
    assert result["unique_x1"] > 0.8


def test_compute_metrics_per_interaction_type():
    from transformers import EvalPrediction

    logits = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    labels = np.array([0, 1, 0, 0, 2, 2])
    kinds = ["redundancy", "synergy", "synergy", "redundancy", "synergy", "unique"]
    weights = np.tile([0.7, 0.1, 0.1, 0.1], (6, 1))
    compute = make_compute_metrics(kinds, component_names=["redundancy", "unique_a", "unique_b", "synergy"])
    metrics = compute(EvalPrediction(predictions=(logits, weights), label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["accuracy_redundancy"] == 1.0
    assert metrics["accuracy_synergy"] == pytest.approx(1 / 3)
    assert metrics["accuracy_unique"] == 1.0
    assert metrics["weight_redundancy"] == pytest.approx(0.7)
    assert metrics["weight_synergy_unique"] == pytest.approx(0.1)
    assert make_compute_metrics()((logits, labels)) == {"accuracy": pytest.approx(4 / 6)}
    regression = make_compute_metrics(["a", "b"])(EvalPrediction(predictions=np.array([[1.0], [2.0]]),
                                                                  label_ids=np.array([1.0, 0.0])))
    assert regression == {"mse": 2.0, "mse_a": 0.0, "mse_b": 4.0}
    with pytest.raises(ValueError, match="`interactions`"):
        compute(EvalPrediction(predictions=logits[:4], label_ids=labels[:4]))


def test_compute_metrics_multi_label_exact_match_and_micro_f1():
    from transformers import EvalPrediction

    # Each label is predicted present where its logit is positive.
    logits = np.array([[2.0, -1.0, 3.0], [-2.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    metrics = make_compute_metrics(["a", "a", "b", "b"])(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == 0.5 and metrics["accuracy_a"] == 1.0 and metrics["accuracy_b"] == 0.0
    # 4 right of 5 predicted present, 4 of 5 truly present: F1 = 2·4 / (5 + 5).
    assert metrics["f1_micro"] == pytest.approx(0.8)
