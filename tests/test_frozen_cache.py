"""Frozen towers (`DmilConfig.freeze_towers`) and the embedding cache of their pooled outputs."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.configuration_dmil import TOWER_MODALITIES as MODALITIES
from dmil_hf.cli import main
from dmil_hf.embedding_cache import cache_tower_embeddings
from dmil_hf.experiment import predict
from dmil_hf.interactions import make_compute_metrics
from dmil_hf.training import apply_lora, train_staged

from conftest import ModelTester


def rows(tester, n=32, seed=0):
    inputs = ModelTester(tester.modalities, seed=seed).inputs(n)
    return Dataset.from_dict({**{k: v.numpy() for k, v in inputs.items()},
                              "labels": tester.labels(n).numpy()}).with_format("torch")


def build(tester, seed=0, **kwargs):
    torch.manual_seed(seed)
    return DmilForMultimodalClassification(tester.config(**kwargs))


def args_for(path):
    return TrainingArguments(str(path), per_device_train_batch_size=16, report_to="none", seed=0, disable_tqdm=True,
                             use_cpu=True)


def tower_state(model, modality):
    return {k: v.clone() for k, v in model.dmil.encoders.towers[modality].state_dict().items()}


# --- the config field ------------------------------------------------------------------------------------------

def test_freeze_towers_is_validated_and_saved(tmp_path):
    tester = ModelTester(MODALITIES)
    with pytest.raises(ValueError, match=r"unknown modalities \['txt'\].*\['text', 'vision', 'audio'\]"):
        tester.config(freeze_towers=["txt"])
    with pytest.raises(TypeError, match=r"e\.g\. \['text'\]"):
        tester.config(freeze_towers="text")
    assert tester.config(freeze_towers=True).frozen_modalities == MODALITIES
    assert tester.config(freeze_towers=["audio", "text"]).frozen_modalities == ("text", "audio")
    assert tester.config().frozen_modalities == ()
    model = build(tester, freeze_towers=["audio"])
    model.save_pretrained(tmp_path)
    reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path)
    assert reloaded.config.frozen_modalities == ("audio",)
    assert not any(p.requires_grad for p in reloaded.dmil.encoders.towers["audio"].parameters())


# --- freezing --------------------------------------------------------------------------------------------------

def test_frozen_tower_gets_no_gradient_and_stays_in_eval_in_every_stage():
    tester = ModelTester(MODALITIES)
    model = build(tester, freeze_towers=["text", "audio"])
    towers = model.dmil.encoders.towers
    for stage in (1, 2, 3):
        model.set_training_stage(stage).train()
        assert not towers["text"].training and not towers["audio"].training
        assert not any(p.requires_grad for m in ("text", "audio") for p in towers[m].parameters())
        assert towers["vision"].training == (stage != 2)
    model.set_training_stage(1).train()
    model(labels=tester.labels(), **tester.inputs()).loss.backward()
    assert all(p.grad is None for m in ("text", "audio") for p in towers[m].parameters())
    assert all(p.grad is not None for p in towers["vision"].parameters() if p.requires_grad)
    # the projection of a frozen tower still trains
    assert model.dmil.encoders.projections["text"][0].weight.grad is not None


def test_a_pretrained_tower_swapped_in_is_frozen(tmp_path):
    from transformers import BertModel

    from dmil_hf.towers import text_tower_config

    BertModel(text_tower_config("tiny", vocab_size=50)).save_pretrained(tmp_path / "bert")
    model = DmilForMultimodalClassification.from_encoders_pretrained(
        text=str(tmp_path / "bert"), feature_modalities={"alpha": 6}, num_labels=3, freeze_towers=["text"])
    tower = model.dmil.encoders.towers["text"]
    assert not any(p.requires_grad for p in tower.parameters())
    model.set_training_stage(3).train()
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in model.dmil.encoders.towers["alpha"].parameters())


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "live"])
def test_frozen_tower_is_bit_identical_after_staged_training(tmp_path, cache):
    tester = ModelTester(("text", "vision"))
    model = build(tester, freeze_towers=["text"], stage1_epochs=1, stage2_epochs=1, stage3_epochs=1)
    text, vision = tower_state(model, "text"), tower_state(model, "vision")
    data = rows(tester)
    train_staged(model, args_for(tmp_path / "run"), data, data, compute_metrics=make_compute_metrics(),
                 embedding_cache=tmp_path / "cache" if cache else False)
    after = model.dmil.encoders.towers
    assert all(torch.equal(v, after["text"].state_dict()[k]) for k, v in text.items())
    assert any(not torch.equal(v, after["vision"].state_dict()[k]) for k, v in vision.items())


def test_lora_skips_frozen_towers_and_refuses_to_adapt_one(tmp_path):
    tester = ModelTester(("text", "vision"))
    assert apply_lora(build(tester, freeze_towers=["text"])) == ["vision"]
    with pytest.raises(ValueError, match=r"\['text'\], which config.freeze_towers freezes"):
        apply_lora(build(tester, freeze_towers=["text"]), modalities=["text"])
    with pytest.raises(ValueError, match="does not freeze"):
        apply_lora(build(tester, freeze_towers=True))


# --- precomputed tower outputs as a model input ----------------------------------------------------------------

def test_tower_embeds_input_is_checked():
    tester = ModelTester(("text", "vision"))
    model = build(tester).eval()
    inputs = tester.inputs()
    good = torch.zeros(tester.batch_size, model.dmil.encoders.tower_width("text"))
    with pytest.raises(ValueError, match="not both"):
        model(text_tower_embeds=good, **inputs)
    vision = {"vision_pixel_values": inputs["vision_pixel_values"]}
    with pytest.raises(ValueError, match=r"shape \(4, 5\); expected \(batch, 32\)"):
        model(text_tower_embeds=torch.zeros(4, 5), **vision)
    with pytest.raises(TypeError, match="floating-point"):
        model(text_tower_embeds=good.long(), **vision)
    with pytest.raises(ValueError, match="NaN"):
        model(text_tower_embeds=good * float("nan"), **vision)
    assert model(text_tower_embeds=good, **vision).logits.shape == (tester.batch_size, tester.num_labels)


def test_cached_path_predicts_what_raw_inputs_predict(tmp_path):
    tester = ModelTester(MODALITIES)
    model = build(tester, freeze_towers=["text", "audio"]).eval()
    data = rows(tester, n=24)
    cached, records = cache_tower_embeddings(model, {"test": data}, ["text", "audio", "vision"], tmp_path,
                                             batch_size=5, show_progress=False)
    assert {c for c in cached["test"].column_names if "tower_embeds" in c} == {
        "text_tower_embeds", "audio_tower_embeds", "vision_tower_embeds"}
    assert not any(c.startswith(("text_input", "audio_input", "vision_pixel")) for c in cached["test"].column_names)
    raw, fast = predict(model, data, batch_size=8), predict(model, cached["test"], batch_size=8)
    np.testing.assert_allclose(fast["logits"], raw["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast["interaction_weights"], raw["interaction_weights"], atol=1e-5, rtol=0)


def test_evaluation_reads_frozen_towers_from_the_cache_with_the_live_predictions(tmp_path, monkeypatch):
    from dmil_hf.experiment import evaluate_encoded

    tester = ModelTester(MODALITIES)
    model = build(tester, freeze_towers=["text", "audio"]).eval()
    data = rows(tester, n=24)
    live_report, live = evaluate_encoded(model, data, data, embedding_cache=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    report, cached = evaluate_encoded(model, data, data, embedding_cache=tmp_path)
    np.testing.assert_allclose(cached["logits"], live["logits"], atol=1e-5, rtol=0)
    assert report["accuracy"] == live_report["accuracy"]
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.npy")) == ["audio", "text"]  # frozen towers only

    # A copy with only the vision degraded: the frozen towers' entries are read, not computed again.
    def refuse(*args, **kwargs):
        raise AssertionError("a frozen tower ran although its outputs are cached")

    other = rows(tester, n=24, seed=1)
    noised = data.remove_columns("vision_pixel_values").add_column(
        "vision_pixel_values", other.with_format(None)["vision_pixel_values"]).with_format("torch")
    for modality in ("text", "audio"):
        monkeypatch.setattr(model.dmil.encoders.towers[modality], "forward", refuse)
    _, on_noised = evaluate_encoded(model, noised, noised, embedding_cache=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert not np.allclose(on_noised["logits"], live["logits"])  # the vision did change


# --- the cache: hit, miss when the tower or the data change ----------------------------------------------------

def test_cache_hits_on_the_second_run_and_misses_after_a_change(tmp_path):
    tester = ModelTester(("text", "vision"))
    model = build(tester, freeze_towers=["text"])
    data = rows(tester)

    def hits(split):
        _, records = cache_tower_embeddings(model, {"train": split}, ["text"], tmp_path, show_progress=False)
        return [r["hit"] for r in records]

    assert hits(data) == [False]
    assert hits(data) == [True]
    assert len(list(tmp_path.glob("text-*.npy"))) == 1
    changed = data.with_format(None).map(lambda row, i: {"text_input_ids": [7] * len(row["text_input_ids"])}
                                         if i == 3 else {}, with_indices=True).with_format("torch")
    assert hits(changed) == [False]  # one row's token ids changed
    assert hits(data.select(range(31))) == [False]  # one row fewer
    with torch.no_grad():
        model.dmil.encoders.towers["text"].embeddings.word_embeddings.weight[5, 0] += 1e-3
    assert hits(data) == [False]  # the tower changed
    assert len(list(tmp_path.glob("text-*.npy"))) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_cached_and_uncached_runs_end_with_the_same_weights(tmp_path):
    """Stage 1 and 3 read the frozen text tower from the cache; stage 2 every tower. Dropout is on (0.1): the frozen
    tower is in eval mode either way, and the projections' dropout runs live in both runs."""
    tester = ModelTester(("text", "vision"))
    kwargs = dict(freeze_towers=["text"], stage1_epochs=1, stage2_epochs=2, stage3_epochs=1)
    data = rows(tester, n=48)
    runs = {}
    for name, cache in (("cached", tmp_path / "cache"), ("live", False)):
        model = build(tester, **kwargs)
        records = train_staged(model, args_for(tmp_path / name), data, rows(tester, n=16, seed=1),
                               compute_metrics=make_compute_metrics(), embedding_cache=cache)
        runs[name] = (model.state_dict(), records)
    cached_state, records = runs["cached"]
    used = {(r["stage"], c["modality"], c["split"]): c["hit"] for r in records for c in r["embedding_cache"]}
    assert used == {("stage1", "text", "train"): False, ("stage1", "text", "validation"): False,
                    ("stage2", "text", "train"): True, ("stage2", "text", "validation"): True,
                    ("stage2", "vision", "train"): False, ("stage2", "vision", "validation"): False,
                    ("stage3", "text", "train"): True, ("stage3", "text", "validation"): True}
    assert runs["live"][1][0]["embedding_cache"] == []
    for name, value in runs["live"][0].items():
        torch.testing.assert_close(cached_state[name], value, atol=1e-5, rtol=0, msg=name)


