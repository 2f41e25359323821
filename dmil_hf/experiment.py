"""One training run end to end (dataset -> processor -> model -> staged training -> test report), and evaluation of a
saved model. `dmil train`, `dmil evaluate`, the benchmark and the examples all call these functions."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .configuration_dmil import TOWERS
from .methods import METHODS
from .run_settings import RunSettings

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 2e-3  # baselines; DMIL's per-stage presets live in DmilConfig


RUN_MARKER = "dmil_run.json"  # written first into every run folder: what the run is, its settings, its state
TRAIN_LOG = "train_log.jsonl"  # every log event of the run's training, all its loss terms (training.TrainLogCallback)
# The settings a resumed run must share with the interrupted one (the others only say where output goes).
RESUME_KEYS = ("dataset", "method", "towers", "pretrained", "stage_epochs", "stage_learning_rates", "epochs",
               "learning_rate", "batch_size", "seed", "lora", "dataset_kwargs", "config_overrides", "tower_pooling",
               "freeze_towers")


def _known_config_keys() -> set[str]:
    import inspect

    from transformers import PretrainedConfig

    from . import DmilConfig

    own = {name for name, p in inspect.signature(DmilConfig.__init__).parameters.items()
           if name != "self" and p.kind is not p.VAR_KEYWORD}
    return own | set(PretrainedConfig().to_dict())


def check_settings(settings: RunSettings) -> None:
    """Refuse settings that cannot be right, before anything is loaded, trained or deleted."""
    import difflib
    import math

    if settings.method not in METHODS:
        raise ValueError(f"method {settings.method!r} is unknown; expected one of {list(METHODS)}.")
    if isinstance(settings.batch_size, bool) or not isinstance(settings.batch_size, int) or settings.batch_size < 1:
        raise ValueError(f"--batch-size {settings.batch_size!r} must be a positive integer.")
    for name, values in (("--stage-epochs", settings.stage_epochs), ("--stage-learning-rates",
                                                                     settings.stage_learning_rates)):
        if values is None:
            continue
        if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"{name} {list(values)} must be three finite numbers >= 0 (0 skips a stage).")
    for k in (1, 2, 3):  # the same limits for a stage's epochs given as --config-arg stage<k>_epochs=...
        value = settings.config_overrides.get(f"stage{k}_epochs")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"--config-arg stage{k}_epochs={value!r} must be a finite number >= 0 "
                             "(0 skips the stage).")
    if settings.stage_epochs is not None and sum(settings.stage_epochs) <= 0:
        raise ValueError(f"--stage-epochs {list(settings.stage_epochs)} trains nothing; give at least one stage > 0.")
    for name, value in (("--epochs", settings.epochs), ("--learning-rate", settings.learning_rate)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} {value!r} must be a positive number.")
    for name, value, top in (("--train-corruption", settings.train_corruption, 1.0),
                             ("--modality-dropout", settings.modality_dropout, 0.999)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= top):
            raise ValueError(f"{name} {value!r} must be a number in [0, {top:g}].")
    known = _known_config_keys()
    for key in settings.config_overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"--config-arg {key!r} is not a DmilConfig field, so it would have no effect.{hint} "
                             f"Known fields: {sorted(k for k in known if not k.startswith('_'))}.")
    path = Path(settings.output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output-dir {str(path)!r} is a file; expected a folder (new or a dmil run).")
    for modality, source in settings.pretrained.items():
        check_pretrained_source(modality, source)
    if not isinstance(settings.freeze_towers, bool) and (
            isinstance(settings.freeze_towers, str) or not all(isinstance(m, str) for m in settings.freeze_towers)):
        raise ValueError(f"--freeze-towers {settings.freeze_towers!r} must be modality names (or none: all towers).")


def check_freeze_towers(settings: RunSettings, modalities) -> None:
    """`--freeze-towers` must name the dataset's modalities, and `--lora` needs a transformer tower left unfrozen."""
    frozen = list(modalities) if settings.freeze_towers is True else list(settings.freeze_towers or [])
    unknown = sorted(set(frozen) - set(modalities))
    if unknown:
        raise ValueError(f"--freeze-towers names {unknown}, which the dataset does not have (its modalities are "
                         f"{list(modalities)}).")
    towers = [m for m in modalities if m in TOWERS]
    if settings.lora and towers and all(m in frozen for m in towers):
        raise ValueError(f"--lora adapts the transformer towers that are not frozen, but --freeze-towers freezes all "
                         f"of them ({frozen}); freeze fewer towers or drop --lora.")


