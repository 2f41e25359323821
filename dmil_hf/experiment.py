"""One training run end to end (dataset -> processor -> model -> staged training -> test report), and evaluation of a
saved model. `dmil train`, `dmil evaluate`, the benchmark and the examples all call these functions."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .configuration_dmil import TOWERS
from .methods import METHODS
from .run_checks import check_freeze_towers, check_label_coverage, check_settings
from .run_folder import (RUN_ENTRIES, RUN_MARKER, TRAIN_LOG, RunClock, check_output_dir, check_resume_matches,
                         data_summary, prepare_output_dir, read_run_marker, write_run_marker)
from .run_settings import RunSettings

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 2e-3  # baselines; DMIL's per-stage presets live in DmilConfig


def build_config(settings: RunSettings, schema, processor):
    from . import DmilConfig
    from .towers import tower_configs

    tower_modalities = [m for m in schema.modalities if m in TOWERS]
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
        freeze_towers=settings.freeze_towers,
    )
    if settings.stage_epochs:
        kwargs.update({f"stage{k + 1}_epochs": e for k, e in enumerate(settings.stage_epochs)})
    if settings.stage_learning_rates:
        kwargs.update({f"stage{k + 1}_learning_rate": r for k, r in enumerate(settings.stage_learning_rates)})
    if settings.modality_dropout is not None:
        kwargs["modality_dropout"] = settings.modality_dropout
    kwargs.update(settings.config_overrides)
    return configs, kwargs


def build_run_model(settings: RunSettings, schema, processor):
    """The model of `settings.method` on random towers, or around the pretrained towers named in `settings.pretrained`."""
    from . import DmilConfig
    from .methods import build_model
    from .pretrained import load_pretrained_tower

    configs, kwargs = build_config(settings, schema, processor)
    towers = {}
    for modality, source in settings.pretrained.items():
        towers[modality] = load_pretrained_tower(source)
        configs[f"{modality}_config"] = towers[modality].config
    torch.manual_seed(settings.seed)
    return build_model(settings.method, DmilConfig(**configs, **kwargs), towers)


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


def evaluate_model(model, processor, split, modalities=None, embedding_cache=True) -> tuple[dict, dict]:
    """Evaluate a model on a raw split in the dataset schema; returns (report, predictions). `embedding_cache`: see
    [`evaluate_encoded`]."""
    from .preprocess import encode_split

    modalities = modalities or model.config.modalities
    present = [m for m in modalities if m in model.config.modalities]
    return evaluate_encoded(model, encode_split(split, processor, present), split, embedding_cache)


def evaluate_encoded(model, encoded, split, embedding_cache=True) -> tuple[dict, dict]:
    """Evaluate a model on `encoded`, the encoding of the raw `split` (which gives the labels and interaction
    types); returns (report, predictions). Frozen towers read their pooled outputs from the embedding cache
    (`embedding_cache`: True for the default folder, a folder, or False to run them live; see
    `dmil_hf.embedding_cache.with_frozen_tower_embeddings`)."""
    from .embedding_cache import with_frozen_tower_embeddings

    predictions = predict(model, with_frozen_tower_embeddings(model, encoded, embedding_cache))
    labels = np.asarray(split["labels"])
    interactions = split["interaction"] if "interaction" in split.column_names else None
    return test_report(predictions["logits"], labels, interactions), predictions


def run_training(settings: RunSettings) -> dict:
    """Train `settings.method` on `settings.dataset` and write the checkpoint, processor and `metrics.json`.

    Every check (settings, `--output-dir`, the dataset, pretrained towers, the Hub target) runs before anything is
    deleted or trained: an earlier run is removed (`overwrite`) only once the new one is known to start.

    Reproducibility: on CPU, the same settings and seed give bit-identical weights (the tokenizer of random text towers
    is built deterministically; model init, data order and dropout follow the seed). What can still change them: the
    torch thread count (recorded as `torch_num_threads` in metrics.json; it changes the order of float reductions),
    other torch / transformers versions, and on GPU non-deterministic kernels (`full_determinism=True` selects
    deterministic ones)."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    from .data import inspect_dataset, load_dataset_from_name_or_path
    from .interactions import make_compute_metrics
    from .preprocess import build_processor, encode_dataset, encode_split
    from .training import (TrainLogCallback, apply_lora, merge_lora, push_trained_model, refit_split,
                           save_lora_adapters, train_staged)

    check_settings(settings)
    output_dir = Path(settings.output_dir)
    kind = check_output_dir(output_dir, settings.resume, settings.overwrite)
    if settings.push_to_hub:  # fail before training, not after it
        from .hub import check_push_target

        check_push_target(settings.hub_model_id, check_reachable=True)
    state = PartialState()
    dsd = load_dataset_from_name_or_path(settings.dataset, **settings.dataset_kwargs)
    schema = inspect_dataset(dsd)
    unused = sorted(m for m in settings.pretrained if m not in schema.modalities)
    if unused:
        raise ValueError(f"{', '.join(f'--{m}-model' for m in unused)} given, but the dataset has no such modality "
                         f"(it has {list(schema.modalities)}); drop the option or use a dataset with that column.")
    check_freeze_towers(settings, schema.modalities)
    label_warnings = check_label_coverage(dsd, schema.num_labels)
    for warning in label_warnings:
        logger.warning(warning)
    data = data_summary(dsd)
    if settings.resume:
        check_resume_matches(output_dir, settings, data)
    processor = build_processor(schema.modalities, dsd["train"], settings.pretrained)
    corruption = (settings.train_corruption if settings.train_corruption is not None
                  else METHODS[settings.method].train_corruption)
    train = None
    if corruption > 0:  # corrupted copies of training rows (see dmil_hf.data.corruption)
        from .data import add_training_corruption

        # Drawn once per dataset, not per run seed: every run on a dataset then shares one embedding cache of frozen
        # towers (a Whisper pass over the corrupted copies costs minutes on a CPU); the seed still sets the model.
        train = add_training_corruption(dsd["train"], schema.modalities, corruption, seed=0)
    encoded = encode_dataset(dsd, processor, schema.modalities, train=train)
    model = build_run_model(settings, schema, processor)
    # The reliability refit's own corrupted copy; none where the stages saw no corrupted rows (the heads are untrained).
    refit = refit_split(model, dsd["train"], schema.modalities) if train is not None else None
    if refit is not None:
        refit = encode_split(refit, processor, schema.modalities)
    if settings.lora:
        apply_lora(model)
    # Everything is checked: only now may an earlier run in output_dir go. Every process checked the folder before
    # the main one writes into it (otherwise another process could find the new run there and refuse it).
    state.wait_for_everyone()
    before = 0.0
    if state.is_main_process:
        prepare_output_dir(output_dir, settings.resume, settings.overwrite, kind)
        foreign = {p.name for p in output_dir.iterdir()} - set(RUN_ENTRIES)  # kept by --overwrite: not ours to list
        marker = read_run_marker(output_dir) if settings.resume else None
        before = float(marker.get("train_seconds_saved", 0.0)) if marker else 0.0
        sessions = (int(marker.get("sessions", 1)) + 1) if marker else 1
        write_run_marker(output_dir, settings, data, status="running", sessions=sessions, train_seconds_saved=before)
    state.wait_for_everyone()
    # Baselines train as long as DMIL's three stages together, unless told otherwise.
    total_epochs = sum(stage.epochs for stage in model.config.stages)
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(64, settings.batch_size),
        num_train_epochs=settings.epochs or total_epochs,
        learning_rate=settings.learning_rate or DEFAULT_LEARNING_RATE,
        weight_decay=1e-4,
        seed=settings.seed,
        data_seed=settings.seed,
        full_determinism=settings.full_determinism,
        torch_compile=settings.torch_compile,
        report_to=settings.report_to,
        logging_steps=10,
        save_only_model=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        # Where the finished run goes (`push_trained_model` below); the stages themselves never push.
        hub_model_id=settings.hub_model_id,
        hub_private_repo=settings.hub_private,
    )
    validation_interactions = dsd["validation"]["interaction"] if schema.has_interaction else None
    regression = model.config.problem_type == "regression"
    clock = RunClock(output_dir, settings, data, before)
    records = train_staged(
        model, args, encoded["train"], encoded["validation"],
        compute_metrics=make_compute_metrics(validation_interactions),
        resume=settings.resume, metric="mse" if regression else "accuracy", greater_is_better=not regression,
        callbacks=[clock.callback(), TrainLogCallback(output_dir / TRAIN_LOG)], embedding_cache=settings.embedding_cache,
        refit_dataset=refit,
    )
    session_seconds = clock.session()
    if not state.is_main_process:
        return {}
    if settings.lora:
        save_lora_adapters(model, output_dir / "adapters")
        merge_lora(model)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    metrics = {"method": settings.method, "dataset": settings.dataset, "seed": settings.seed}
    cache = settings.embedding_cache
    metrics["validation"], _ = evaluate_encoded(model, encoded["validation"], dsd["validation"], cache)
    metrics["test"], predictions = evaluate_encoded(model, encoded["test"], dsd["test"], cache)
    # train_seconds: all sessions of this run (an interrupted one counted up to its last saved checkpoint);
    # train_seconds_this_session: only the last one (after --resume, the resumed part).
    metrics["train_seconds"] = before + session_seconds
    metrics["train_seconds_this_session"] = session_seconds
    metrics["sessions"] = sessions
    metrics["stages"] = records
    metrics["settings"] = {k: v for k, v in asdict(settings).items() if k not in ("resume", "overwrite")}
    metrics["torch_num_threads"] = torch.get_num_threads()
    if label_warnings:
        metrics["warnings"] = label_warnings
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if "interaction_weights" in predictions and schema.has_interaction:
        profile = interaction_profile(predictions["interaction_weights"], dsd["test"]["interaction"],
                                      model.config.component_names)
        (output_dir / "interaction_profile.json").write_text(json.dumps(profile, indent=2))
        from .plots import plot_interaction_weights

        plot_interaction_weights(predictions["interaction_weights"], dsd["test"]["interaction"],
                                 model.config.component_names, output_dir / "interaction_weights.png")
    files = [p.name for p in output_dir.iterdir() if p.name not in foreign and p.name != f".{RUN_MARKER}.tmp"]
    write_run_marker(output_dir, settings, data, status="finished", train_seconds_saved=metrics["train_seconds"],
                     files=sorted(set(files) | {RUN_MARKER}))
    # The per-epoch checkpoints only serve --resume; a finished run keeps its final model, not them.
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    if settings.push_to_hub:
        metrics["hub_commit_url"] = push_trained_model(output_dir, args)
    return metrics


__all__ = ["RunSettings", "build_config", "build_run_model", "evaluate_encoded", "evaluate_model", "interaction_profile",
           "predict", "run_training", "test_report"]