# --- dmil train ------------------------------------------------------------------------------------------------

def feature_rows(n=90, seed=0):
    from datasets import DatasetDict

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    full = Dataset.from_dict({
        "alpha_features": (np.eye(3)[labels] @ rng.normal(size=(3, 6)) + 0.3 * rng.normal(size=(n, 6))).astype(np.float32),
        "beta_features": rng.normal(size=(n, 4)).astype(np.float32), "labels": labels})
    return DatasetDict(train=full.select(range(60)), validation=full.select(range(60, 75)),
                       test=full.select(range(75, n)))


def test_cli_freeze_towers_caches_under_the_cache_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMIL_HF_CACHE", str(tmp_path / "cache"))
    feature_rows().save_to_disk(tmp_path / "data")
    common = ["train", "--dataset", str(tmp_path / "data"), "--stage-epochs", "1", "1", "1", "--batch-size", "16"]
    assert main(common + ["--output-dir", str(tmp_path / "bad"), "--freeze-towers", "gamma"]) == 2
    assert "--freeze-towers names ['gamma']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    for run in ("first", "second"):
        assert main(common + ["--output-dir", str(tmp_path / run), "--freeze-towers", "alpha"]) == 0
    stages = {run: json.loads((tmp_path / run / "metrics.json").read_text())["stages"] for run in ("first", "second")}
    assert [c["hit"] for c in stages["first"][0]["embedding_cache"]] == [False, False]
    assert all(c["hit"] for s in stages["second"] for c in s["embedding_cache"] if c["modality"] == "alpha")
    # train and validation (training), the reliability refit's own copy of train (`refit_split`), test (the final
    # evaluation reads the cache too)
    assert len(list((tmp_path / "cache" / "embeddings").glob("alpha-*.npy"))) == 4
    assert stages["first"][-1]["stage"] == "reliability_refit" and not stages["first"][-1]["embedding_cache"][0]["hit"]
    saved = DmilConfig.from_pretrained(tmp_path / "second")
    assert saved.frozen_modalities == ("alpha",)