def check_pretrained_source(modality: str, source: str) -> str:
    """The folder or hub id `source` resolves to, after checking that a config loads from it (one clear error)."""
    from transformers import AutoConfig

    from .pretrained import resolve_pretrained

    resolved = resolve_pretrained(source)
    if isinstance(resolved, str) and (resolved.startswith((".", "/", "~")) or Path(resolved).expanduser().exists()):
        if not Path(resolved).expanduser().is_dir():
            raise FileNotFoundError(f"--{modality}-model {source!r}: no folder at that path; expected a folder written "
                                    "by save_pretrained, a Hub id, or an offline alias (all-minilm-l6-v2, "
                                    "whisper-tiny.en).")
    try:
        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"--{modality}-model {source!r} does not load: no local folder of that name, and as a Hub id: {first} "
            "Expected a folder written by save_pretrained, a reachable (or cached) Hub id, or an offline alias "
            "(all-minilm-l6-v2, whisper-tiny.en).") from None
    return resolved


def check_label_coverage(dsd, num_labels: int) -> list[str]:
    """A train split with a single class is refused; classes that evaluation splits hold but train never shows are
    returned as warnings (they can only be predicted by chance)."""
    train = set(np.unique(np.asarray(dsd["train"]["labels"])).tolist())
    if len(train) < 2:
        raise ValueError(f"split 'train' holds a single class ({sorted(train)}) of the dataset's {num_labels}; a "
                         "classifier needs at least two classes to learn from.")
    warnings = []
    for name in ("validation", "test"):
        unseen = sorted(set(np.unique(np.asarray(dsd[name]["labels"])).tolist()) - train)
        if unseen:
            warnings.append(f"split {name!r} holds class ids {unseen} that split 'train' never shows; the model "
                            "cannot learn them, so their samples will be predicted wrong.")
    return warnings


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_kind(path: Path) -> str:
    """What `path` holds: "empty" (absent or empty), "running" / "finished" (a dmil run), or "foreign"."""
    if not path.exists() or not any(path.iterdir()):
        return "empty"
    marker = _read_json(path / RUN_MARKER)
    if isinstance(marker, dict) and marker.get("package") == "dmil_hf":
        return "finished" if marker.get("status") == "finished" else "running"
    # Runs written before the marker existed: a finished one has metrics.json with its settings; an interrupted
    # one, the per-stage checkpoint folders.
    metrics = _read_json(path / "metrics.json")
    if isinstance(metrics, dict) and "settings" in metrics and "method" in metrics and (path / "config.json").exists():
        return "finished"
    config = _read_json(path / "config.json")  # a model folder written by save_pretrained of one of our classes
    if isinstance(config, dict) and str(config.get("model_type", "")).startswith("dmil"):
        return "finished"
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any((checkpoints / n).is_dir() for n in ("stage1", "stage2", "stage3", "train")):
        return "running"
    return "foreign"


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> str:
    """Read-only check of `--output-dir` against `--resume` / `--overwrite`; returns what it holds (see `run_kind`).
    Nothing is deleted here: a bad dataset or setting found later must not cost the user the previous run."""
    path = Path(output_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them.")
    kind = run_kind(path)
    if resume:
        if kind == "finished":
            raise FileExistsError(f"--resume: the run in {str(path)!r} already finished (metrics.json is written and "
                                  "its checkpoints are gone); nothing to continue. Pass --overwrite to train it again "
                                  "or choose another --output-dir.")
        if kind != "running":
            raise FileNotFoundError(f"--resume was given but {str(path)!r} holds no dmil run to continue (no "
                                    f"{RUN_MARKER} or checkpoints); expected the --output-dir of an interrupted run.")
    elif kind == "foreign":
        raise FileExistsError(f"output folder {str(path)!r} is not empty and was not written by dmil (no {RUN_MARKER} "
                              "or metrics.json); refusing to write into or delete it. Choose another --output-dir.")
    elif kind != "empty" and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} is not empty; pass --overwrite to replace it or --resume "
                              "to continue it.")
    return kind


