"""Degraded copies of a split: one modality lost, replaced, blanked or corrupted, at a level.

Each degradation is a `Degradation` (a kind and a level) in `DEGRADATIONS`, applied by `degrade_split`:

- `missing`: the column is dropped (with `audio_sampling_rate` for audio). `encode_split` then produces no input for
  that modality and the model treats it as absent.
- `noise`: the column is replaced by noise of the same shape and type: uniform random pixels, white noise with each
  clip's RMS level, text of the same number of words drawn from the split's own vocabulary, Gaussian vectors with each
  feature dimension's mean and std. The model still sees the modality, but it carries nothing about the label.
- `partial` at level `l` in (0, 1): signal and that noise mixed, `(1 - l) * x + l * noise` (text: each word replaced
  by a random one with probability `l`); level 1 is `noise`.
- `blank`: present but empty: an all-zero vector, a black image, a silent clip, an empty string.
- natural corruptions of raw inputs: `blur` (Gaussian, sigma = `level` pixels) and `occlusion` (a black square over
  `level` of the image's area) for images, `background` (low-frequency noise at `level` dB SNR) for audio,
  `word_dropout` (each word dropped with probability `level`) for text.

`missing`, `noise` and `blank` remove what the modality says about the label (`removes_information`): the benchmark's
attainable level applies to them. Training corruption (`dmil_hf.data.corruption`) uses the `TRAINING_KINDS` only by
default; `blank` and the natural corruptions are held out (`held_out`): no method sees them in training.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict, Image
from PIL import Image as PILImage

from ..configuration_dmil import TOWERS, column_of
from .schema import inspect_dataset

# Kinds `dmil_hf.data.add_training_corruption` can apply; `TRAINING_KINDS` (below) are those it applies by default:
# every other kind is held out of training.
CORRUPTION_KINDS = ("noise", "partial", "blank")
# Kinds after which the modality says nothing about the label.
INFORMATION_REMOVING_KINDS = ("missing", "noise", "blank")
# Which modality columns each kind applies to (`None`: every modality).
_KIND_COLUMNS = {"missing": None, "noise": None, "partial": None, "blank": None, "blur": ("image",),
                 "occlusion": ("image",), "background": ("audio",), "word_dropout": ("text",)}


@dataclass(frozen=True)
class Degradation:
    """One way to degrade a modality: a `kind` of `_KIND_COLUMNS` and its `level` (see the module docstring)."""

    kind: str
    level: float = 1.0

    @property
    def name(self) -> str:
        """The set name's prefix: `noise`, `partial50`, `blur1.5`, `background0db`, ..."""
        if self.kind == "partial":
            return f"partial{round(100 * self.level)}"
        if self.kind == "background":
            return f"background{self.level:g}db"
        if self.kind in ("occlusion", "word_dropout"):
            return f"{self.kind}{round(100 * self.level)}"
        if self.kind == "blur":
            return f"blur{self.level:g}"
        return self.kind

    @property
    def removes_information(self) -> bool:
        return self.kind in INFORMATION_REMOVING_KINDS

    @property
    def held_out(self) -> bool:
        """Used by no method in training."""
        return self.kind not in TRAINING_KINDS and self.kind != "missing"

    def applies_to(self, modality: str) -> bool:
        columns = _KIND_COLUMNS[self.kind]
        return columns is None or column_of(modality) in columns


# The degradations of the evaluation sets (`degraded_test_sets`), in report order.
DEGRADATIONS = (
    Degradation("missing"), Degradation("noise"), Degradation("blank"),
    Degradation("partial", 0.25), Degradation("partial", 0.5), Degradation("partial", 0.75),
    Degradation("blur", 1.5), Degradation("occlusion", 0.4), Degradation("background", 5.0),
    Degradation("background", 0.0), Degradation("word_dropout", 0.5),
)
# The degradations of `add_training_corruption`'s copies, drawn with equal probability (noise twice as often as each
# partial level). The evaluation's partial levels (0.25, 0.5, 0.75) lie between them.
TRAINING_DEGRADATIONS = (Degradation("partial", 0.4), Degradation("partial", 0.7), Degradation("noise"),
                         Degradation("noise"))
TRAINING_KINDS = tuple(dict.fromkeys(d.kind for d in TRAINING_DEGRADATIONS))
MODES = ("noise", "missing")  # the kinds of the original benchmark, kept as the default of `dmil evaluate`


