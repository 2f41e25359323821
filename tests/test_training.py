"""Staged training through Trainer: what each stage trains, best-checkpoint restore, resume, LoRA, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.cli import main
from dmil_hf.data import make_synthetic
from dmil_hf.interactions import make_compute_metrics
from dmil_hf.training import (TrainLogCallback, apply_lora, load_lora_adapters, merge_lora, save_lora_adapters,
                              train_staged)

from conftest import ModelTester

SCRIPTS = Path(__file__).parent / "scripts"


def feature_dataset(n=96, seed=0, dims=(6, 4), num_classes=3) -> DatasetDict:
    """Two feature modalities; label readable from either one (redundant) plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    protos = [rng.normal(size=(num_classes, d)) for d in dims]
    columns = {f"{name}_features": (p[labels] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
               for name, p, d in zip(("alpha", "beta"), protos, dims)}
    columns["labels"] = labels
    columns["interaction"] = ["redundancy"] * n
    full = Dataset.from_dict(columns)
    a, b = int(0.6 * n), int(0.8 * n)
    return DatasetDict(train=full.select(range(a)), validation=full.select(range(a, b)), test=full.select(range(b, n)))


def encoded(dsd):
    return {k: v.remove_columns("interaction").with_format("torch") for k, v in dsd.items()}


def feature_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = DmilConfig(feature_modalities={"alpha": 6, "beta": 4}, num_labels=3, hidden_size=16, latent_size=8,
                        feature_hidden_size=16, **kwargs)
    return DmilForMultimodalClassification(config)


def args_for(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, report_to="none", seed=0,
                    disable_tqdm=True, use_cpu=True, logging_steps=1)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_groups(model, before):
    groups = {}
    for group, modules in model.stage_modules().items():
        ids = {id(p) for m in modules for p in m.parameters()}
        diffs = [not torch.equal(p, before[n]) for n, p in model.named_parameters() if id(p) in ids]
        groups[group] = any(diffs)
    return groups


@pytest.mark.parametrize("stage,expected", [
    (1, {"level1": True, "level2": False, "synergy": True, "readout": True}),
    (2, {"level1": False, "level2": True, "synergy": True, "readout": True}),
    (3, {"level1": True, "level2": True, "synergy": True, "readout": True})])
def test_each_stage_trains_only_its_parameters(tmp_path, stage, expected):
    epochs = [0, 0, 0]
    epochs[stage - 1] = 1
    model = feature_model(stage1_epochs=epochs[0], stage2_epochs=epochs[1], stage3_epochs=epochs[2])
    data = encoded(feature_dataset())
    before = snapshot(model)
    train_staged(model, args_for(tmp_path), data["train"], data["validation"], compute_metrics=make_compute_metrics())
    assert changed_groups(model, before) == expected


def test_stage1_without_synergy_warm_up_is_the_papers_stage1(tmp_path):
    model = feature_model(stage1_epochs=1, stage2_epochs=0, stage3_epochs=0, stage1_synergy_weight=0.0)
    data = encoded(feature_dataset())
    before = snapshot(model)
    train_staged(model, args_for(tmp_path), data["train"], data["validation"], compute_metrics=make_compute_metrics())
    assert changed_groups(model, before) == {"level1": True, "level2": False, "synergy": False, "readout": True}


def test_stage1_synergy_warm_up_sends_no_gradient_into_the_towers():
    batch = {"alpha_features": torch.randn(8, 6), "beta_features": torch.randn(8, 4)}
    labels = torch.randint(0, 3, (8,))
    grads = {}
    for weight in (0.0, 5.0):
        model = feature_model(stage1_synergy_weight=weight).set_training_stage(1)
        model(**batch, labels=labels).loss.backward()
        grads[weight] = [p.grad.clone() for p in model.dmil.encoders.parameters()]
        synergy = [p.grad for p in model.dmil.synergy.parameters()]
        assert all(g is None for g in synergy) if weight == 0 else all(g is not None and g.abs().sum() > 0
                                                                        for g in synergy)
    # Same seed, same random draws: the warm-up changes nothing the towers receive.
    assert all(torch.allclose(a, b) for a, b in zip(grads[0.0], grads[5.0]))


def test_stage2_keeps_level1_in_eval_mode():
    model = feature_model().set_training_stage(2)
    model.train()
    assert not model.dmil.relevant.training and not model.dmil.encoders.training
    assert model.gate.training and model.dmil.redundancy.training


def test_multi_label_synthetic_trains_and_beats_chance(tmp_path):
    """DMIL on the multi-label configuration of `synthetic` (multi-hot label sets, BCE per label) through the staged
    schedule: a short run predicts whole label sets far better than the most frequent set does."""
    dsd = make_synthetic(num_samples=600, feature_dim=8, bayes_samples=200, multi_label=True)
    data = encoded(dsd)
    torch.manual_seed(0)
    config = DmilConfig(feature_modalities={"a": 8, "b": 8}, num_labels=4, problem_type="multi_label_classification",
                        hidden_size=16, latent_size=8, feature_hidden_size=16, stage1_epochs=3, stage2_epochs=1,
                        stage3_epochs=2, stage1_learning_rate=1e-2, stage2_learning_rate=1e-2, stage3_learning_rate=1e-2)
    model = DmilForMultimodalClassification(config)
    records = train_staged(model, args_for(tmp_path, per_device_train_batch_size=32), data["train"],
                           data["validation"], compute_metrics=make_compute_metrics())
    assert [r["stage"] for r in records] == ["stage1", "stage2", "stage3"]
    test = data["test"][:]
    model.eval()
    with torch.no_grad():
        out = model(a_features=test["a_features"], b_features=test["b_features"])
    exact = ((out.logits > 0) == (test["labels"] > 0.5)).all(-1).float().mean().item()
    _, counts = np.unique(test["labels"].numpy(), axis=0, return_counts=True)
    assert exact > counts.max() / len(test["labels"]) + 0.2
    torch.testing.assert_close(out.interaction_weights.sum(-1), torch.ones(len(test["labels"])))


def test_stage_switch_restores_best_checkpoint(tmp_path):
    model = feature_model(stage1_epochs=3, stage2_epochs=0, stage3_epochs=0)
    data = encoded(feature_dataset())
    records = train_staged(model, args_for(tmp_path), data["train"], data["validation"],
                           compute_metrics=make_compute_metrics())
    best = load_file(str(Path(records[0]["best_checkpoint"]) / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best.items())
    history = [e["eval_accuracy"] for e in json.loads((Path(records[0]["best_checkpoint"]) / "trainer_state.json")
                                                      .read_text())["log_history"] if "eval_accuracy" in e]
    assert records[0]["best_metric"] == max(history)
    assert (tmp_path / "stage1" / "done.json").exists()


def test_training_on_cpu_asks_for_no_pinned_memory(tmp_path):
    """Without an accelerator, torch's DataLoader warns at every train and eval loop that pinned memory is unused; a
    CPU run must not ask for it (the stages' TrainingArguments pin only where the device is not the CPU)."""
    import warnings

    model = feature_model(stage1_epochs=1, stage2_epochs=0, stage3_epochs=1)
    data = encoded(feature_dataset())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # As `dmil train` builds them: the device is found, not forced (use_cpu=True turns pinning off itself).
        train_staged(model, args_for(tmp_path, use_cpu=False), data["train"], data["validation"],
                     compute_metrics=make_compute_metrics())
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_console_gets_a_short_line_and_callbacks_and_the_log_file_every_term(tmp_path, capsys, disable_tqdm):
    model = feature_model(stage1_epochs=1, stage2_epochs=0, stage3_epochs=1)
    data = encoded(feature_dataset())
    recorder, log_file = RecordLogs(), tmp_path / "train_log.jsonl"
    train_staged(model, args_for(tmp_path, disable_tqdm=disable_tqdm, logging_steps=2), data["train"],
                 data["validation"], compute_metrics=make_compute_metrics(),
                 callbacks=[recorder, TrainLogCallback(log_file)])
    captured = capsys.readouterr()
    console = captured.out + captured.err  # the bar writes its lines to stderr
    step_lines = [line for line in console.splitlines() if " step " in line]
    assert step_lines and all("loss_" not in line and "{" not in line for line in step_lines), console
    assert any(line.startswith("stage3 step 4/4") and "task " in line and "kl " in line and "rec " in line
               for line in step_lines), step_lines
    assert "stage1 epoch 1.00: validation accuracy" in console and "stage3: done in" in console
    # Callbacks (and so the report_to integrations) and the log file get every term of every log event.
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert step_logs and all("loss_kl_redundancy" in logs and "loss_task_gated" in logs for logs in step_logs)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("stage", "step")} for r in records] == recorder.logs
    assert [r["stage"] for r in records if "train_runtime" in r] == ["stage1", "stage3"]