def _data_summary(dsd) -> dict:
    return {name: {"rows": len(split), "fingerprint": getattr(split, "_fingerprint", None)}
            for name, split in dsd.items()}


def check_resume_matches(output_dir: Path, settings: RunSettings, data: dict) -> None:
    """Refuse to resume with settings or data that differ from the interrupted run's (unless told to)."""
    marker = _read_json(output_dir / RUN_MARKER)
    if not isinstance(marker, dict):
        logger.warning("Resume: %s has no %s (written by an older dmil_hf), so its settings cannot be compared.",
                       output_dir, RUN_MARKER)
        return
    now = {k: v for k, v in json.loads(json.dumps(asdict(settings), default=str)).items() if k in RESUME_KEYS}
    before = marker.get("settings", {})
    # A setting the interrupted run's marker lacks (written before the setting existed) had its default.
    defaults = json.loads(json.dumps(asdict(RunSettings()), default=str))
    before = {k: before.get(k, defaults.get(k)) for k in RESUME_KEYS}
    differences = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS if before.get(k) != now.get(k)]
    old_data = marker.get("data", {})
    for name, info in data.items():
        old = old_data.get(name, {})
        if old.get("rows") != info["rows"]:
            differences.append(f"{name} rows: {old.get('rows')} -> {info['rows']}")
        elif old.get("fingerprint") != info["fingerprint"]:
            differences.append(f"{name} data: changed (fingerprint {old.get('fingerprint')} -> {info['fingerprint']})")
    if differences and not settings.resume_with_changes:
        raise ValueError(f"--resume: the settings differ from the interrupted run in {str(output_dir)!r} ("
                         f"{'; '.join(differences)}), so its finished stages and checkpoints would be mixed with the "
                         "new ones. Resume with the same settings, or pass --resume-with-changes to continue anyway.")
    if differences:
        logger.warning("Resume with changed settings (--resume-with-changes): %s", "; ".join(differences))


def write_run_marker(output_dir: Path, settings: RunSettings, data: dict, **state) -> None:
    marker = _read_json(output_dir / RUN_MARKER)
    marker = marker if isinstance(marker, dict) else {}
    marker.update(package="dmil_hf", settings=json.loads(json.dumps(
        {k: v for k, v in asdict(settings).items() if k in RESUME_KEYS}, default=str)), data=data, **state)
    tmp = output_dir / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(output_dir / RUN_MARKER)


# What a run folder holds besides the files its marker lists (written before the list exists, or by `dmil evaluate`).
RUN_ENTRIES = (RUN_MARKER, "checkpoints", "adapters", "final", "metrics.json", "interaction_profile.json",
               "interaction_weights.png", TRAIN_LOG)


