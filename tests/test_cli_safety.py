"""`dmil train` / `evaluate` / `export` / `push` against bad input and faults: nothing of the user's is lost, nothing
silently wrong, and each refusal names the input and what was expected (issue 13)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file

from dmil_hf.cli import main
from dmil_hf.experiment import RunSettings, run_training
from dmil_hf.run_folder import RUN_MARKER

FAST = ["--stage-epochs", "1", "1", "1", "--batch-size", "16"]


def feature_dataset(n=120, seed=0, num_classes=3, train_labels=None) -> DatasetDict:
    """Two feature modalities, label readable from either; `train_labels` replaces the train split's labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    columns = {f"{name}_features": (rng.normal(size=(num_classes, d))[labels] + 0.5 * rng.normal(size=(n, d)))
               .astype(np.float32) for name, d in (("alpha", 6), ("beta", 4))}
    columns["labels"] = labels
    full = Dataset.from_dict(columns)
    a, b = int(0.6 * n), int(0.8 * n)
    train = full.select(range(a))
    if train_labels is not None:
        train = train.remove_columns("labels").add_column("labels", list(train_labels(train)))
    return DatasetDict(train=train, validation=full.select(range(a, b)), test=full.select(range(b, n)))


def tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "features"
    feature_dataset().save_to_disk(path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main(["train", "--dataset", str(data_dir), "--output-dir", str(out)] + FAST) == 0
    return out


def train(data_dir, out, *extra):
    return main(["train", "--dataset", str(data_dir), "--output-dir", str(out)] + FAST + list(extra))


# --------------------------------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("bad", [
    ["--dataset", "/no/such/dataset"],
    ["--config-arg", "latnt_size=8"],
    ["--stage-epochs", "-1", "1", "1"],
    ["--text-model", "/no/such/tower"],
])
def test_overwrite_with_a_bad_input_keeps_the_previous_run(finished_run, data_dir, capsys, bad):
    before = tree_bytes(finished_run)
    args = ["train", "--dataset", str(data_dir), "--output-dir", str(finished_run), "--overwrite"] + FAST
    assert main(args + bad) == 2
    assert "error" in capsys.readouterr().err
    assert tree_bytes(finished_run) == before


def test_overwrite_refuses_a_folder_dmil_did_not_write(tmp_path, data_dir, capsys):
    own = tmp_path / "thesis"
    own.mkdir()
    (own / "chapter1.tex").write_text("my own work")
    (own / "figures").mkdir()
    (own / "figures" / "plot.png").write_bytes(b"\x89PNG...")
    before = tree_bytes(own)
    assert train(data_dir, own, "--overwrite") == 2
    err = capsys.readouterr().err
    assert str(own) in err and "not written by dmil" in err and RUN_MARKER in err
    assert tree_bytes(own) == before