class CrashAt(TrainerCallback):
    def __init__(self, stage_dir, step):
        self.stage_dir, self.step = stage_dir, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.stage_dir) and state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def trained_and_crashed(tmp_path, kwargs, crash_step):
    """A run trained uninterrupted in `full/`, and the same run crashed in stage 2 at `crash_step` in `resumed/`
    (4 steps per epoch); returns the encoded data and the uninterrupted model."""
    data = encoded(feature_dataset())
    reference = feature_model(**kwargs)
    train_staged(reference, args_for(tmp_path / "full"), data["train"], data["validation"],
                 compute_metrics=make_compute_metrics())
    interrupted = feature_model(**kwargs)
    with pytest.raises(KeyboardInterrupt):
        train_staged(interrupted, args_for(tmp_path / "resumed"), data["train"], data["validation"],
                     compute_metrics=make_compute_metrics(), callbacks=[CrashAt("stage2", crash_step)])
    return data, reference


def test_resume_equals_uninterrupted(tmp_path):
    kwargs = dict(stage1_epochs=2, stage2_epochs=2, stage3_epochs=1)
    # crash in stage 2, after its first epoch's checkpoint
    data, reference = trained_and_crashed(tmp_path, kwargs, crash_step=6)
    resumed = feature_model(seed=123, **kwargs)  # different init: everything must come from the checkpoints
    train_staged(resumed, args_for(tmp_path / "resumed"), data["train"], data["validation"],
                 compute_metrics=make_compute_metrics(), resume=True)
    for (name, p), (_, q) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_skips_a_truncated_latest_checkpoint(tmp_path, caplog):
    """A kill during a checkpoint save leaves a truncated model.safetensors: resume from the previous complete
    checkpoint (still exact), and say which file was broken; with no complete one left, refuse naming the files."""
    kwargs = dict(stage1_epochs=1, stage2_epochs=3, stage3_epochs=1)
    # stage 2 crashes in its 3rd epoch: checkpoint-4 and checkpoint-8 exist
    data, reference = trained_and_crashed(tmp_path, kwargs, crash_step=10)
    stage2 = tmp_path / "resumed" / "stage2"
    assert sorted(p.name for p in stage2.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    broken = stage2 / "checkpoint-8" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    from dmil_hf.training import last_complete_checkpoint

    with caplog.at_level("WARNING", logger="dmil_hf.training"):
        assert last_complete_checkpoint(stage2) == str(stage2 / "checkpoint-4")
    assert any(str(broken) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    resumed = feature_model(seed=123, **kwargs)
    train_staged(resumed, args_for(tmp_path / "resumed"), data["train"], data["validation"],
                 compute_metrics=make_compute_metrics(), resume=True)
    for (name, p), (_, q) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_with_every_checkpoint_truncated_names_the_files(tmp_path):
    data = encoded(feature_dataset())
    model = feature_model(stage1_epochs=3, stage2_epochs=0, stage3_epochs=0)
    with pytest.raises(KeyboardInterrupt):
        train_staged(model, args_for(tmp_path), data["train"], data["validation"],
                     compute_metrics=make_compute_metrics(), callbacks=[CrashAt("stage1", 10)])
    checkpoints = sorted((tmp_path / "stage1").glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        path = checkpoint / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="no checkpoint .* reads back completely") as info:
        train_staged(feature_model(stage1_epochs=3, stage2_epochs=0, stage3_epochs=0), args_for(tmp_path),
                     data["train"], data["validation"], compute_metrics=make_compute_metrics(), resume=True)
    assert all(str(c / "model.safetensors") in str(info.value) for c in checkpoints)


def tower_rows(tester, n=48):
    inputs = tester.inputs(n)
    return Dataset.from_dict({**{k: v.numpy() for k, v in inputs.items()},
                              "labels": tester.labels(n).numpy()}).with_format("torch")


def test_resume_equals_uninterrupted_with_transformer_towers(tmp_path):
    """ViT and BERT towers: every tower weight must come back from the checkpoints (ViT's legacy parameter names
    once made Trainer's best-checkpoint reload skip the vision tower silently)."""
    tester = ModelTester(("text", "vision"))
    config = tester.config(stage1_epochs=2, stage2_epochs=1, stage3_epochs=1)
    rows = tower_rows(tester)
    torch.manual_seed(0)
    reference = DmilForMultimodalClassification(config)
    train_staged(reference, args_for(tmp_path / "full"), rows, rows, compute_metrics=make_compute_metrics())
    torch.manual_seed(0)
    interrupted = DmilForMultimodalClassification(config)
    with pytest.raises(KeyboardInterrupt):  # 3 steps per epoch: crash in stage 1's second epoch
        train_staged(interrupted, args_for(tmp_path / "resumed"), rows, rows, compute_metrics=make_compute_metrics(),
                     callbacks=[CrashAt("stage1", 4)])
    torch.manual_seed(123)
    resumed = DmilForMultimodalClassification(config)
    train_staged(resumed, args_for(tmp_path / "resumed"), rows, rows, compute_metrics=make_compute_metrics(),
                 resume=True)
    for (name, p), (_, q) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), name
    saved = load_file(str(tmp_path / "full" / "stage1" / "best" / "model.safetensors"))
    assert any(".towers.vision." in k for k in saved) and set(saved) <= set(reference.state_dict())


def test_lora_train_save_load_identical_logits(tmp_path):
    tester = ModelTester(("text", "vision"), batch_size=24)
    config = tester.config(stage1_epochs=1, stage2_epochs=0, stage3_epochs=1)
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(config)
    base_towers = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in model.dmil.encoders.towers.items()}
    wrapped = apply_lora(model)
    assert wrapped == ["text", "vision"]
    inputs = tester.inputs()
    rows = Dataset.from_dict({**{k: v.numpy() for k, v in inputs.items()}, "labels": tester.labels().numpy()}).with_format("torch")
    train_staged(model, args_for(tmp_path / "run"), rows, rows, compute_metrics=make_compute_metrics())
    tower_state = model.dmil.encoders.towers["text"].base_model.model.state_dict()
    base_keys = [k for k in tower_state if "lora_" not in k and k.endswith(".base_layer.weight")]
    assert base_keys and all(torch.equal(tower_state[k], base_towers["text"][k.replace(".base_layer", "")])
                             for k in base_keys), "LoRA must leave the tower's base weights untouched"
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    save_lora_adapters(model, tmp_path / "adapters")
    merge_lora(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = DmilForMultimodalClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (reloaded(**inputs).logits - expected).abs().max() < 1e-5
    # The saved adapters on the original towers rebuild the trained towers.
    fresh = DmilForMultimodalClassification.from_pretrained(tmp_path / "merged").eval()
    for m in ("text", "vision"):
        fresh.dmil.encoders.towers[m].load_state_dict(base_towers[m])
    assert load_lora_adapters(fresh, tmp_path / "adapters") == ["text", "vision"]
    with torch.no_grad():
        assert (fresh.eval()(**inputs).logits - expected).abs().max() < 1e-5


def test_two_process_accelerate_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    script = str(SCRIPTS / "ddp_train.py")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run(accelerate + [script, str(tmp_path / "two"), "4"], env=env, capture_output=True, text=True,
                         timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, script, str(tmp_path / "one"), "8"], env=env, capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.allclose(rank0[name], single[name], atol=1e-5), name
    # The frozen alpha tower's embeddings: built once by the main process, read by the other; one file each run.
    built = {r: [c["hit"] for c in json.loads((tmp_path / "two" / f"cache_rank{r}.json").read_text())] for r in (0, 1)}
    assert built == {0: [False], 1: [True]}
    assert json.loads((tmp_path / "one" / "cache_rank0.json").read_text())[0]["hit"] is False
    assert sorted(p.suffix for p in (tmp_path / "two" / "cache").iterdir()) == [".json", ".npy"]  # one entry
    losses_two = json.loads((tmp_path / "two" / "losses.json").read_text())
    losses_one = json.loads((tmp_path / "one" / "losses.json").read_text())
    assert len(losses_two) == len(losses_one) > 0
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-4)