def parse_degraded_name(name: str) -> tuple[Degradation, str]:
    """`"partial50_text"` -> `(Degradation("partial", 0.5), "text")`: the inverse of the names of
    [`degraded_test_sets`]."""
    for degradation in DEGRADATIONS:
        prefix = degradation.name + "_"
        if name.startswith(prefix):
            return degradation, name[len(prefix):]
    match = re.match(r"^(partial|occlusion|word_dropout)(\d+)_(.+)$", name) or re.match(
        r"^(blur)([0-9.]+)_(.+)$", name) or re.match(r"^(background)(-?[0-9.]+)db_(.+)$", name)
    if match is None:
        raise ValueError(f"{name!r} is not a degraded-set name such as 'noise_text' or 'partial50_vision'.")
    kind, level, modality = match.groups()
    level = float(level) / 100 if kind in ("partial", "occlusion", "word_dropout") else float(level)
    return Degradation(kind, level), modality


def _column(dataset: Dataset, modality: str) -> str:
    column = column_of(modality)
    if column not in dataset.column_names:
        raise ValueError(f"modality {modality!r} (column {column!r}) is not in this split; its columns are "
                         f"{dataset.column_names}.")
    return column


# --- one value at a time ----------------------------------------------------------------------------------------
def _as_pixels(image) -> tuple[np.ndarray, str | None]:
    """uint8 pixels of an image (PIL or array) and the PIL mode to give back (None: give back an array)."""
    if isinstance(image, PILImage.Image):
        mode = image.mode if image.mode in ("L", "RGB", "RGBA") else "RGB"
        return np.asarray(image.convert(mode)), mode
    return np.asarray(image, dtype=np.uint8), None


def _as_image(pixels: np.ndarray, mode: str | None):
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return PILImage.fromarray(pixels, mode=mode) if mode is not None else pixels


def _degrade_image(image, degradation: Degradation, rng):
    from scipy.ndimage import gaussian_filter

    pixels, mode = _as_pixels(image)
    kind, level = degradation.kind, degradation.level
    if kind == "blank":
        return _as_image(np.zeros_like(pixels), mode)
    if kind in ("noise", "partial"):
        noise = rng.integers(0, 256, size=pixels.shape, dtype=np.uint8)
        return _as_image(noise if level == 1.0 else (1.0 - level) * pixels + level * noise.astype(np.float64), mode)
    if kind == "blur":
        sigma = (level, level) + (0,) * (pixels.ndim - 2)
        return _as_image(gaussian_filter(pixels.astype(np.float64), sigma=sigma), mode)
    # occlusion: a black square covering `level` of the area, at a random place
    height, width = pixels.shape[:2]
    side = max(1, int(round(np.sqrt(level * height * width))))
    top, left = rng.integers(0, max(1, height - side + 1)), rng.integers(0, max(1, width - side + 1))
    out = pixels.copy()
    out[top:top + side, left:left + side] = 0
    return _as_image(out, mode)


def _degrade_audio(clip, degradation: Degradation, rng):
    from scipy.signal import lfilter

    clip = np.asarray(clip, dtype=np.float32)
    kind, level = degradation.kind, degradation.level
    if kind == "blank":
        return np.zeros_like(clip)
    rms = float(np.sqrt(np.mean(clip.astype(np.float64) ** 2))) if clip.size else 0.0
    if kind in ("noise", "partial"):
        noise = rng.normal(0.0, rms or 0.05, clip.shape)
        return np.clip(noise if level == 1.0 else (1.0 - level) * clip + level * noise, -1, 1).astype(np.float32)
    # background: low-frequency (one-pole low-pass) noise, `level` dB below the clip's own RMS
    noise = lfilter([1.0], [1.0, -0.97], rng.normal(0.0, 1.0, clip.shape))
    noise *= (rms or 0.05) / max(float(np.sqrt(np.mean(noise ** 2))), 1e-12) * 10 ** (-level / 20)
    return np.clip(clip + noise, -1, 1).astype(np.float32)


def _degrade_text(text: str, degradation: Degradation, rng, vocabulary) -> str:
    kind, level = degradation.kind, degradation.level
    if kind == "blank":
        return ""
    words = text.split()
    if kind == "noise":
        return " ".join(rng.choice(vocabulary, size=max(1, len(words))))
    if kind == "partial":
        return " ".join(str(rng.choice(vocabulary)) if rng.random() < level else w for w in words)
    return " ".join(w for w in words if rng.random() >= level)  # word_dropout


