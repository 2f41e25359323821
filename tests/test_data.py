"""dmil_hf.data: schema validation and loading, the synthetic and digits datasets, degraded test sets."""

import shutil

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Image, load_from_disk
from PIL import Image as PILImage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from dmil_hf.data import (
    dataset_metadata,
    degrade_split,
    degraded_test_sets,
    inspect_dataset,
    load_dataset_from_name_or_path,
    make_digits,
    make_synthetic,
)
from dmil_hf.data import digits as digits_module


def dsd_of(columns, n=6):
    """The same small columns in all three splits."""
    split = Dataset.from_dict({k: v[:n] for k, v in columns.items()})
    return DatasetDict(train=split, validation=split, test=split)


def valid_columns(n=6):
    rng = np.random.default_rng(0)
    return {
        "labels": list(range(n)),
        "text": [f"word {i}" for i in range(n)],
        "alpha_features": rng.normal(size=(n, 3)).astype(np.float32).tolist(),
    }


# -------------------------------------------------------------------- schema


def test_inspect_valid_dataset_with_every_modality_kind():
    n = 4
    columns = {
        "audio": [np.zeros(800, dtype=np.float32).tolist()] * n,
        "beta_features": [[0.0, 1.0]] * n,
        "image": [PILImage.new("RGB", (8, 8))] * n,
        "labels": [0, 1, 2, 1],
        "text": ["a", "b", "c", "d"],
        "audio_sampling_rate": [8000] * n,
        "alpha_features": [[1.0, 2.0, 3.0]] * n,
        "interaction": ["redundancy", "unique_beta", "synergy", "unique_vision"],
    }
    schema = inspect_dataset(dsd_of(columns, n).cast_column("image", Image()))
    assert schema.modalities == ("text", "vision", "audio", "beta", "alpha")
    assert schema.feature_dims == {"beta": 2, "alpha": 3}
    assert schema.num_labels == 3 and schema.has_interaction
    assert schema.interactions == ("redundancy", "unique_vision", "unique_beta", "synergy")
    assert [schema.column_for(m) for m in schema.modalities] == ["text", "image", "audio", "beta_features",
                                                                  "alpha_features"]
    with pytest.raises(ValueError, match="not in this dataset"):
        schema.column_for("gamma")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("labels"), "column 'labels' is missing"),
    (lambda c: c.pop("alpha_features"), "at least two modality columns"),
    (lambda c: c.update(foo=[1] * 6), "column 'foo' is not recognised; expected one of: labels, interaction, text, "
                                      r"image, audio \(\+audio_sampling_rate\), <name>_features"),
    (lambda c: c.update(audio=[[0.0] * 4] * 6), "'audio' needs a column 'audio_sampling_rate'"),
    (lambda c: c.update(labels=[0.5] * 6), "column 'labels' .* expected integer class ids"),
    (lambda c: c.update(labels=[-1, 0, 1, 2, 3, 4]), "column 'labels' .* negative"),
    (lambda c: c.update(vision_features=[[0.0]] * 6), "column 'vision_features'.*identifier other than"),
    (lambda c: c.update(alpha_features=[[0.0] * (1 + i % 2) for i in range(6)]), "different widths"),
    (lambda c: c.update(interaction=["unique_image"] * 6), r"'interaction' .* values \['unique_image'\]"),
    (lambda c: c.update(image=[[0.5] * 4] * 6), "column 'image'"),
])
def test_schema_errors(change, message):
    columns = valid_columns()
    change(columns)
    with pytest.raises(ValueError, match=message):
        inspect_dataset(dsd_of(columns))


def test_split_name_errors():
    split = Dataset.from_dict(valid_columns())
    with pytest.raises(ValueError, match=r"missing \['validation'\] and unexpected \['valid'\]"):
        inspect_dataset(DatasetDict(train=split, valid=split, test=split))
    with pytest.raises(ValueError, match=r"missing \['test'\]"):
        inspect_dataset(DatasetDict(train=split, validation=split))
    with pytest.raises(ValueError, match="expected a datasets.DatasetDict"):
        inspect_dataset(split)