def test_two_process_reliability_refit_ends_with_the_same_heads(tmp_path):
    """Under `accelerate launch` each process refits the reliability heads on its own shard; every process then
    holds the main process's heads (the broadcast in `refit_reliability_heads`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run = subprocess.run(accelerate + [str(SCRIPTS / "ddp_refit.py"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1, before = (load_file(str(tmp_path / f"heads_{n}.safetensors")) for n in ("rank0", "rank1", "before"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], before[k]) for k in rank0 if k.startswith("heads."))


def test_a_trainer_in_a_process_group_destroys_it_at_exit():
    """Trainer leaves the group `accelerate launch` made it create; a process exiting with a live gloo group can abort
    in interpreter finalisation. DmilTrainer registers an exit handler that destroys it while Python is whole."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(SCRIPTS / "process_group_exit.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialized after the trainer: True" in run.stdout and "initialized at exit: False" in run.stdout, run.stdout


def test_cli_train_then_evaluate_user_dataset(tmp_path):
    feature_dataset(n=120).save_to_disk(tmp_path / "data")
    out = tmp_path / "model"
    code = main(["train", "--dataset", str(tmp_path / "data"), "--method", "dmil", "--output-dir", str(out),
                 "--stage-epochs", "1", "1", "1", "--batch-size", "16"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dmil" and metrics["seed"] == 0 and metrics["train_seconds"] > 0
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test"]["n"] == 24
    assert set(metrics["test"]["by_interaction"]) == {"redundancy"}
    assert "accuracy" in metrics["validation"]
    from transformers import AutoModelForSequenceClassification
    assert type(AutoModelForSequenceClassification.from_pretrained(out)).__name__ == "DmilForMultimodalClassification"
    # a second train into the same folder is refused without --overwrite
    assert main(["train", "--dataset", str(tmp_path / "data"), "--output-dir", str(out)]) == 2
    assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "data"), "--output",
                 str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert report["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    # Model selection: the validation split, with its degraded copies.
    assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "data"), "--split", "validation",
                 "--degraded", "--output", str(tmp_path / "eval_val.json")]) == 0
    report = json.loads((tmp_path / "eval_val.json").read_text())["test"]
    assert report["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])
    degraded = report["degraded"]
    kinds = ("missing", "noise", "blank", "partial25", "partial50", "partial75")
    assert set(degraded["accuracy"]) == {f"{kind}_{m}" for kind in kinds for m in ("alpha", "beta")}
    assert all(0.0 <= v <= 1.0 for v in degraded["accuracy"].values())
    assert degraded["clean"] == pytest.approx(report["accuracy"]) and "blank" in degraded["held_out_kinds"]
    # --kinds measures only the degradations asked for; an unknown kind is named
    assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "data"), "--degraded", "--kinds",
                 "missing", "noise", "--output", str(tmp_path / "eval_kinds.json")]) == 0
    chosen = json.loads((tmp_path / "eval_kinds.json").read_text())["test"]["degraded"]
    assert set(chosen["accuracy"]) == {f"{kind}_{m}" for kind in ("missing", "noise") for m in ("alpha", "beta")}
    assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "data"), "--degraded", "--kinds",
                 "smudge"]) == 2