def _noise_batch(column, degradation, seed, vocabulary, mean, std):
    def replace(batch, indices):
        # `noise` keeps the stream of the package's first degraded sets (keyed by the column alone).
        key = column if degradation.kind == "noise" else f"{column}:{degradation.name}"
        rng = np.random.default_rng([seed, zlib.crc32(key.encode()), indices[0]])
        values = batch[column]
        if column == "text":
            out = [_degrade_text(text, degradation, rng, vocabulary) for text in values]
        elif column == "image":
            out = [_degrade_image(image, degradation, rng) for image in values]
        elif column == "audio":
            out = [_degrade_audio(clip, degradation, rng) for clip in values]
        else:
            values = np.asarray(values, dtype=np.float64)
            if degradation.kind == "blank":
                out = np.zeros_like(values)
            else:
                noise = mean + std * rng.normal(size=values.shape)
                level = degradation.level
                out = noise if level == 1.0 else (1.0 - level) * values + level * noise
            out = list(out.astype(np.float32))
        return {column: out}

    return replace


def degrade_split(dataset: Dataset, modality: str, mode: str | Degradation, seed: int = 0,
                  level: float | None = None) -> Dataset:
    """A copy of `dataset` with `modality` (`text`, `vision`, `audio` or a feature modality name) degraded:
    `mode` is a [`Degradation`] or a kind name (`"noise"`, `"missing"`, `"blank"`, `"partial"` with `level`, ...; see
    the module docstring). Deterministic in `seed`."""
    degradation = mode if isinstance(mode, Degradation) else None
    if degradation is None:
        if mode not in _KIND_COLUMNS:
            raise ValueError(f"mode must be one of {list(_KIND_COLUMNS)}; got {mode!r}.")
        default = {"partial": 0.5, "blur": 1.5, "occlusion": 0.4, "background": 5.0, "word_dropout": 0.5}
        degradation = Degradation(mode, float(level if level is not None else default.get(mode, 1.0)))
    if degradation.kind == "partial" and not 0.0 < degradation.level <= 1.0:
        raise ValueError(f"a partial degradation's level must lie in (0, 1]; got {degradation.level}.")
    column = _column(dataset, modality)
    if not degradation.applies_to(modality):
        raise ValueError(f"{degradation.kind!r} applies to the columns {list(_KIND_COLUMNS[degradation.kind])}; "
                         f"modality {modality!r} is column {column!r}.")
    if degradation.kind == "missing":
        rate_column = TOWERS[modality].rate_column if modality in TOWERS else None
        return dataset.remove_columns([column] + ([rate_column] if rate_column else []))
    vocabulary = mean = std = None
    if column == "text":
        vocabulary = sorted({word for text in dataset["text"] for word in text.split()}) or ["_"]
    elif modality not in TOWERS:
        values = np.asarray(dataset[column], dtype=np.float64)
        mean, std = values.mean(0), values.std(0)
    if isinstance(dataset.features[column], Image) and not dataset.features[column].decode:
        dataset = dataset.cast_column(column, Image())  # the noise needs each image's size and channels
    features = dataset.features.copy()
    return dataset.map(_noise_batch(column, degradation, seed, vocabulary, mean, std), batched=True, batch_size=64,
                       with_indices=True, features=features, desc=f"{degradation.name}_{modality}",
                       load_from_cache_file=False)


def degraded_test_sets(dsd: DatasetDict, seed: int = 0, degradations=DEGRADATIONS, split: str = "test",
                       modalities=None) -> dict[str, Dataset]:
    """`<degradation name>_<m>` copies of `split` (e.g. `noise_text`, `partial50_vision`, `blank_a`) for every
    modality `m` of `modalities` (default: the dataset's) and every degradation of `degradations` that applies to it
    (`missing` only where another of those modalities remains); [`parse_degraded_name`] reads a name back."""
    modalities = list(modalities) if modalities is not None else inspect_dataset(dsd).modalities
    out = {}
    for degradation in degradations:
        for modality in modalities:
            if not degradation.applies_to(modality):
                continue
            if degradation.kind == "missing" and len(modalities) < 2:
                continue
            out[f"{degradation.name}_{modality}"] = degrade_split(dsd[split], modality, degradation, seed=seed)
    return out