def test_lora_with_every_tower_frozen_is_refused_before_training():
    from dmil_hf.run_checks import check_freeze_towers
    from dmil_hf.run_settings import RunSettings

    with pytest.raises(ValueError, match=r"freezes all of them \(\['text', 'audio'\]\)"):
        check_freeze_towers(RunSettings(lora=True, freeze_towers=True), ("text", "audio"))
    check_freeze_towers(RunSettings(lora=True, freeze_towers=["text"]), ("text", "audio"))  # LoRA on audio


# --- the cache's files: memory-mapped, checked against their sidecar, rebuilt when damaged ------------------------

def cache_runner(tmp_path):
    """A function that caches a frozen text tower's outputs on fixed rows in `tmp_path` and returns the cached split
    and the record of its one entry."""
    tester = ModelTester(("text", "vision"))
    model, data = build(tester, freeze_towers=["text"]), rows(tester)

    def run():
        cached, (record,) = cache_tower_embeddings(model, {"train": data}, ["text"], tmp_path, show_progress=False)
        return cached["train"], record
    return run


def test_a_cached_array_is_memory_mapped_with_a_sidecar(tmp_path):
    from dmil_hf.embedding_cache import entry_problem, read_sidecar

    run = cache_runner(tmp_path)
    first, record = run()
    path = tmp_path / record["path"]
    sidecar = read_sidecar(path)
    assert sidecar["shape"] == [32, 32] and sidecar["modality"] == "text" and sidecar["split"] == "train"
    assert sidecar["bytes"] == path.stat().st_size and entry_problem(path, (32, 32)) is None
    second, record = run()
    assert record["hit"]
    # The hit is read through a memory map of the file, not copied into the process.
    assert str(path) in open("/proc/self/maps").read()
    torch.testing.assert_close(second[:]["text_tower_embeds"], first[:]["text_tower_embeds"])
    torch.testing.assert_close(second[:]["text_tower_embeds"], torch.from_numpy(np.load(path)))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(path.read_bytes()[:-100]), "truncated"),
    (_flip_a_byte, "bytes changed"),
    (lambda path: np.save(path, np.ones((64, 16), np.float32)), "shape (64, 16)"),  # as many bytes, reshaped
    (lambda path: path.with_suffix(".json").unlink(), "sidecar"),
], ids=["truncated", "flipped-byte", "reshaped", "no-sidecar"])
def test_a_damaged_entry_is_named_in_a_warning_and_built_again(tmp_path, caplog, damage, reason):
    from dmil_hf.embedding_cache import entry_problem

    run = cache_runner(tmp_path)
    first, record = run()
    expected = first[:]["text_tower_embeds"].clone()  # `first` maps the file that the damage rewrites in place
    path = tmp_path / record["path"]
    good = path.read_bytes()
    damage(path)
    with caplog.at_level("WARNING", logger="dmil_hf.embedding_cache"):
        again, record = run()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(path) in warning and reason in warning and "Building it again" in warning
    assert not record["hit"] and path.read_bytes() == good and entry_problem(path, (32, 32)) is None
    torch.testing.assert_close(again[:]["text_tower_embeds"], expected)