def _remove_run(path: Path) -> None:
    """Delete the run in `path`. With a marker that lists the run's files, only those (and the run's own folders and
    `eval_*.json` reports) go, and anything else, the user's, stays with a warning; a run written before the list
    existed is removed whole."""
    marker = _read_json(path / RUN_MARKER)
    listed = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(listed, list):
        shutil.rmtree(path)
        return
    ours = set(listed) | set(RUN_ENTRIES)
    kept = []
    for entry in path.iterdir():
        if entry.name in ours or (entry.name.startswith("eval_") and entry.suffix == ".json"):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            kept.append(entry.name)
    if kept:
        logger.warning("--overwrite: kept %s in %s: dmil did not write them.", sorted(kept), path)


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, kind: str | None = None) -> Path:
    """Make `output_dir` ready to train into; an earlier run there is deleted only with `overwrite` and only when it
    is recognisably a dmil run (`check_output_dir` decides, and refuses everything else)."""
    path = Path(output_dir)
    kind = kind or check_output_dir(path, resume, overwrite)
    if overwrite and kind in ("running", "finished"):
        _remove_run(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class _RunClock:
    """Counts training time across sessions: each checkpoint save records the seconds spent so far, so a resumed run
    adds its own time to the time the interrupted sessions spent up to their last saved checkpoint."""

    def __init__(self, output_dir: Path, settings: RunSettings, data: dict, before: float):
        self.output_dir, self.settings, self.data, self.before = output_dir, settings, data, before
        self.start = time.perf_counter()

    def session(self) -> float:
        return time.perf_counter() - self.start

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class RunClockCallback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    write_run_marker(clock.output_dir, clock.settings, clock.data, status="running",
                                     train_seconds_saved=clock.before + clock.session())

        return RunClockCallback()


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
    from transformers import AutoModel

    from . import DmilConfig
    from .methods import build_model
    from .pretrained import resolve_pretrained

    configs, kwargs = build_config(settings, schema, processor)
    towers = {}
    for modality, source in settings.pretrained.items():
        tower = AutoModel.from_pretrained(resolve_pretrained(source))
        towers[modality] = tower.get_encoder() if getattr(tower.config, "is_encoder_decoder", False) else tower
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


def evaluate_model(model, processor, split, modalities=None) -> tuple[dict, dict]:
    """Evaluate a model on a raw split in the dataset schema; returns (report, predictions)."""
    from .preprocess import encode_split

    modalities = modalities or model.config.modalities
    present = [m for m in modalities if m in model.config.modalities]
    return evaluate_encoded(model, encode_split(split, processor, present), split)


def evaluate_encoded(model, encoded, split) -> tuple[dict, dict]:
    """Evaluate a model on `encoded`, the encoding of the raw `split` (which gives the labels and interaction
    types); returns (report, predictions)."""
    predictions = predict(model, encoded)
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
    from .preprocess import build_processor, encode_dataset
    from .training import TrainLogCallback, apply_lora, merge_lora, push_trained_model, save_lora_adapters, train_staged

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
    data = _data_summary(dsd)
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
    if settings.lora:
        apply_lora(model)
    # Everything is checked: only now may an earlier run in output_dir go. Every process checked the folder before
    # the main one writes into it (otherwise another process could find the new run there and refuse it).
    state.wait_for_everyone()
    before = 0.0
    if state.is_main_process:
        prepare_output_dir(output_dir, settings.resume, settings.overwrite, kind)
        foreign = {p.name for p in output_dir.iterdir()} - set(RUN_ENTRIES)  # kept by --overwrite: not ours to list
        marker = _read_json(output_dir / RUN_MARKER) if settings.resume else None
        before = float(marker.get("train_seconds_saved", 0.0)) if isinstance(marker, dict) else 0.0
        sessions = (int(marker.get("sessions", 1)) + 1) if isinstance(marker, dict) else 1
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
    clock = _RunClock(output_dir, settings, data, before)
    records = train_staged(
        model, args, encoded["train"], encoded["validation"],
        compute_metrics=make_compute_metrics(validation_interactions),
        resume=settings.resume, metric="mse" if regression else "accuracy", greater_is_better=not regression,
        callbacks=[clock.callback(), TrainLogCallback(output_dir / TRAIN_LOG)], embedding_cache=settings.embedding_cache,
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
    metrics["validation"], _ = evaluate_encoded(model, encoded["validation"], dsd["validation"])
    metrics["test"], predictions = evaluate_encoded(model, encoded["test"], dsd["test"])
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


__all__ = ["RUN_MARKER", "RunSettings", "check_label_coverage", "check_output_dir",
           "check_settings", "evaluate_encoded", "evaluate_model", "interaction_profile", "predict", "run_training", "test_report"]