def test_feature_width_must_agree_across_splits():
    dsd = dsd_of(valid_columns())
    other = valid_columns()
    other["alpha_features"] = [[0.0] * 5] * 6
    dsd["test"] = Dataset.from_dict(other)
    with pytest.raises(ValueError, match="'alpha_features' is 5 wide in split 'test'"):
        inspect_dataset(dsd)


def test_checks_respect_selected_rows_and_class_labels():
    columns = valid_columns()
    columns["labels"] = [-1, 0, 1, 2, 1, 0]
    dsd = dsd_of(columns)
    with pytest.raises(ValueError, match="negative"):
        inspect_dataset(dsd)
    kept = DatasetDict({k: v.filter(lambda row: row["labels"] >= 0) for k, v in dsd.items()})
    assert inspect_dataset(kept).num_labels == 3
    named = dsd_of(valid_columns()).class_encode_column("labels")
    assert inspect_dataset(named).label_names == tuple(str(i) for i in range(6))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in dataset"):
        load_dataset_from_name_or_path(tmp_path / "nowhere")
    Dataset.from_dict(valid_columns()).save_to_disk(tmp_path / "single")
    with pytest.raises(ValueError, match="single Dataset"):
        load_dataset_from_name_or_path(tmp_path / "single")
    dsd_of(valid_columns()).save_to_disk(tmp_path / "dsd")
    with pytest.raises(ValueError, match="only apply to the built-in datasets"):
        load_dataset_from_name_or_path(tmp_path / "dsd", num_samples=3)
    with pytest.raises(ValueError, match="bad arguments for the built-in dataset 'synthetic'"):
        load_dataset_from_name_or_path("synthetic", colour="red")
    assert load_dataset_from_name_or_path(tmp_path / "dsd")["train"].num_rows == 6
    assert dataset_metadata(load_dataset_from_name_or_path(tmp_path / "dsd")) == {}


def test_text_column_holding_none_is_refused(tmp_path):
    columns = valid_columns()
    columns["text"][2] = None
    dsd = dsd_of(columns)
    with pytest.raises(ValueError, match=r"column 'text' in split 'train' holds None in 1 row\(s\) \(first: \[2\]\); "
                                         "expected a string in every row"):
        inspect_dataset(dsd)
    dsd.save_to_disk(tmp_path / "none")
    with pytest.raises(ValueError, match="column 'text' in split 'train' holds None"):
        load_dataset_from_name_or_path(tmp_path / "none")


def test_empty_train_split_saved_to_disk_is_named(tmp_path):
    full = Dataset.from_dict(valid_columns())
    DatasetDict(train=full.select([]), validation=full, test=full).save_to_disk(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"split 'train' of the dataset at .*empty.* is empty \(it was saved with no "
                                         r"rows\); every split .* needs at least one row"):
        load_dataset_from_name_or_path(tmp_path / "empty")
    # and in memory
    with pytest.raises(ValueError, match="split 'train' is empty"):
        inspect_dataset(DatasetDict(train=full.select([]), validation=full, test=full))


# -------------------------------------------------------------------- synthetic


def test_synthetic_shapes_mixture_and_determinism():
    dsd = make_synthetic(num_modalities=3, num_classes=5, num_samples=1000, feature_dim=12, bayes_samples=500,
                         mixture={"synergy": 3, "redundancy": 1})
    schema = inspect_dataset(dsd)
    assert schema.modalities == ("a", "b", "c") and schema.feature_dims == {"a": 12, "b": 12, "c": 12}
    assert schema.num_labels == 5 and schema.interactions == ("redundancy", "synergy")
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [700, 150, 150]
    assert dsd["train"].with_format("numpy")[:]["a_features"].dtype == np.float32
    kinds = np.concatenate([dsd[s]["interaction"] for s in dsd])
    assert (kinds == "synergy").sum() == 750
    again = make_synthetic(num_modalities=3, num_classes=5, num_samples=1000, feature_dim=12, bayes_samples=500,
                           mixture={"synergy": 3, "redundancy": 1})
    other = make_synthetic(num_modalities=3, num_classes=5, num_samples=1000, feature_dim=12, bayes_samples=500,
                           mixture={"synergy": 3, "redundancy": 1}, seed=1)
    assert dsd["test"]["a_features"] == again["test"]["a_features"]
    assert dsd["test"]["a_features"] != other["test"]["a_features"]
    default = make_synthetic(num_samples=200, bayes_samples=200)
    assert inspect_dataset(default).interactions == ("redundancy", "unique_a", "unique_b", "synergy")
    with pytest.raises(ValueError, match="unknown interaction types"):
        make_synthetic(num_samples=200, mixture={"unique_z": 1})


