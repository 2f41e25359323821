"""One training run end to end (dataset -> processor -> model -> staged training -> test report), and evaluation of a
saved model. `dmil train`, `dmil evaluate`, the benchmark and the examples all call these functions."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

METHODS = ("dmil", "joint", "ensemble", "i2moe")


@dataclass
class RunSettings:
    """Everything `dmil train` needs. Epoch and learning-rate fields left as None take the method's defaults."""

    dataset: str = "digits"
    method: str = "dmil"
    output_dir: str = "runs/dmil-digits"
    towers: str = "tiny"
    pretrained: dict = field(default_factory=dict)  # modality -> hub id or local folder
    stage_epochs: tuple | None = None  # DMIL (stage1, stage2, stage3)
    stage_learning_rates: tuple | None = None
    epochs: float | None = None  # baselines; default: DMIL's total epochs
    learning_rate: float | None = None  # baselines
    batch_size: int = 64
    seed: int = 0
    lora: bool = False
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"
    dataset_kwargs: dict = field(default_factory=dict)
    config_overrides: dict = field(default_factory=dict)
    tower_pooling: str = "mean"
    push_to_hub: bool = False  # push the finished run (exported, checked, with its card) to `hub_model_id`
    hub_model_id: str | None = None
    hub_private: bool = False


DEFAULT_LEARNING_RATE = 2e-3  # baselines; DMIL's per-stage presets live in DmilConfig


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Refuse to write into a non-empty folder unless asked to resume or overwrite."""
    path = Path(output_dir)
    if path.exists() and any(path.iterdir()):
        if overwrite:
            shutil.rmtree(path)
        elif not resume:
            raise FileExistsError(
                f"output folder {str(path)!r} is not empty; pass --overwrite to replace it or --resume to continue it."
            )
    elif resume:
        raise FileNotFoundError(f"--resume was given but {str(path)!r} holds no run to continue.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_config(settings: RunSettings, schema, dsd, processor):
    from . import DmilConfig
    from .towers import tower_configs

    tower_modalities = [m for m in schema.modalities if m in ("text", "vision", "audio")]
    pretrained = settings.pretrained
    random_towers = [m for m in tower_modalities if m not in pretrained]
    vocab = len(processor.tokenizer) if processor is not None and "text" in random_towers else 1000
    channels = getattr(processor, "image_channels", None) or 1
    configs = tower_configs(random_towers, settings.towers, vocab_size=vocab, image_channels=channels)
    labels = schema.label_names if getattr(schema, "label_names", None) else [str(i) for i in range(schema.num_labels)]
    kwargs = dict(
        feature_modalities=dict(schema.feature_dims),
        num_labels=schema.num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        tower_pooling=settings.tower_pooling,
    )
    if settings.stage_epochs:
        kwargs.update({f"stage{k + 1}_epochs": e for k, e in enumerate(settings.stage_epochs)})
    if settings.stage_learning_rates:
        kwargs.update({f"stage{k + 1}_learning_rate": r for k, r in enumerate(settings.stage_learning_rates)})
    kwargs.update(settings.config_overrides)
    return configs, kwargs


def build_run_model(settings: RunSettings, schema, dsd, processor):
    """The model of `settings.method` on random towers, or around the pretrained towers named in `settings.pretrained`."""
    from transformers import AutoModel

    from . import DmilConfig
    from .baselines import build_model
    from .pretrained import resolve_pretrained

    configs, kwargs = build_config(settings, schema, dsd, processor)
    towers = {}
    for modality, source in settings.pretrained.items():
        tower = AutoModel.from_pretrained(resolve_pretrained(source))
        towers[modality] = tower.get_encoder() if getattr(tower.config, "is_encoder_decoder", False) else tower
        configs[f"{modality}_config"] = towers[modality].config
    torch.manual_seed(settings.seed)
    model = build_model(settings.method, DmilConfig(**configs, **kwargs))
    for modality, tower in towers.items():
        model.base_model.encoders.towers[modality] = tower
    return model


def predict(model, encoded, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Logits (and the interaction readout and gate weights when the model has them) for an encoded split, in row
    order."""
    model.eval()
    logits, weights, gates = [], [], []
    columns = [c for c in encoded.column_names if c != "labels"]
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            out = model(**{c: batch[c] for c in columns})
            logits.append(out.logits.float().numpy())
            if getattr(out, "interaction_weights", None) is not None:
                weights.append(out.interaction_weights.float().numpy())
            if getattr(out, "gate_weights", None) is not None:
                gates.append(out.gate_weights.float().numpy())
    result = {"logits": np.concatenate(logits)}
    if weights:
        result["interaction_weights"] = np.concatenate(weights)
    if gates:
        result["gate_weights"] = np.concatenate(gates)
    return result