def test_an_entry_of_the_wrong_shape_is_rebuilt_even_with_a_matching_sidecar(tmp_path, caplog):
    from dmil_hf.embedding_cache import write_entry

    run = cache_runner(tmp_path)
    _, record = run()
    path = tmp_path / record["path"]
    write_entry(path, [np.zeros((31, 32), np.float32)], (31, 32), modality="text", split="train")
    with caplog.at_level("WARNING", logger="dmil_hf.embedding_cache"):
        again, record = run()
    assert not record["hit"] and "shape (31, 32); expected (32, 32)" in caplog.text
    assert again[:]["text_tower_embeds"].shape == (32, 32)


def test_write_entry_refuses_a_short_stream_and_leaves_no_file(tmp_path):
    from dmil_hf.embedding_cache import write_entry

    with pytest.raises(ValueError, match=r"31 rows were written to .*x-0+\.npy'; expected 32"):
        write_entry(tmp_path / f"x-{'0' * 32}.npy", iter([np.ones((31, 4), np.float32)]), (32, 4))
    assert list(tmp_path.iterdir()) == []


def test_cli_rebuilds_a_truncated_entry_instead_of_stopping(tmp_path, monkeypatch, caplog):
    """`dmil train` on a cache whose array was cut short (a full disk, a killed copy) used to stop with numpy's
    "Failed to read all data for array"."""
    monkeypatch.setenv("DMIL_HF_CACHE", str(tmp_path / "cache"))
    feature_rows().save_to_disk(tmp_path / "data")
    common = ["train", "--dataset", str(tmp_path / "data"), "--stage-epochs", "1", "0", "0", "--batch-size", "16",
              "--freeze-towers", "alpha", "--train-corruption", "0"]
    assert main(common + ["--output-dir", str(tmp_path / "first")]) == 0
    (entry, *_) = sorted((tmp_path / "cache" / "embeddings").glob("alpha-*.npy"))
    entry.write_bytes(entry.read_bytes()[:200])
    with caplog.at_level("WARNING"):
        assert main(common + ["--output-dir", str(tmp_path / "second")]) == 0
    assert f"Embedding cache entry {entry} is damaged" in caplog.text