def test_synthetic_bayes_accuracy_round_trips(tmp_path):
    dsd = make_synthetic(num_samples=400, bayes_samples=4000)
    bayes = dataset_metadata(dsd)["bayes_accuracy"]
    assert set(bayes) == {"overall", "redundancy", "unique_a", "unique_b", "synergy"}
    assert all(0.9 < v <= 1.0 for v in bayes.values())
    degraded = dataset_metadata(dsd)["bayes_accuracy_degraded"]
    assert degraded["missing_b"]["synergy"] < 0.35 and degraded["missing_b"]["unique_a"] > 0.9
    dsd.save_to_disk(tmp_path / "synthetic")
    loaded = load_dataset_from_name_or_path(tmp_path / "synthetic")
    assert dataset_metadata(loaded)["bayes_accuracy"] == bayes
    assert dataset_metadata(load_from_disk(tmp_path / "synthetic")["test"])["bayes_accuracy"] == bayes
    assert dataset_metadata(loaded["test"].select(range(5)))["bayes_accuracy"] == bayes


def test_synthetic_multi_label_sets_follow_the_class():
    dsd = make_synthetic(num_classes=5, num_samples=300, bayes_samples=200, multi_label=True)
    single = make_synthetic(num_classes=5, num_samples=300, bayes_samples=200)
    sets = np.asarray(dsd["train"]["labels"])
    classes = np.asarray(single["train"]["labels"])
    assert sets.shape == (len(classes), 5) and str(dsd["train"].features["labels"].feature.dtype) == "float32"
    assert set(np.unique(sets)) == {0.0, 1.0}
    # Class y is in the set, and for even y also (y + 1) mod 5: the same samples, the set a function of the class.
    assert (sets[np.arange(len(classes)), classes] == 1).all()
    assert (sets.sum(1) == np.where(classes % 2 == 0, 2, 1)).all()
    assert (sets[classes == 4][:, 0] == 1).all()
    np.testing.assert_array_equal(np.asarray(dsd["train"]["a_features"]), np.asarray(single["train"]["a_features"]))
    assert dataset_metadata(dsd)["builder_kwargs"]["multi_label"] is True


def test_synthetic_synergy_hides_the_label_from_each_modality():
    dsd = make_synthetic(num_samples=4000, mixture={"redundancy": 1, "synergy": 1}, bayes_samples=500)
    split = dsd["train"]
    kinds, labels = np.array(split["interaction"]), np.array(split["labels"])
    for modality in ("a", "b"):
        x = np.asarray(split[f"{modality}_features"])
        for kind, low, high in (("synergy", 0.0, 0.35), ("redundancy", 0.9, 1.0)):
            chosen = kinds == kind
            score = cross_val_score(LogisticRegression(max_iter=500), x[chosen], labels[chosen], cv=3).mean()
            assert low <= score <= high, (modality, kind, score)
    # Together the modalities determine the label: the Bayes classifier is near perfect on synergy samples.
    assert dataset_metadata(dsd)["bayes_classifier_accuracy_by_split"]["train"]["synergy"] > 0.95


# -------------------------------------------------------------------- digits


@pytest.fixture(scope="session")
def digits():
    have_cache = all(p.exists() for p in (digits_module._clip_path(digits_module.default_cache_dir(), w, v)
                                          for w in digits_module.DIGIT_WORDS
                                          for v in digits_module.ALL_VOICES))
    if shutil.which("espeak-ng") is None and not have_cache:
        pytest.skip("espeak-ng is not installed (apt-get install -y --no-install-recommends espeak-ng), so the "
                    "digits dataset cannot speak its digits")
    return make_digits(num_samples=300, noise=0.0)