def test_report(logits: np.ndarray, labels: np.ndarray, interactions=None) -> dict:
    """`{"accuracy": float, "by_interaction": {...}, "n": int}` (regression: `mse` instead of accuracy)."""
    from .interactions import make_compute_metrics
    from transformers import EvalPrediction

    metrics = make_compute_metrics(interactions)(EvalPrediction(predictions=logits, label_ids=labels))
    report = {k: float(v) for k, v in metrics.items() if not k.startswith("accuracy_")}
    if interactions is not None:
        report["by_interaction"] = {k[len("accuracy_"):]: float(v) for k, v in metrics.items()
                                    if k.startswith("accuracy_")}
    report["n"] = int(len(labels))
    return report


def interaction_profile(weights: np.ndarray, interactions, component_names) -> dict:
    """Mean interaction weight of each component per ground-truth interaction type."""
    interactions = np.asarray(interactions)
    return {
        kind: {name: float(weights[interactions == kind, k].mean()) for k, name in enumerate(component_names)}
        for kind in sorted(set(interactions.tolist()))
    }


def evaluate_model(model, processor, split, modalities=None) -> tuple[dict, dict]:
    """Evaluate a model on a raw split in the dataset schema; returns (report, predictions)."""
    from .preprocess import encode_split

    modalities = modalities or model.config.modalities
    present = [m for m in modalities if m in model.config.modalities]
    encoded = encode_split(split, processor, present)
    predictions = predict(model, encoded)
    labels = np.asarray(split["labels"])
    interactions = split["interaction"] if "interaction" in split.column_names else None
    return test_report(predictions["logits"], labels, interactions), predictions


def run_training(settings: RunSettings) -> dict:
    """Train `settings.method` on `settings.dataset` and write the checkpoint, processor and `metrics.json`."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    from .data import inspect_dataset, load_dataset_from_name_or_path
    from .interactions import make_compute_metrics
    from .preprocess import build_processor, encode_dataset
    from .training import apply_lora, merge_lora, save_lora_adapters, train_staged

    if settings.method not in METHODS:
        raise ValueError(f"method {settings.method!r} is unknown; expected one of {list(METHODS)}.")
    if settings.push_to_hub:  # fail before training, not after it
        from .hub import check_push_target

        check_push_target(settings.hub_model_id)
    state = PartialState()
    output_dir = Path(settings.output_dir)
    if state.is_main_process:
        prepare_output_dir(output_dir, settings.resume, settings.overwrite)
    state.wait_for_everyone()
    dsd = load_dataset_from_name_or_path(settings.dataset, **settings.dataset_kwargs)
    schema = inspect_dataset(dsd)
    processor = build_processor(schema.modalities, dsd["train"], settings.pretrained)
    encoded = encode_dataset(dsd, processor, schema.modalities)
    model = build_run_model(settings, schema, dsd, processor)
    if settings.lora:
        apply_lora(model)
    # Baselines train as long as DMIL's three stages together, unless told otherwise.
    total_epochs = sum(getattr(model.config, f"stage{k}_epochs") for k in (1, 2, 3))
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(64, settings.batch_size),
        num_train_epochs=settings.epochs or total_epochs,
        learning_rate=settings.learning_rate or DEFAULT_LEARNING_RATE,
        weight_decay=1e-4,
        seed=settings.seed,
        report_to=settings.report_to,
        logging_steps=10,
        save_only_model=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    validation_interactions = dsd["validation"]["interaction"] if schema.has_interaction else None
    regression = model.config.problem_type == "regression"
    start = time.perf_counter()
    records = train_staged(
        model, args, encoded["train"], encoded["validation"],
        compute_metrics=make_compute_metrics(validation_interactions),
        resume=settings.resume, metric="mse" if regression else "accuracy", greater_is_better=not regression,
    )
    train_seconds = time.perf_counter() - start
    if not state.is_main_process:
        return {}
    if settings.lora:
        save_lora_adapters(model, output_dir / "adapters")
        merge_lora(model)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    metrics = {"method": settings.method, "dataset": settings.dataset, "seed": settings.seed}
    metrics["validation"], _ = evaluate_model(model, processor, dsd["validation"])
    metrics["test"], predictions = evaluate_model(model, processor, dsd["test"])
    metrics["train_seconds"] = train_seconds
    metrics["stages"] = records
    metrics["settings"] = {k: v for k, v in asdict(settings).items() if k not in ("resume", "overwrite")}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if "interaction_weights" in predictions and schema.has_interaction:
        profile = interaction_profile(predictions["interaction_weights"], dsd["test"]["interaction"],
                                      model.config.component_names)
        (output_dir / "interaction_profile.json").write_text(json.dumps(profile, indent=2))
        from .plots import plot_interaction_weights

        plot_interaction_weights(predictions["interaction_weights"], dsd["test"]["interaction"],
                                 model.config.component_names, output_dir / "interaction_weights.png")
    # The per-epoch checkpoints only serve --resume; a finished run keeps its final model, not them.
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    if settings.push_to_hub:
        from .hub import push_model

        metrics["hub_commit_url"] = push_model(output_dir, settings.hub_model_id, private=settings.hub_private)
    return metrics


__all__ = ["METHODS", "RunSettings", "evaluate_model", "interaction_profile", "predict", "run_training", "test_report"]