def attainable_accuracy(clean_by_type: dict, shares: dict, modality: str, num_labels: int,
                        metadata: dict | None = None, chance: dict | None = None,
                        num_modalities: int | None = None) -> float:
    """
    What a method can keep when `modality` says nothing any more (missing, noised, blank): every interaction type
    keeps its clean accuracy `clean_by_type[t]`, except that no type can beat the Bayes accuracy with that modality
    missing (`metadata["bayes_accuracy_degraded"]["missing_<modality>"][t]`, which the built-in datasets store).
    Without that metadata, the types that need the modality (`unique_<modality>`; `synergy` with two modalities) fall
    to chance: `chance[t]` (the best constant guess on that type's rows, see `degradation_report`), else
    `1 / num_labels`. With three or more modalities and no metadata nothing says which of them synergy needs: leave
    `synergy` out of `shares` (as `degradation_report` does). `shares`: each type's share of the evaluated split
    (normalised here). `num_modalities`: the dataset's (default: the number of `unique_*` types). The **degradation
    gap** is this minus the accuracy on the degraded set.
    """
    bayes = ((metadata or {}).get("bayes_accuracy_degraded") or {}).get(f"missing_{modality}")
    if num_modalities is None:
        num_modalities = sum(1 for t in clean_by_type if t.startswith("unique_"))
    total = 0.0
    for kind, share in shares.items():
        accuracy = clean_by_type[kind]
        if bayes is not None and kind in bayes:
            accuracy = min(accuracy, bayes[kind])
        elif bayes is None and (kind == f"unique_{modality}" or (kind == "synergy" and num_modalities == 2)):
            accuracy = min(accuracy, (chance or {}).get(kind, 1.0 / num_labels))
        total += share * accuracy
    return total / sum(shares.values())


def _best_constant_guess(labels, interactions) -> dict | None:
    """Per interaction type, the accuracy of always answering that type's most frequent label (None: labels that are
    not one integer per row, e.g. multi-label)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return None
    out = {}
    for kind in np.unique(interactions):
        rows = labels[interactions == kind]
        out[str(kind)] = float(np.bincount(rows).max() / len(rows))
    return out


def degradation_report(evaluate, dsd: DatasetDict, split: str = "test", num_labels: int | None = None,
                       modalities=None, seed: int = 0, clean: dict | None = None, degradations=DEGRADATIONS) -> dict:
    """
    Accuracy on every degraded copy of `split` (`degraded_test_sets`), and for the kinds that remove a modality's
    information, the attainable level and the gap (see [`attainable_accuracy`]) where the split has interaction
    types. `evaluate(split) -> report` gives a report with `accuracy` (and `by_interaction`), e.g.
    `lambda s: dmil_hf.experiment.evaluate_model(model, processor, s)[0]`. `modalities`: the ones to degrade (default:
    all of the dataset's). `clean`: the report on the clean split where the caller has it (otherwise evaluated here).
    `degradations`: the ones to measure (default: all of `DEGRADATIONS`).

    Without the built-in datasets' Bayes metadata (a dataset of your own), a type that needs the lost modality falls
    to the best constant guess on its rows (the most frequent label among them: with imbalanced labels that is more
    than `1 / num_labels`), and with three or more modalities the `synergy` rows are left out of the gap, on both
    sides (nothing says which modalities synergy needs): `gap_excludes` then names them, and `attainable` and `gap`
    are over the other rows.
    """
    from .schema import dataset_metadata

    clean = clean if clean is not None else evaluate(dsd[split])
    out = {"clean": clean["accuracy"], "accuracy": {}, "attainable": {}, "gap": {}}
    interactions = dsd[split]["interaction"] if "interaction" in dsd[split].column_names else None
    metadata = dataset_metadata(dsd)
    shares = chance = num_modalities = None
    if interactions is not None and clean.get("by_interaction") and num_labels:
        values = np.asarray(interactions)
        shares = {t: float((values == t).mean()) for t in clean["by_interaction"]}
        if not metadata.get("bayes_accuracy_degraded"):  # a dataset of one's own
            num_modalities = len(inspect_dataset(dsd).modalities)
            chance = _best_constant_guess(dsd[split]["labels"], values)
            if num_modalities > 2 and "synergy" in shares:
                shares.pop("synergy")
                out["gap_excludes"] = ["synergy"]
    for name, degraded in degraded_test_sets(dsd, seed=seed, degradations=degradations, split=split,
                                             modalities=modalities).items():
        degradation, modality = parse_degraded_name(name)
        report = evaluate(degraded)
        out["accuracy"][name] = report["accuracy"]
        if shares and degradation.removes_information:
            attainable = attainable_accuracy(clean["by_interaction"], shares, modality, num_labels, metadata, chance,
                                             num_modalities)
            accuracy = report["accuracy"]
            if "gap_excludes" in out:
                by_type = report["by_interaction"]
                accuracy = sum(share * by_type[t] for t, share in shares.items()) / sum(shares.values())
            out["attainable"][name] = attainable
            out["gap"][name] = attainable - accuracy
    out["held_out_kinds"] = sorted({d.kind for d in DEGRADATIONS if d.held_out})
    return out


__all__ = ["CORRUPTION_KINDS", "DEGRADATIONS", "Degradation", "INFORMATION_REMOVING_KINDS", "MODES",
           "TRAINING_DEGRADATIONS", "TRAINING_KINDS", "attainable_accuracy",
           "degradation_report", "degrade_split",
           "degraded_test_sets", "parse_degraded_name"]