def test_digits_schema_and_bayes(digits):
    schema = inspect_dataset(digits)
    assert schema.modalities == ("text", "vision", "audio") and schema.num_labels == 10
    assert schema.interactions == ("redundancy", "unique_text", "unique_vision", "unique_audio", "synergy")
    row = digits["train"].with_format("numpy")[0]
    assert row["image"].shape == (16, 16) and digits["train"].features["image"].feature.feature.dtype == "uint8"
    assert row["audio"].dtype == np.float32
    assert len(row["audio"]) == 16000 and row["audio_sampling_rate"] == 16000
    meta = dataset_metadata(digits)
    assert meta["bayes_accuracy"]["overall"] == 1.0
    assert meta["bayes_accuracy_degraded"]["missing_vision"]["synergy"] == pytest.approx(0.1)
    assert meta["bayes_accuracy_degraded"]["missing_text"]["unique_audio"] == 1.0


def test_digits_texts_follow_the_interaction_design(digits):
    words = set(digits_module.DIGIT_WORDS)
    for split in digits.values():
        for text, kind, label in zip(split["text"], split["interaction"], split["labels"]):
            named = [w for w in text.split() if w in words]
            if kind in ("redundancy", "unique_text"):
                assert named == [digits_module.DIGIT_WORDS[label]]
            else:
                assert named == []  # no number: the text carries nothing about the label


def test_digits_held_out_templates_and_images(digits):
    def templates(group):
        return [t for kind in digits_module.TEMPLATES.values() for t in kind[group]]

    def matches(text, template):
        return text == template or ("{w}" in template and any(text == template.format(w=w)
                                                              for w in digits_module.DIGIT_WORDS))

    # Each split has its own sentence templates: validation is held out from training as test is.
    for split in ("train", "validation", "test"):
        for text in digits[split]["text"]:
            assert any(matches(text, t) for t in templates(split))
            assert not any(matches(text, t) for other in ("train", "validation", "test") if other != split
                           for t in templates(other))
    # noise=0: an image is a function of its sklearn index, so no test image may appear in train or validation.
    seen = {np.asarray(x).tobytes() for s in ("train", "validation") for x in digits[s]["image"]}
    test_images = [np.asarray(x) for x, k in zip(digits["test"]["image"], digits["test"]["interaction"])
                   if k in ("redundancy", "unique_vision", "synergy")]
    assert test_images and not any(x.tobytes() in seen for x in test_images)


def test_digits_plan_holds_out_voices_and_image_indices():
    rng = np.random.default_rng(0)
    _, pools = digits_module._image_pools(rng, 0.15, 0.15)
    flat = {s: set(np.concatenate(p)) for s, p in pools.items()}
    assert not flat["test"] & (flat["train"] | flat["validation"]) and not flat["train"] & flat["validation"]
    shares = {k: 0.2 for k in digits_module.INTERACTION_TYPES}
    train = digits_module._plan("train", 300, shares, rng, pools)
    validation = digits_module._plan("validation", 300, shares, rng, pools)
    test = digits_module._plan("test", 300, shares, rng, pools)
    voices = {name: {s["voice"] for s in plan} for name, plan in (("train", train), ("validation", validation),
                                                                   ("test", test))}
    assert voices["test"] <= set(digits_module.TEST_VOICES)
    assert voices["validation"] <= set(digits_module.VALIDATION_VOICES)
    assert not voices["train"] & (voices["validation"] | voices["test"]) and not voices["validation"] & voices["test"]
    assert {s["image"] for s in test if s["image"] >= 0} <= flat["test"]
    # the non-carrying modalities are blank on unique samples; synergy shows (u, (y - u) mod 10)
    for s in train:
        if s["interaction"] == "unique_text":
            assert s["image"] == -1 and s["word"] == -1
        if s["interaction"] == "synergy":
            assert s["image"] >= 0 and s["word"] >= 0