def test_overwrite_replaces_a_finished_run(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(data_dir, out) == 0
    assert json.loads((out / RUN_MARKER).read_text())["status"] == "finished"
    (out / "metrics.json").write_text("{}")  # the marker alone identifies the run
    assert train(data_dir, out, "--overwrite") == 0
    assert "test" in json.loads((out / "metrics.json").read_text())


def test_resume_on_a_finished_run_is_refused(finished_run, data_dir, capsys):
    before = tree_bytes(finished_run)
    assert train(data_dir, finished_run, "--resume", "--seed", "3") == 2
    err = capsys.readouterr().err
    assert str(finished_run) in err and "already finished" in err
    assert tree_bytes(finished_run) == before


# --------------------------------------------------------------------------------------------- silently wrong


def test_misspelt_config_arg_is_refused_with_a_suggestion(tmp_path, data_dir, capsys):
    assert train(data_dir, tmp_path / "out", "--config-arg", "latnt_size=8") == 2
    err = capsys.readouterr().err
    assert "'latnt_size'" in err and "Did you mean 'latent_size'" in err
    assert not (tmp_path / "out").exists()


def test_known_config_arg_is_applied(tmp_path, data_dir):
    assert train(data_dir, tmp_path / "out", "--config-arg", "latent_size=8") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["latent_size"] == 8


def test_negative_stage_epochs_are_refused(tmp_path, data_dir, capsys):
    assert main(["train", "--dataset", str(data_dir), "--output-dir", str(tmp_path / "out"),
                 "--stage-epochs", "-1", "1", "1"]) == 2
    err = capsys.readouterr().err
    assert "--stage-epochs" in err and "[-1.0, 1.0, 1.0]" in err and ">= 0" in err
    assert not (tmp_path / "out").exists()


def test_zero_stage_epochs_skip_that_stage(tmp_path, data_dir):
    out = tmp_path / "out"
    assert main(["train", "--dataset", str(data_dir), "--output-dir", str(out), "--stage-epochs", "1", "0", "1",
                 "--batch-size", "16"]) == 0
    assert [s["stage"] for s in json.loads((out / "metrics.json").read_text())["stages"]] == ["stage1", "stage3", "reliability_refit"]


def incomplete_copy(model_dir: Path, target: Path) -> str:
    """A copy of `model_dir` whose model.safetensors lacks one tensor; returns that tensor's name."""
    import shutil

    shutil.copytree(model_dir, target)
    tensors = load_file(str(target / "model.safetensors"))
    dropped = sorted(k for k in tensors if "head" in k or "classifier" in k)[0]
    del tensors[dropped]
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return dropped


def test_evaluate_export_and_pipeline_refuse_an_incomplete_checkpoint(finished_run, data_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    dropped = incomplete_copy(finished_run, broken)
    assert main(["evaluate", "--model", str(broken), "--dataset", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "incomplete" in err and dropped in err
    assert not list(broken.glob("eval_*.json"))
    assert main(["export", "--model", str(broken), "--output-dir", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and dropped in err
    from transformers import pipeline

    import dmil_hf  # noqa: F401  (registers the task)

    with pytest.raises(ValueError, match="incomplete") as info:
        pipeline("multimodal-classification", model=str(broken))
    assert dropped in str(info.value)
    # the complete checkpoint still loads
    classifier = pipeline("multimodal-classification", model=str(finished_run))
    assert len(classifier({"alpha_features": [0.0] * 6, "beta_features": [0.0] * 4})["scores"]) == 3


def test_single_class_train_split_is_refused(tmp_path, capsys):
    feature_dataset(train_labels=lambda split: [1] * len(split)).save_to_disk(tmp_path / "data")
    assert train(tmp_path / "data", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "split 'train' holds a single class ([1])" in err and "at least two classes" in err
    assert not (tmp_path / "out").exists()


def test_test_label_never_seen_in_training_warns(tmp_path, caplog):
    # train shows classes 0 and 1 only; validation/test also hold class 2
    feature_dataset(train_labels=lambda split: [i % 2 for i in range(len(split))]).save_to_disk(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="dmil_hf.experiment"):
        assert train(tmp_path / "data", tmp_path / "out") == 0
    assert any("split 'test' holds class ids [2]" in r.getMessage() for r in caplog.records)
    warnings = json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"]
    assert any("'test'" in w and "[2]" in w for w in warnings)


def test_resume_on_a_folder_without_a_run_is_refused(tmp_path, data_dir, capsys):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("keep me")
    before = tree_bytes(own)
    assert train(data_dir, own, "--resume") == 2
    err = capsys.readouterr().err
    assert str(own) in err and "holds no dmil run" in err
    assert tree_bytes(own) == before
    assert train(data_dir, tmp_path / "absent", "--resume") == 2
    assert not (tmp_path / "absent").exists()


@pytest.fixture
def interrupted_run(tmp_path, monkeypatch):
    """A run killed during stage 2 (stage 1 finished), on its own dataset: returns (run folder, dataset folder)."""
    from dmil_hf.training import DmilTrainer

    data = tmp_path / "data"
    feature_dataset().save_to_disk(data)
    original = DmilTrainer.train
    calls = []

    def train_then_die(self, *args, **kwargs):
        calls.append(self.args.output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during stage 2")
        return original(self, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(DmilTrainer, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(data, out)
    monkeypatch.setattr(DmilTrainer, "train", original)
    assert json.loads((out / RUN_MARKER).read_text())["status"] == "running"
    assert (out / "checkpoints" / "stage1" / "done.json").exists()
    return out, data


def test_resume_with_changed_settings_is_refused_naming_them(interrupted_run, capsys):
    run, data = interrupted_run
    before = tree_bytes(run)
    args = ["train", "--dataset", str(data), "--output-dir", str(run), "--resume",
            "--stage-epochs", "1", "2", "1", "--batch-size", "32", "--seed", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "batch_size: 16 -> 32" in err and "seed: 0 -> 1" in err
    assert "stage_epochs: [1.0, 1.0, 1.0] -> [1.0, 2.0, 1.0]" in err and "--resume-with-changes" in err
    assert tree_bytes(run) == before
    assert main(args + ["--resume-with-changes"]) == 0


def test_resume_with_changed_data_size_is_refused(interrupted_run, capsys):
    import shutil

    run, data = interrupted_run
    shutil.rmtree(data)
    feature_dataset(n=150).save_to_disk(data)  # same path, more rows
    before = tree_bytes(run)
    assert train(data, run, "--resume") == 2
    assert "train rows: 72 -> 90" in capsys.readouterr().err
    assert tree_bytes(run) == before


def test_resume_records_total_and_resumed_train_seconds(interrupted_run):
    run, data = interrupted_run
    saved = json.loads((run / RUN_MARKER).read_text())["train_seconds_saved"]
    assert saved > 0  # stage 1's checkpoints were saved before the kill
    assert train(data, run, "--resume") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sessions"] == 2
    assert metrics["train_seconds"] == pytest.approx(saved + metrics["train_seconds_this_session"])
    assert metrics["train_seconds_this_session"] > 0
    assert [s["stage"] for s in metrics["stages"]] == ["stage1", "stage2", "stage3", "reliability_refit"]


def text_feature_dataset(n=120, seed=0) -> DatasetDict:
    """`feature_dataset` plus a text column (so the run trains a tokenizer and a random BERT tower)."""
    dsd = feature_dataset(n=n, seed=seed)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    rng = np.random.default_rng(seed + 1)
    return DatasetDict({name: split.add_column("text", [f"{words[y]} {' '.join(rng.choice(words, 3))} shown"
                                                        for y in split["labels"]]) for name, split in dsd.items()})


def test_same_seed_gives_identical_weights(tmp_path):
    text_feature_dataset().save_to_disk(tmp_path / "data")

    def weights(name, seed):
        settings = RunSettings(dataset=str(tmp_path / "data"), output_dir=str(tmp_path / name), stage_epochs=(1, 1, 1),
                               batch_size=16, seed=seed)
        run_training(settings)
        vocab = json.loads((tmp_path / name / "tokenizer.json").read_text())["model"]["vocab"]
        return load_file(str(tmp_path / name / "model.safetensors")), vocab

    (first, first_tokenizer), (second, second_tokenizer) = weights("a", 7), weights("b", 7)
    assert first_tokenizer == second_tokenizer  # the trained tokenizer gives every word the same id
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key].numpy(), second[key].numpy()), key
    other, _ = weights("c", 8)  # and a different seed gives a different model (the test can fail)
    assert any(not np.array_equal(first[k].numpy(), other[k].numpy()) for k in first)


# ------------------------------------------------------------------------------------------------ unclear errors


def test_output_dir_that_is_a_file_is_refused(tmp_path, data_dir, capsys):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert train(data_dir, path, *extra) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "is a file; expected a folder" in err
    assert path.read_text() == "a,b\n1,2\n"


def test_text_model_folder_that_does_not_exist(tmp_path, data_dir, capsys):
    missing = tmp_path / "my-bert"
    assert train(data_dir, tmp_path / "out", "--text-model", str(missing)) == 2
    err = capsys.readouterr().err
    assert f"--text-model {str(missing)!r}: no folder at that path" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_push_with_a_token_but_no_reachable_hub(finished_run, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    import dmil_hf.hub as hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    exports = []
    monkeypatch.setattr(hub.push, "export_model", lambda *a, **k: exports.append(a))
    assert main(["push", "--model", str(finished_run), "--repo-id", "me/dmil", "--token", "hf_fake"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1
    assert exports == []  # refused before the export work


def test_push_with_an_unreachable_endpoint(finished_run, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants as constants

    import dmil_hf.hub as hub

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub.push, "export_model", lambda *a, **k: pytest.fail("exported before checking the Hub"))
    with pytest.raises(hub.HubUnreachableError, match=f"127.0.0.1:{port}.*cannot be reached"):
        hub.check_push_target("me/dmil", token="hf_fake")
    assert main(["push", "--model", str(finished_run), "--repo-id", "me/dmil", "--token", "hf_fake"]) == 2
    assert "cannot be reached" in capsys.readouterr().err


def test_train_push_to_hub_checks_the_hub_before_training(tmp_path, data_dir, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    assert train(data_dir, tmp_path / "out", "--push-to-hub", "--hub-model-id", "me/dmil") == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_removes_only_what_the_run_wrote(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    assert train(data_dir, out) == 0
    assert main(["evaluate", "--model", str(out), "--dataset", str(data_dir)]) == 0
    (out / "my_notes.txt").write_text("observations")
    assert train(data_dir, out, "--overwrite", "--seed", "1") == 0
    assert (out / "my_notes.txt").read_text() == "observations"
    assert not list(out.glob("eval_*.json"))  # the old run's report went with it
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert "my_notes.txt" not in json.loads((out / RUN_MARKER).read_text())["files"]
    with caplog.at_level(logging.WARNING, logger="dmil_hf.run_folder"):
        assert train(data_dir, out, "--overwrite", "--seed", "2") == 0
    assert (out / "my_notes.txt").read_text() == "observations"
    assert any("my_notes.txt" in r.getMessage() and "did not write" in r.getMessage() for r in caplog.records)


def test_stage_epochs_through_config_arg_and_unused_tower_are_refused(tmp_path, data_dir, capsys):
    assert train(data_dir, tmp_path / "out", "--config-arg", "stage2_epochs=-3") == 2
    assert "stage2_epochs=-3 must be a finite number >= 0" in capsys.readouterr().err
    import shutil

    tower = tmp_path / "tower"  # a loadable config, for a modality the feature dataset lacks
    tower.mkdir()
    from dmil_hf.towers import text_tower_config

    text_tower_config().save_pretrained(tower)
    assert train(data_dir, tmp_path / "out", "--text-model", str(tower)) == 2
    assert "--text-model given, but the dataset has no such modality" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tower)


# ------------------------------------------------------------------------------------------ settings defined once


def test_train_help_is_generated_from_run_settings(capsys, monkeypatch):
    import dataclasses

    from dmil_hf.methods import METHODS

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside the help texts
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RunSettings):
        for option, kwargs in f.metadata.get("options", {f"--{f.name.replace('_', '-')}": f.metadata}).items():
            assert option in help_text and " ".join(kwargs["help"].split()) in help_text, option
    assert "{" + ",".join(METHODS) + "}" in help_text and "--pooling {auto,mean,cls}" in help_text
    assert "(default: 64)" in help_text  # defaults come from the dataclass


def test_every_option_of_every_subcommand_has_help_text():
    """`dmil <command> --help` explains every option (`dmil profile --help` left four bare)."""
    import argparse

    from dmil_hf.cli import build_parser

    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"dmil {name} {action.option_strings[0]}" for name, parser in commands.choices.items()
            for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert not bare, bare


def test_train_options_become_run_settings():
    from dmil_hf.cli import build_parser
    from dmil_hf.run_settings import settings_from_args

    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["train", "--output-dir", "out", *argv]))

    assert settings() == RunSettings(output_dir="out")
    assert settings("--text-model", "t", "--audio-model", "a", "--stage-epochs", "1", "0", "2.5", "--lora",
                    "--freeze-towers", "--no-embedding-cache", "--pooling", "cls", "--dataset-arg", "num_samples=600",
                    "--dataset-arg", "name=x", "--config-arg", "latent_size=64", "--batch-size", "8") == RunSettings(
        output_dir="out", pretrained={"text": "t", "audio": "a"}, stage_epochs=(1.0, 0.0, 2.5), lora=True,
        freeze_towers=True, embedding_cache=False, tower_pooling="cls", dataset_kwargs={"num_samples": 600,
                                                                                        "name": "x"},
        config_overrides={"latent_size": 64}, batch_size=8)
    assert settings("--freeze-towers", "text", "vision").freeze_towers == ["text", "vision"]
    with pytest.raises(SystemExit):  # argparse's own refusals stay: three stages, known choices
        settings("--stage-epochs", "1", "1")
    with pytest.raises(SystemExit):
        settings("--method", "svm")