def text_feature_dataset(n=120, seed=0, num_classes=3) -> DatasetDict:
    """A text and a feature modality; validation and test texts run longer than any training text (more filler)."""
    rng = np.random.default_rng(seed)
    words, filler = ["red", "green", "blue"], ["so", "very", "much", "quite", "really"]
    labels = rng.integers(0, num_classes, n)
    a, b = int(0.6 * n), int(0.8 * n)
    texts = [" ".join([words[y]] + list(rng.choice(filler, int(rng.integers(0, 3 if i < a else 8)))))
             for i, y in enumerate(labels)]
    alpha = (rng.normal(size=(num_classes, 6))[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    full = Dataset.from_dict({"text": texts, "alpha_features": alpha, "labels": labels,
                              "interaction": ["redundancy"] * n})
    return DatasetDict(train=full.select(range(a)), validation=full.select(range(a, b)), test=full.select(range(b, n)))


def test_run_report_and_dmil_evaluate_agree_with_a_pretrained_text_tower(tmp_path):
    """The run's own metrics.json and `dmil evaluate` of the saved model see the same model on the same split, so
    they give the same numbers, down to the per-sample interaction weights behind interaction_profile.json (issue 21:
    the run's report came from a tower that ignored its attention mask, on test texts cut to the training length)."""
    from transformers import AutoProcessor, BertModel

    from dmil_hf.experiment import evaluate_model, interaction_profile
    from dmil_hf.loading import load_model
    from dmil_hf.towers import text_tower_config, train_text_tokenizer

    dsd = text_feature_dataset()
    dsd.save_to_disk(tmp_path / "data")
    tokenizer = train_text_tokenizer(dsd["train"]["text"], vocab_size=60)
    torch.manual_seed(0)
    BertModel(text_tower_config("tiny", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    out = tmp_path / "model"
    assert main(["train", "--dataset", str(tmp_path / "data"), "--text-model", str(tmp_path / "bert"),
                 "--output-dir", str(out), "--stage-epochs", "1", "1", "1", "--batch-size", "16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("test", "validation"):
        assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "data"), "--split", split,
                     "--output", str(tmp_path / f"{split}.json")]) == 0
        assert json.loads((tmp_path / f"{split}.json").read_text())["test"] == metrics[split]
    model = load_model(out)
    _, predictions = evaluate_model(model, AutoProcessor.from_pretrained(out), dsd["test"])
    profile = interaction_profile(predictions["interaction_weights"], dsd["test"]["interaction"],
                                  model.config.component_names)
    expected = json.loads((out / "interaction_profile.json").read_text())
    assert profile.keys() == expected.keys()
    for kind, weights in expected.items():
        assert profile[kind] == pytest.approx(weights, abs=1e-6)


def test_cli_evaluate_on_dataset_missing_a_modality(tmp_path, capsys):
    dsd = feature_dataset(n=120)
    dsd.save_to_disk(tmp_path / "data")
    out = tmp_path / "model"
    assert main(["train", "--dataset", str(tmp_path / "data"), "--method", "joint", "--output-dir", str(out),
                 "--epochs", "1"]) == 0
    subset = DatasetDict({k: v.remove_columns("beta_features").add_column(
        "gamma_features", [[0.0, 1.0]] * len(v)) for k, v in dsd.items()})
    subset.save_to_disk(tmp_path / "subset")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "subset"), "--output",
                 str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["test"]["n"] == 24
    assert result["modalities_absent"] == ["beta"] and result["modalities_ignored"] == ["gamma"]
    err = capsys.readouterr().err
    assert "modalities ['beta'] are absent" in err and "modalities ['gamma'] are not the model's: ignored" in err


@pytest.mark.parametrize("breakage,message", [
    (lambda d: d.remove_columns("labels"), "labels"),
    (lambda d: d.remove_columns("beta_features"), "two modality"),
    (lambda d: d.rename_column("beta_features", "beta_stuff"), "beta_stuff"),
    (lambda d: DatasetDict(train=d["train"], dev=d["validation"], test=d["test"]), "validation"),
])
def test_cli_bad_dataset_clear_error(tmp_path, capsys, breakage, message):
    breakage(feature_dataset()).save_to_disk(tmp_path / "bad")
    assert main(["train", "--dataset", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_synergy_tower_gradient_scales_only_the_synergy_share_of_the_tower_gradient():
    batch = {"alpha_features": torch.randn(8, 6), "beta_features": torch.randn(8, 4)}
    labels = torch.randint(0, 3, (8,))
    grads = {}
    for scale in (0.0, 0.5, 1.0):
        model = feature_model(dropout=0.0, synergy_tower_gradient=scale).set_training_stage(3)
        torch.manual_seed(1)  # the same bottleneck noise in every run
        model(**batch, labels=labels).loss.backward()
        grads[scale] = torch.cat([p.grad.flatten() for p in model.dmil.encoders.towers.parameters()])
    assert not torch.allclose(grads[0.0], grads[1.0])
    # The gradient is linear in the factor: half way between none and all of the synergy's share.
    torch.testing.assert_close(grads[0.5], (grads[0.0] + grads[1.0]) / 2, atol=1e-6, rtol=1e-4)


def test_stage2_trains_the_synergy_projections_but_not_the_towers():
    model = feature_model().set_training_stage(2)
    model.train()
    batch = {"alpha_features": torch.randn(8, 6), "beta_features": torch.randn(8, 4)}
    model(**batch, labels=torch.randint(0, 3, (8,))).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dmil.synergy_projections.parameters())
    assert all(p.grad is None for p in model.dmil.encoders.towers.parameters())


@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_reliability_heads_learn_at_their_own_multiple_of_the_learning_rate(tmp_path, scale):
    from dmil_hf.training import DmilTrainer

    model = feature_model(reliability_learning_rate_scale=scale)
    trainer = DmilTrainer(model=model, args=args_for(tmp_path, learning_rate=1e-3))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    groups = trainer.optimizer.param_groups
    placed = [id(p) for group in groups for p in group["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    heads = {id(p) for p in model.dmil.reliability.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if scale != 1.0 and ids & heads:
            assert ids <= heads and group["lr"] == pytest.approx(scale * 1e-3)
        else:
            assert group["lr"] == pytest.approx(1e-3)
    assert len(groups) == (2 if scale == 1.0 else 4)  # Trainer's decay / no-decay groups, split once more
    rates = trainer.lr_scheduler.get_last_lr()  # the scheduler scales every group alike
    assert max(rates) == pytest.approx(scale * min(rates))


def test_reliability_learning_rate_scale_defaults_and_checks(tmp_path):
    config = DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_learning_rate_scale=5.0)
    config.save_pretrained(tmp_path)
    assert DmilConfig.from_pretrained(tmp_path).reliability_learning_rate_scale == 5.0
    assert DmilConfig(feature_modalities={"a": 3, "b": 4}).reliability_learning_rate_scale == 1.0  # opt-in
    assert DmilForMultimodalClassification(DmilConfig(feature_modalities={"a": 3, "b": 4})).learning_rate_scales() == []
    with pytest.raises(ValueError, match="reliability_learning_rate_scale"):
        DmilConfig(feature_modalities={"a": 3, "b": 4}, reliability_learning_rate_scale=0)


@pytest.mark.parametrize("overrides,scaled", [({}, {"f"}), ({"freeze_towers": ["text"]}, {"text", "f"}),
                                              ({"reliability_tower_gradient": 0.0}, {"text", "f"})])
def test_heads_over_towers_the_reliability_loss_trains_keep_the_stage_rate(overrides, scaled):
    from transformers import BertConfig

    text = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50)
    model = DmilForMultimodalClassification(DmilConfig(text_config=text, feature_modalities={"f": 4}, num_labels=3,
                                                       hidden_size=16, latent_size=8,
                                                       reliability_learning_rate_scale=5.0, **overrides))
    (parameters, scale), = model.learning_rate_scales()
    chosen = {id(p) for p in parameters}
    assert scale == 5.0
    assert {m for m, head in model.dmil.reliability.heads.items()
            if {id(p) for p in head.parameters()} <= chosen} == scaled
    assert len(chosen) == sum(len(list(model.dmil.reliability.heads[m].parameters())) for m in scaled)
