"""`dmil estimate`: dataset-level and per-sample interaction estimates from the command line, and the glue that turns
each modality into a numeric matrix (`dmil_hf.interactions.dataset`)."""

import json

import numpy as np
import pytest
from datasets import Dataset

from dmil_hf.cli import main
from dmil_hf.configuration_dmil import TOWER_MODALITIES
from dmil_hf.data import make_synthetic
from dmil_hf.interactions.dataset import log_mel_summary, modality_arrays, modality_arrays_with_info

FAST = ["--dataset-arg", "bayes_samples=500", "--per-sample-classifier", "logistic"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_estimate_synthetic_writes_json_per_sample_file_and_plot(tmp_path, capsys):
    output = tmp_path / "est.json"
    assert main(["estimate", "--dataset", "synthetic", "--dataset-arg", "num_samples=600", "--output",
                 str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["units"] == "bits"
    assert {"redundancy", "unique", "synergy", "total", "method"} <= set(report)
    assert set(report["unique"]) == {"a", "b"}
    parts = report["redundancy"] + sum(report["unique"].values()) + report["synergy"]
    assert parts == pytest.approx(report["total"], abs=1e-6) and report["total"] > 0
    method = report["method"]
    assert method["split"] == "test" and method["n_clusters"] == 10 and method["seed"] == 0
    assert method["representation"]["source"] == "default"
    assert set(method["representation"]["per_modality"]) == {"a", "b"}

    n_test = len(make_synthetic(num_samples=600, bayes_samples=10)["test"])
    rows = read_jsonl(tmp_path / "est.per_sample.jsonl")
    assert len(rows) == method["n_samples"] == n_test
    assert [r["index"] for r in rows] == list(range(n_test))
    for key in ("interaction", "label", "redundancy", "unique_a", "unique_b", "synergy"):
        assert key in rows[0]
    assert all(r["redundancy"] >= 0 and r["synergy"] >= 0 for r in rows)
    png = tmp_path / "est.per_sample.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "redundancy" in out and "synergy" in out and "by ground-truth interaction" in out


@pytest.mark.parametrize("kind", ["synergy", "redundancy"])
def test_single_interaction_type_dominates(tmp_path, kind):
    output = tmp_path / f"{kind}.json"
    assert main(["estimate", "--dataset", "synthetic", "--dataset-arg", "num_samples=600",
                 "--dataset-arg", f'mixture={{"{kind}": 1}}', "--split", "all", *FAST,
                 "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    components = {"redundancy": report["redundancy"], "synergy": report["synergy"], **report["unique"]}
    assert max(components, key=components.get) == kind
    assert components[kind] > 0.75 * report["total"]
    rows = read_jsonl(tmp_path / f"{kind}.per_sample.jsonl")
    assert len(rows) == 600 and {r["split"] for r in rows} == {"train", "validation", "test"}
    means = {c: np.mean([r[c] for r in rows]) for c in ("redundancy", "unique_a", "unique_b", "synergy")}
    assert max(means, key=means.get) == kind


def quick_trained_dmil(train_split, path, steps_per_stage=15):
    """A tiny DMIL trained for a few Adam steps per stage (staged like `dmil train`, without Trainer's per-epoch
    evaluation and checkpoints, which cost ~15 s even for one epoch per stage) and saved with `save_pretrained`."""
    import torch

    from dmil_hf import DmilConfig, DmilForMultimodalClassification

    torch.manual_seed(0)
    model = DmilForMultimodalClassification(DmilConfig(feature_modalities={"a": 16, "b": 16}, num_labels=4,
                                                       hidden_size=32, latent_size=8, feature_hidden_size=32))
    data = train_split.with_format("torch")
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only stall when the machine is busy
    try:
        train_stages(model, data, steps_per_stage)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path)
    return model


def train_stages(model, data, steps_per_stage):
    import torch

    for stage in (1, 2, 3):
        model.set_training_stage(stage)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for step in range(steps_per_stage):
            start = (step * 32) % (len(data) - 32)
            batch = data[start:start + 32]
            loss = model(a_features=batch["a_features"], b_features=batch["b_features"], labels=batch["labels"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_estimate_with_trained_model_adds_interaction_weights(tmp_path):
    dsd = make_synthetic(num_samples=200, bayes_samples=200)
    dsd.save_to_disk(tmp_path / "data")
    model_dir = tmp_path / "model"
    quick_trained_dmil(dsd["train"], model_dir)
    output = tmp_path / "est.json"
    assert main(["estimate", "--dataset", str(tmp_path / "data"), "--model", str(model_dir), "--n-clusters", "4",
                 "--per-sample-classifier", "logistic", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    representation = report["method"]["representation"]
    assert representation["source"] == "model" and representation["model"] == str(model_dir)
    assert all(d.startswith("model:") for d in representation["per_modality"].values())
    assert report["method"]["per_sample"]["model_weights"] is True
    rows = read_jsonl(tmp_path / "est.per_sample.jsonl")
    assert len(rows) == 30
    names = ["weight_redundancy", "weight_unique_a", "weight_unique_b", "weight_synergy"]
    for row in rows:
        assert sum(row[n] for n in names) == pytest.approx(1.0, abs=1e-4)
        assert "unique_a" in row and "interaction" in row


def test_model_embeddings_shape(tmp_path):
    import torch

    from dmil_hf import DmilConfig, DmilForMultimodalClassification

    split = make_synthetic(num_samples=100, bayes_samples=10)["test"]
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(DmilConfig(feature_modalities={"a": 16, "b": 16}, num_labels=4,
                                                       hidden_size=24, latent_size=8, feature_hidden_size=16))
    arrays, info = modality_arrays_with_info(split, ["a", "b"], model, batch_size=4)
    assert {k: v.shape for k, v in arrays.items()} == {"a": (15, 24), "b": (15, 24)}
    assert model.training  # left as it was
    again = modality_arrays(split, ["b", "a"], model, batch_size=64)
    np.testing.assert_allclose(again["a"], arrays["a"], atol=1e-5)


def test_default_representations_of_text_image_audio():
    rng = np.random.default_rng(0)
    n = 40
    words = ["red", "green", "blue", "cat", "dog", "seven", "three"]
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(n // 2)]
    images += [rng.integers(0, 256, (12, 10), dtype=np.uint8) for _ in range(n - n // 2)]  # mixed sizes
    split = Dataset.from_dict({
        "text": [" ".join(rng.choice(words, 4)) for _ in range(n)],
        "image": [i.tolist() for i in images],
        "audio": [rng.normal(scale=0.1, size=int(rng.integers(800, 2000))).astype(np.float32).tolist()
                  for _ in range(n)],
        "audio_sampling_rate": [8000] * n,
        "x_features": rng.normal(size=(n, 3)).tolist(),
        "labels": rng.integers(0, 2, n).tolist(),
    })
    arrays, info = modality_arrays_with_info(split, [*TOWER_MODALITIES, "x"], dims=8)
    assert arrays["text"].shape == arrays["vision"].shape == arrays["audio"].shape == (n, 8)
    assert arrays["x"].shape == (n, 3)
    assert all(np.isfinite(a).all() for a in arrays.values())
    assert "tfidf" in info["text"] and "PCA" in info["vision"] and "mel" in info["audio"]
    assert "resized" in info["vision"]
    summary = log_mel_summary(np.zeros(10, dtype=np.float32), 16000)  # shorter than a frame, silent
    assert summary.shape == (80,) and np.isfinite(summary).all()
    with pytest.raises(ValueError, match="at least two modalities"):
        modality_arrays(split, ["text"])


@pytest.mark.parametrize("extra,message", [
    (["--split", "dev"], "split 'dev' is not in the dataset"),
    (["--modalities", "a"], "at least two modalities"),
    (["--modalities", "a", "z"], "not in the dataset"),
    (["--n-clusters", "1"], "--n-clusters"),
])
def test_bad_arguments_exit_2_with_message(tmp_path, capsys, extra, message):
    code = main(["estimate", "--dataset", "synthetic", "--dataset-arg", "num_samples=100",
                 "--dataset-arg", "bayes_samples=10", *extra, "--output", str(tmp_path / "est.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dmil estimate: error:") and message in err
    assert not (tmp_path / "est.json").exists()
