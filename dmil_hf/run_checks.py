"""The checks a training run makes before anything is loaded, trained or deleted: its settings (`check_settings`),
its pretrained tower sources, `--freeze-towers` against the dataset's modalities, and the classes the train split
shows. Each raises an error that names the bad value and what was expected. `dmil_hf.experiment.run_training` calls
them; the checks of the output folder live in `dmil_hf.run_folder`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .configuration_dmil import TOWERS
from .methods import METHODS
from .run_settings import RunSettings


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


__all__ = ["check_freeze_towers", "check_label_coverage", "check_pretrained_source", "check_settings"]
