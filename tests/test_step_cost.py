"""What keeps a training step cheap (issue 11 item 4): loss terms logged without a host read per term per step,
`dmil train --threads`, and `dmil profile --train-step`."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

import dmil_hf.experiment
from dmil_hf import DmilConfig
from dmil_hf.cli import main
from dmil_hf.profiling import profile_train_step
from dmil_hf.training import DmilTrainer


class TermsModel(torch.nn.Module):
    """Returns the loss terms it is handed, as DMIL's outputs carry them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.terms = []

    def forward(self, **inputs):
        terms = self.terms.pop(0)
        return SimpleNamespace(loss=self.weight * sum(terms.values()), loss_terms=terms)


def test_loss_terms_are_averaged_per_window_without_reading_each_term(tmp_path, monkeypatch):
    model = TermsModel()
    trainer = DmilTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none"))
    model.terms = [{"kl": torch.tensor(1.0), "task": torch.tensor(4.0)},
                   {"kl": torch.tensor(3.0), "task": torch.tensor(2.0)}]

    def refuse(*args):
        raise AssertionError("a loss term was read back to the host during a step")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    for _ in range(2):
        trainer.compute_loss(model, {})
    monkeypatch.undo()
    logged = {}
    monkeypatch.setattr("transformers.Trainer.log", lambda self, logs, *a, **k: logged.update(logs))
    trainer.log({"loss": 5.0})
    assert logged == {"loss": 5.0, "loss_kl": 2.0, "loss_task": 3.0}
    model.terms = [{"kl": torch.tensor(7.0)}]  # the next window starts from zero
    trainer.compute_loss(model, {})
    logged.clear()
    trainer.log({"loss": 7.0})
    assert logged["loss_kl"] == 7.0 and "loss_task" not in logged