# --- dmil cache list / clear -------------------------------------------------------------------------------------

def make_entries(folder, ages_in_days):
    """One small entry per age, dated that many days back in its sidecar."""
    import time

    from dmil_hf.embedding_cache import CREATED_FORMAT, sidecar_path, write_entry

    paths = []
    for k, age in enumerate(ages_in_days):
        path = folder / f"text-{k:032x}.npy"
        write_entry(path, [np.full((3, 2), k, np.float32)], (3, 2), modality="text", split="train")
        sidecar = json.loads(sidecar_path(path).read_text())
        sidecar["created"] = time.strftime(CREATED_FORMAT, time.gmtime(time.time() - age * 86400))
        sidecar_path(path).write_text(json.dumps(sidecar))
        paths.append(path)
    return paths


def test_cache_list_shows_modality_shape_size_date_and_damage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMIL_HF_CACHE", str(tmp_path))
    folder = tmp_path / "embeddings"
    assert main(["cache", "list"]) == 0
    assert f"No entries in {folder}" in capsys.readouterr().out
    old, new = make_entries(folder, [10, 0])
    _flip_a_byte(new)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert f"2 entries in {folder}" in out
    lines = [line for line in out.splitlines() if ".npy" in line]
    assert [line.split()[:3] for line in lines] == [["text", "train", "3x2"]] * 2
    assert old.name in lines[0] and new.name in lines[1]  # oldest first
    assert lines[0].endswith("ok") and lines[1].endswith("ok")  # without --verify the bytes are not read
    assert main(["cache", "list", "--verify"]) == 0
    assert "damaged: its bytes changed" in capsys.readouterr().out


def test_cache_clear_deletes_only_the_cache_s_own_files(tmp_path, capsys):
    import os
    import time

    folder = tmp_path / "cache"
    old, new = make_entries(folder, [10, 0])
    outside = tmp_path / "precious.npy"
    outside.write_bytes(b"mine")
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / f"text-{'a' * 32}.npy").write_bytes(b"mine")
    (folder / f"text-{'b' * 32}.npy").symlink_to(outside)  # a link named like an entry: the target stays
    killed = folder / f".text-{'c' * 32}.npy.x1y2.tmp"  # left by a write killed two days ago
    killed.write_bytes(b"half")
    os.utime(killed, (time.time() - 2 * 86400,) * 2)
    writing = folder / f".text-{'d' * 32}.npy.z3.tmp"  # a run caching right now
    writing.write_bytes(b"half")
    assert main(["cache", "clear", "--cache-dir", str(folder), "--older-than", "-1"]) == 2
    assert main(["cache", "clear", "--cache-dir", str(folder), "--older-than", "5"]) == 0
    assert "Deleted 2 file(s)" in capsys.readouterr().out  # the old entry and its sidecar
    assert not old.exists() and not old.with_suffix(".json").exists() and new.exists() and killed.exists()
    assert main(["cache", "clear", "--cache-dir", str(folder)]) == 0
    assert "Deleted 3 file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", "sub", f"text-{'b' * 32}.npy",
                                                               writing.name])
    assert outside.read_bytes() == b"mine" and (folder / "sub" / f"text-{'a' * 32}.npy").exists()