def test_digits_without_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(digits_module.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends espeak-ng"):
        make_digits(num_samples=60, cache_dir=tmp_path / "empty")


# -------------------------------------------------------------------- degraded sets


def test_degraded_feature_sets():
    dsd = make_synthetic(num_samples=400, bayes_samples=200)
    sets = degraded_test_sets(dsd)
    kinds = ["missing", "noise", "blank", "partial25", "partial50", "partial75"]  # no natural corruption for vectors
    assert sorted(sets) == sorted(f"{kind}_{m}" for kind in kinds for m in ("a", "b"))
    test = dsd["test"]
    assert sets["missing_a"].column_names == ["b_features", "labels", "interaction"]
    noisy = sets["noise_a"].with_format("numpy")[:]["a_features"]
    clean = test.with_format("numpy")[:]["a_features"]
    assert noisy.shape == clean.shape and noisy.dtype == np.float32 and not np.allclose(noisy, clean)
    np.testing.assert_allclose(noisy.mean(0), clean.mean(0), atol=0.35)
    np.testing.assert_allclose(noisy.std(0), clean.std(0), rtol=0.3)
    assert sets["noise_a"]["b_features"] == test["b_features"] and sets["noise_a"]["labels"] == test["labels"]
    assert degraded_test_sets(dsd)["noise_a"]["a_features"] == sets["noise_a"]["a_features"]  # deterministic
    assert dataset_metadata(sets["noise_a"]) == dataset_metadata(dsd)
    with pytest.raises(ValueError, match="mode must be one of"):
        degrade_split(test, "a", "smudge")
    with pytest.raises(ValueError, match="'blur' applies to the columns"):
        degrade_split(test, "a", "blur")
    with pytest.raises(ValueError, match="modality 'z'"):
        degrade_split(test, "z", "noise")


def test_degraded_text_image_audio_sets(digits):
    sets = degraded_test_sets(digits)
    shared = [f"{kind}_{m}" for m in ("text", "vision", "audio")
              for kind in ("missing", "noise", "blank", "partial25", "partial50", "partial75")]
    natural = ["blur1.5_vision", "occlusion40_vision", "background5db_audio", "background0db_audio",
               "word_dropout50_text"]
    assert sorted(sets) == sorted(shared + natural)
    test = digits["test"]
    assert "audio_sampling_rate" not in sets["missing_audio"].column_names
    assert "image" not in sets["missing_vision"].column_names and "text" in sets["missing_vision"].column_names
    vocabulary = {w for t in test["text"] for w in t.split()}
    for before, after in zip(test["text"], sets["noise_text"]["text"]):
        assert len(after.split()) == len(before.split()) and set(after.split()) <= vocabulary
    image, noise_image = (s.with_format("numpy")["image"][0] for s in (test, sets["noise_vision"]))
    assert noise_image.shape == image.shape and not np.array_equal(image, noise_image)
    assert sets["noise_vision"].features["image"] == test.features["image"]
    clip, noise_clip = (s.with_format("numpy")["audio"][1] for s in (test, sets["noise_audio"]))
    assert noise_clip.shape == clip.shape and noise_clip.dtype == np.float32
    assert np.sqrt((noise_clip ** 2).mean()) == pytest.approx(np.sqrt((clip ** 2).mean()), rel=0.1)
    inspect_dataset(DatasetDict(train=sets["noise_audio"], validation=sets["noise_audio"], test=sets["noise_audio"]))


def test_degraded_pil_images():
    n = 4
    columns = {"labels": [0, 1, 0, 1], "text": ["a b", "c", "d e f", "g"],
               "image": [PILImage.new("L", (5, 7), color=i * 40) for i in range(n)]}
    split = Dataset.from_dict(columns).cast_column("image", Image())
    noisy = degrade_split(split, "vision", "noise")
    assert isinstance(noisy.features["image"], Image)
    assert noisy[0]["image"].mode == "L" and noisy[0]["image"].size == (5, 7)


def test_a_dataset_is_inspected_once_until_it_changes(tmp_path, monkeypatch):
    import dmil_hf.data.schema as schema_module

    calls = []
    inspect = schema_module._inspect
    monkeypatch.setattr(schema_module, "_inspect", lambda dsd: calls.append(1) or inspect(dsd))
    monkeypatch.setattr(schema_module, "_INSPECTED", {})  # earlier tests inspected the same columns
    dsd = dsd_of(valid_columns())
    dsd.save_to_disk(tmp_path / "dsd")
    loaded = load_dataset_from_name_or_path(tmp_path / "dsd")  # loading validates ...
    assert inspect_dataset(loaded) == inspect_dataset(loaded) and len(calls) == 1  # ... and training reuses it
    changed = DatasetDict({name: split.map(lambda row: {"labels": row["labels"] % 2}) for name, split in loaded.items()})
    assert inspect_dataset(changed).num_labels == 2 and len(calls) == 2  # a transform changes the fingerprints