def test_flops_estimate_counts_the_parameters_once(tmp_path, monkeypatch):
    """Trainer's `total_flos` estimate, without walking every parameter at every step."""
    from transformers import Trainer

    from dmil_hf import DmilForMultimodalClassification

    model = DmilForMultimodalClassification(DmilConfig(feature_modalities={"a": 3, "b": 2}, num_labels=2))
    trainer = DmilTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none"))
    inputs = {model.main_input_name: torch.zeros(8, 3), "b_features": torch.zeros(8, 2)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert expected > 0 and trainer.floating_point_ops(inputs) == expected
    monkeypatch.setattr(type(model), "num_parameters", lambda *a, **k: pytest.fail("parameters counted again"))
    assert trainer.floating_point_ops(inputs) == expected
    assert trainer.floating_point_ops({"b_features": torch.zeros(8, 2)}) == 0  # no main input: no estimate


def test_train_threads_sets_torch_threads_for_the_run(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(dmil_hf.experiment, "run_training", lambda settings: seen.setdefault("threads", torch.get_num_threads()) and {})
    before = torch.get_num_threads()
    try:
        assert main(["train", "--dataset", "synthetic", "--output-dir", str(tmp_path / "run"), "--threads", "1"]) == 0
        assert seen["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert main(["train", "--dataset", "synthetic", "--output-dir", str(tmp_path / "run"), "--threads", "0"]) != 0


def test_profile_train_step_times_each_method_on_the_same_batch():
    result = profile_train_step(DmilConfig(feature_modalities={"a": 6, "b": 5}, num_labels=3), ("joint", "dmil"),
                                batch_size=8, steps=3)
    assert set(result["step_ms"]) == {"joint", "dmil"} and all(ms > 0 for ms in result["step_ms"].values())
    assert result["ratio_to_joint"]["joint"] == 1.0
    assert result["ratio_to_joint"]["dmil"] == pytest.approx(result["step_ms"]["dmil"] / result["step_ms"]["joint"])


def test_profile_cli_train_step_writes_json(tmp_path):
    out = tmp_path / "steps.json"
    assert main(["profile", "--train-step", "--feature-modalities", "2", "--batch-size", "8", "--repeats", "2",
                 "--threads", "1", "--output", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["towers"] == "features" and result["modalities"] == ["a", "b"]
    assert set(result["step_ms"]) == {"joint", "dmil"} and result["threads"] == 1


def test_train_torch_compile_reaches_every_stage_s_training_arguments(tmp_path, monkeypatch):
    from dmil_hf.training import _stage_arguments, stage_plan

    seen = []

    def record(model, args, *rest, **kwargs):
        seen.extend(_stage_arguments(args, stage, model, True, "eval_accuracy").torch_compile
                    for stage in stage_plan(model, args))
        return []

    monkeypatch.setattr("dmil_hf.training.train_staged", record)
    common = ["train", "--dataset", "synthetic", "--dataset-arg", "num_samples=120", "--stage-epochs", "1", "1", "1"]
    assert main(common + ["--output-dir", str(tmp_path / "compiled"), "--torch-compile"]) == 0
    assert main(common + ["--output-dir", str(tmp_path / "eager")]) == 0
    assert seen == [True] * 3 + [False] * 3
    saved = json.loads((tmp_path / "compiled" / "metrics.json").read_text())["settings"]
    assert saved["torch_compile"] is True


def test_profile_setups_time_the_main_job_on_cached_tower_outputs(tmp_path):
    from dmil_hf.profiling import train_step_setup

    out = tmp_path / "steps.json"
    assert main(["profile", "--train-step", "--setups", "main-job", "main-job-head", "--batch-size", "4",
                 "--repeats", "1", "--threads", "1", "--precision", "bf16", "--output", str(out)]) == 0
    job, head = json.loads(out.read_text())
    assert (job["towers"], job["cached"], head["cached"]) == ("main-job", ["text", "audio"], ["text", "vision", "audio"])
    assert job["precision"] == "bf16" and job["peak_memory_mb"] is None  # peak memory is measured on CUDA only
    assert head["samples_per_second"]["dmil"] == pytest.approx(4000 / head["step_ms"]["dmil"])
    config, cached = train_step_setup("main-job")
    assert config.frozen_modalities == ("text", "audio") and config.text_config.hidden_size == 384
    with pytest.raises(ValueError, match=r"unknown train-step setup 'huge'; expected one of \['features'"):
        train_step_setup("huge")
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'; got 'fp16'"):
        profile_train_step(config, precision="fp16")


def test_profile_scale_measures_each_method_at_each_size(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert main(["profile", "--scale", "60", "120", "--methods", "dmil", "--work-dir", str(tmp_path / "w"),
                 "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["rows"], r["method"], r["epochs"], r["train_rows"]) for r in results["runs"]] == [
        (60, "dmil", 3, 42), (120, "dmil", 3, 84)]
    assert all(r["seconds_per_epoch"] > 0 and r["peak_rss_mb"] > 100 for r in results["runs"])
    assert all(r["refit_seconds"] > 0 for r in results["runs"])  # DMIL's reliability refit, apart from the epochs
    peaks = {(r["rows"], r["method"]): r["peak_rss_mb"] for r in results["runs"]}
    assert results["rss_growth_mb"]["dmil"]["60->120"] == pytest.approx(peaks[120, "dmil"] - peaks[60, "dmil"])
    assert (tmp_path / "w" / "data" / "synthetic-120" / "dataset_dict.json").is_file()
    assert "| 120 | dmil |" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"sizes of at least 20 rows .* got sizes \[5\]"):
        from dmil_hf.scale import measure_scale

        measure_scale([5], ["joint"], tmp_path / "w")


GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def run_gpu_script(*options, cwd):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(GPU_SCRIPT), *options], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def test_gpu_script_dry_run_measures_every_setup_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_gpu_script("--dry-run", "--steps", "1", "--batch-size", "4", "--output", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert [r["towers"] for r in results] == ["main-job-head", "main-job", "tiny"]
    for result in results:
        assert (result["device"], result["precision"], result["steps"], result["batch_size"]) == ("cpu", "bf16", 1, 4)
        assert set(result["samples_per_second"]) == {"joint", "dmil"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
def test_gpu_script_without_cuda_fails_clearly_and_writes_nothing(tmp_path):
    done = run_gpu_script("--output", str(tmp_path / "gpu.json"), cwd=tmp_path)
    assert done.returncode == 1 and "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "gpu.json").exists()
    done = run_gpu_script("--step", "3", cwd=tmp_path)
    assert done.returncode == 2 and "unknown option '--step'" in done.stderr


def test_torch_compile_compiles_the_model_in_every_stage(tmp_path, monkeypatch):
    """accelerate's mark of a prepared model reached the model itself under torch.compile, so stages 2 and 3 ran
    uncompiled (a plain Trainer per stage prepares the same model again)."""
    from transformers import TrainingArguments

    from datasets import Dataset

    from dmil_hf import DmilForMultimodalClassification
    from dmil_hf.interactions import make_compute_metrics
    from dmil_hf.training import train_staged

    compiled = []

    def fake_compile(model, **kwargs):  # compiling on a CPU takes minutes: record the call, keep the model as it is
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = DmilConfig(feature_modalities={"a": 4, "b": 3}, num_labels=2, stage1_epochs=1, stage2_epochs=1,
                        stage3_epochs=1)
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(config)
    rows = Dataset.from_dict({"a_features": torch.randn(16, 4).numpy(), "b_features": torch.randn(16, 3).numpy(),
                              "labels": [0, 1] * 8}).with_format("torch")
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                             disable_tqdm=True, torch_compile=True)
    train_staged(model, args, rows, rows, compute_metrics=make_compute_metrics(), embedding_cache=False)
    assert compiled == ["DmilForMultimodalClassification"] * 3


def test_run_measured_reports_the_command_s_own_peak_memory(tmp_path):
    """A command started straight from a process holding 300 MB reported those 300 MB as its own peak (Linux keeps
    the starting process's peak across fork and exec), so the benchmark's runs all showed the benchmark's memory."""
    from dmil_hf.scale import run_measured

    held = bytearray(300 * 2 ** 20)  # pages written: resident in this process
    held[::4096] = b"x" * len(held[::4096])
    small = [sys.executable, "-c", "pass"]
    status, peak_mb, seconds = run_measured(small, tmp_path / "small.log")
    assert status == 0 and peak_mb < 100 and seconds > 0
    big = [sys.executable, "-c", "b = bytearray(200 * 2 ** 20); b[::4096] = b'x' * len(b[::4096])"]
    assert 200 < run_measured(big, tmp_path / "big.log")[1] < 300
    failing = [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"]
    assert run_measured(failing, tmp_path / "failing.log")[0] == 3 and "broken" in (tmp_path / "failing.log").read_text()
    del held


def _graph_nodes(tensor) -> set[str]:
    """The names of every autograd node behind `tensor`."""
    seen, names, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_loss_terms_enter_the_loss_as_the_vectors_they_were_cut_from():
    from dmil_hf.modeling_dmil import _by_name, stacked_terms

    first, second = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    terms = {**_by_name(["a", "b"], first), "c": torch.tensor(5.0), **_by_name(["d"], second)}
    values = stacked_terms(terms)
    assert values.tolist() == [1.0, 2.0, 5.0, 3.0]
    terms = {**_by_name(["a", "b"], first), "c": torch.tensor(5.0)}
    values = stacked_terms(terms)
    assert values.tolist() == [1.0, 2.0, 5.0]
    terms["a"] = torch.tensor(7.0)  # a replaced term: the rest of its vector enters term by term
    assert stacked_terms(terms).tolist() == [7.0, 2.0, 5.0]
    assert stacked_terms({"b": terms["b"], "x": torch.tensor([4.0])}).tolist() == [2.0, 4.0]


@pytest.mark.parametrize("corruption", [False, True])
def test_stage_loss_reads_the_term_vectors_with_the_same_value_and_gradients(corruption):
    """The stage loss from DMIL's term vectors equals the term-by-term stack exactly, gradients included, and its
    backward pass has no unbind of the vectors into terms (nor a stack of those terms)."""
    from dmil_hf import DmilForMultimodalClassification
    from dmil_hf.modeling_dmil import STAGE_LOSSES, evaluate_loss

    config = DmilConfig(feature_modalities={"a": 6, "b": 5}, num_labels=3, hidden_size=16, latent_size=8)
    torch.manual_seed(0)
    model = DmilForMultimodalClassification(config).set_training_stage(3).train()
    inputs = {"a_features": torch.randn(8, 6), "b_features": torch.randn(8, 5), "labels": torch.arange(8) % 3}
    if corruption:
        inputs["modality_corruption"] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5], [0.0, 0.0]] * 2)
    torch.manual_seed(1)
    out = model(**inputs)
    assert "UnbindBackward0" not in _graph_nodes(out.loss)
    each = evaluate_loss(STAGE_LOSSES[3], dict(out.loss_terms), config)  # a plain dict: every term stacked
    assert torch.equal(out.loss, each)
    parameters = [p for p in model.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(out.loss, parameters, retain_graph=True, allow_unused=True),
                         torch.autograd.grad(each, parameters, allow_unused=True), strict=True):
        assert (got is None and want is None) or torch.equal(got, want)
