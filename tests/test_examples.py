"""Every script in examples/ runs with --smoke (offline, tiny data and towers) and leaves what it promises, the
two-process CPU launch through examples/accelerate/ddp_cpu_2proc.yaml trains as one job, and every accelerate
config loads with accelerate's own loader.

The scripts run as subprocesses, two at a time (most of their time is importing torch and transformers), started
together when the first test here asks for them."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ACCELERATE_CONFIGS = sorted((EXAMPLES / "accelerate").glob("*.yaml"))
SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))
MOSEI_WIDTHS = {"language": 300, "acoustic": 74, "visual": 35}


def digits_unavailable() -> str | None:
    """Why the `digits` data cannot be built here (no espeak-ng and no cached clips), or None."""
    from dmil_hf.data.digits import ALL_VOICES, DIGIT_WORDS, _clip_path, default_cache_dir

    if shutil.which("espeak-ng"):
        return None
    cache = default_cache_dir()
    if all(_clip_path(cache, word, voice).exists() for word in DIGIT_WORDS for voice in ALL_VOICES):
        return None
    return f"the digits examples need espeak-ng (apt-get install espeak-ng) or its clips cached in {cache}"


SKIP_DIGITS = digits_unavailable()


def _smoke_commands(out: Path) -> dict[str, list[str]]:
    """name -> command, longest first (they start in this order)."""
    def script(name, *extra):
        return [sys.executable, str(EXAMPLES / name), "--smoke", "--output-dir", str(out / Path(name).stem), *extra]

    commands = {
        "export_and_push": script("export_and_push.py"),
        "ddp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(EXAMPLES / "accelerate" / "ddp_cpu_2proc.yaml"), str(EXAMPLES / "train_features.py"), "--smoke",
                "--output-dir", str(out / "ddp")],
        "train_features": script("train_features.py"),
        "estimate_interactions": script("estimate_interactions.py"),
    }
    if SKIP_DIGITS is None:
        commands["train_audio_vision"] = script("train_audio_vision.py")
        commands["train_text_vision"] = script("train_text_vision.py")
    return commands


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """name -> future of (CompletedProcess, output folder); the runs start at once, two at a time."""
    out = tmp_path_factory.mktemp("examples")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")

    def run(command, folder):
        # CPU-only processes under `accelerate launch` join one job only with ACCELERATE_USE_CPU (see the config).
        extra = {"ACCELERATE_USE_CPU": "true"} if "accelerate.commands.launch" in command else {}
        done = subprocess.run(command, cwd=out, env={**env, **extra}, capture_output=True, text=True, timeout=280)
        return done, folder

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(run, command, out / name) for name, command in _smoke_commands(out).items()}


def finished(smoke, name):
    done, folder = smoke[name].result()
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout, folder


def last_json(stdout: str) -> dict:
    """The last pretty-printed JSON object in a script's output (Trainer's log lines come before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return json.loads("\n".join(lines[start:end + 1]))


def assert_model_folder(folder: Path, modalities):
    from transformers import AutoModelForSequenceClassification

    import dmil_hf  # noqa: F401  (registers the dmil model types)

    for name in ("config.json", "model.safetensors"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(model).__name__ == "DmilForMultimodalClassification"
    assert set(model.config.modalities) == set(modalities)


@pytest.mark.skipif(SKIP_DIGITS is not None, reason=SKIP_DIGITS or "")
@pytest.mark.parametrize("name, modalities", [("train_text_vision", ("text", "vision")),
                                              ("train_audio_vision", ("vision", "audio"))])
def test_trainer_api_examples_save_a_loadable_model_and_report(smoke, name, modalities):
    stdout, folder = finished(smoke, name)
    assert_model_folder(folder, modalities)
    assert (folder / "processor_config.json").is_file()
    assert "test accuracy:" in stdout
    report = last_json(stdout)
    assert 0.0 <= report["test"]["accuracy"] <= 1.0 and report["test"]["n"] > 0
    assert set(report["best_validation"]) == {"stage1", "stage2", "stage3"}


def test_features_example_trains_from_a_saved_dataset(smoke):
    stdout, folder = finished(smoke, "train_features")
    assert (folder / "data" / "dataset_dict.json").is_file()  # the user-dataset path: save_to_disk, then dataset=<dir>
    assert_model_folder(folder / "model", MOSEI_WIDTHS)
    config = json.loads((folder / "model" / "config.json").read_text())
    assert config["feature_modalities"] == MOSEI_WIDTHS
    metrics = json.loads((folder / "model" / "metrics.json").read_text())
    assert set(metrics["test"]["by_interaction"]) == {"redundancy", "synergy", *(f"unique_{m}" for m in MOSEI_WIDTHS)}
    assert stdout.count("test accuracy:") == 1


def test_two_cpu_processes_from_the_accelerate_config_train_as_one_job(smoke):
    stdout, folder = finished(smoke, "ddp")
    # Two processes that failed to join would each train alone and each print a report.
    assert stdout.count("test accuracy:") == 1, stdout[-3000:]
    assert (folder / "model" / "model.safetensors").is_file()


def test_interaction_example_prints_a_table_and_saves_the_plot(smoke):
    stdout, folder = finished(smoke, "estimate_interactions")
    plot = folder / "per_sample_interactions.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "true type" in stdout and "dataset level (bits)" in stdout
    numbers = json.loads((folder / "interactions.json").read_text())
    assert numbers["dataset"]["units"] == "bits"
    assert set(numbers["per_sample_by_type"]) == {"redundancy", "unique_a", "unique_b", "synergy"}
    # Per sample, each kind of sample carries most of its information in its own component.
    table = numbers["per_sample_by_type"]
    for kind in ("redundancy", "unique_a", "unique_b"):
        assert max(table[kind], key=table[kind].get) == kind, table


def test_export_example_writes_a_checked_hub_folder_and_pushes_only_when_asked(smoke):
    stdout, folder = finished(smoke, "export_and_push")
    export = folder / "export"
    for name in ("config.json", "model.safetensors", "modeling_dmil.py", "configuration_dmil.py", "README.md"):
        assert (export / name).is_file(), f"export lacks {name}"
    assert "auto_map" in json.loads((export / "config.json").read_text())
    assert "checked in a fresh process" in stdout
    assert "not pushed (no --repo-id)" in stdout


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.num_processes % config.num_machines == 0
    expected = {"ddp_cpu_2proc.yaml": (DistributedType.MULTI_GPU, 1, "no"),
                "ddp_multi_gpu.yaml": (DistributedType.MULTI_GPU, 1, "bf16"),
                "fsdp.yaml": (DistributedType.FSDP, 1, "bf16"),
                "multi_node.yaml": (DistributedType.MULTI_GPU, 2, "bf16")}[path.name]
    assert (config.distributed_type, config.num_machines, config.mixed_precision) == expected
    if path.name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if path.name == "multi_node.yaml":
        assert config.main_process_ip and config.main_process_port


def test_examples_readme_lists_every_script_and_config():
    readme = (EXAMPLES / "README.md").read_text()
    for name in SCRIPTS + [f"accelerate/{p.name}" for p in ACCELERATE_CONFIGS]:
        assert f"`{name}`" in readme, f"examples/README.md does not mention {name}"
    assert len(SCRIPTS) == 5 and len(ACCELERATE_CONFIGS) == 4
