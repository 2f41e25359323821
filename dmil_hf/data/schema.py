"""The `dmil_hf` dataset schema: validation (`inspect_dataset`), loading by name or path, stored metadata.

A dataset is a `datasets.DatasetDict` with splits exactly `train`, `validation`, `test` and these columns:

- `labels`: integer class ids >= 0 (int Value or ClassLabel);
- `interaction` (optional): `redundancy`, `unique_<modality>` or `synergy` per sample (used for per-type reports);
- at least two modality columns: `text` (string) -> modality `text`; `image` (datasets `Image`, or uint8 arrays
  H x W or H x W x C) -> modality `vision`; `audio` (float waveform) with `audio_sampling_rate` (int) -> modality
  `audio`; `<name>_features` (numeric vector of one width everywhere) -> feature modality `<name>` (a Python
  identifier other than text / vision / audio).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Image, LargeList, List, Value, load_from_disk
from datasets.features import Array2D, Array3D

from ..configuration_dmil import FEATURES, TOWERS, column_of
from ._build import SPLITS, metadata_of

_TOWER_COLUMNS = [tower.column for tower in TOWERS.values()]
_RATE_COLUMNS = {tower.column: tower.rate_column for tower in TOWERS.values() if tower.rate_column}
_SUFFIX = f"_{FEATURES}"
_EXPECTED_COLUMNS = ", ".join(["labels", "interaction"]
                              + [t.column + (f" (+{t.rate_column})" if t.rate_column else "") for t in TOWERS.values()]
                              + [f"<name>{_SUFFIX}"])
BUILTIN_DATASETS = ("synthetic", "digits")


@dataclass(frozen=True)
class DatasetSchema:
    """What `inspect_dataset` found: modalities in canonical order (text, vision, audio, then feature modalities in
    column order), feature widths, number of classes, and the interaction types present."""

    modalities: tuple[str, ...]
    feature_dims: dict[str, int] = field(default_factory=dict)
    num_labels: int = 0
    has_interaction: bool = False
    interactions: tuple[str, ...] = ()
    label_names: tuple[str, ...] | None = None

    def column_for(self, modality: str) -> str:
        """The column holding `modality`: text -> text, vision -> image, audio -> audio, <name> -> <name>_features."""
        if modality not in self.modalities:
            raise ValueError(f"modality {modality!r} is not in this dataset; it has {list(self.modalities)}.")
        return column_of(modality)


def _is_int(feature) -> bool:
    return isinstance(feature, Value) and (feature.dtype.startswith("int") or feature.dtype.startswith("uint"))


def _is_number(feature) -> bool:
    return isinstance(feature, Value) and (_is_int(feature) or feature.dtype.startswith("float"))


def _sequence(feature):
    """(inner feature, fixed length or None) for List/LargeList/Sequence features, else None."""
    if isinstance(feature, (List, LargeList)):
        length = getattr(feature, "length", -1)
        return feature.feature, (None if length in (-1, None) else length)
    return None


def _arrow_column(split: Dataset, column: str):
    """The column's Arrow values for the rows the split shows (respecting `select`/`filter` index mappings)."""
    values = split.data.column(column)
    indices = getattr(split, "_indices", None)
    return values if indices is None else pc.take(values, indices.column(0))


def _check_image(feature, split: str) -> None:
    if isinstance(feature, Image):
        return
    if isinstance(feature, (Array2D, Array3D)):
        ok = feature.dtype.startswith(("uint", "int"))
    else:
        depth, inner = 0, feature
        while _sequence(inner) is not None:
            inner, depth = _sequence(inner)[0], depth + 1
        ok = depth in (2, 3) and _is_int(inner)
    if not ok:
        raise ValueError(f"column 'image' in split {split!r} has type {feature}; expected a datasets Image feature or "
                         "integer (uint8, 0..255) arrays of shape H x W or H x W x C.")


def _check_types(split_name: str, split: Dataset, columns: list) -> None:
    features = split.features
    for column in columns:
        feature = features[column]
        if column == "text" and not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"column 'text' in split {split_name!r} has type {feature}; expected strings.")
        if column == "text" and _arrow_column(split, "text").null_count:
            array = _arrow_column(split, "text")
            rows = [i for i, v in enumerate(array.is_null().to_pylist()) if v]
            raise ValueError(f"column 'text' in split {split_name!r} holds None in {len(rows)} row(s) (first: "
                             f"{rows[:5]}); expected a string in every row (use '' for an empty text).")
        if column == "image":
            _check_image(feature, split_name)
        if column == "audio":
            inner = _sequence(feature)
            if inner is None or not (isinstance(inner[0], Value) and inner[0].dtype.startswith("float")):
                raise ValueError(f"column 'audio' in split {split_name!r} has type {feature}; expected float waveforms "
                                 "(a sequence of float32 samples per row, in [-1, 1]).")
        if column == "audio_sampling_rate" and not _is_int(feature):
            raise ValueError(f"column 'audio_sampling_rate' in split {split_name!r} has type {feature}; "
                             "expected integer Hz.")
        if column == "interaction" and not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"column 'interaction' in split {split_name!r} has type {feature}; expected strings.")
        if column.endswith("_features"):
            inner = _sequence(feature)
            if inner is None or not _is_number(inner[0]):
                raise ValueError(f"column {column!r} in split {split_name!r} has type {feature}; expected a numeric "
                                 "(float32) vector per row.")


def _feature_width(split_name: str, split: Dataset, column: str) -> int:
    fixed = _sequence(split.features[column])[1]
    if fixed is not None:
        return fixed
    array = _arrow_column(split, column)
    if array.null_count:
        raise ValueError(f"column {column!r} in split {split_name!r} has missing (null) rows.")
    lengths = pc.min_max(pc.list_value_length(array))
    low, high = lengths["min"].as_py(), lengths["max"].as_py()
    if low != high:
        raise ValueError(f"column {column!r} in split {split_name!r} has vectors of different widths ({low}..{high}); "
                         "every row of a feature column must have the same width.")
    return low


def _check_labels(dsd: DatasetDict) -> tuple[int, tuple | None]:
    highest, names = -1, None
    for split_name, split in dsd.items():
        feature = split.features["labels"]
        if isinstance(feature, ClassLabel):
            names = tuple(feature.names)
        elif not _is_int(feature):
            raise ValueError(f"column 'labels' in split {split_name!r} has type {feature}; expected integer class ids "
                             "(int64 or ClassLabel; string labels convert with dsd.class_encode_column('labels')).")
        array = _arrow_column(split, "labels")
        if array.null_count:
            raise ValueError(f"column 'labels' in split {split_name!r} has missing (null) values.")
        if len(split) == 0:
            raise ValueError(f"split {split_name!r} is empty.")
        bounds = pc.min_max(array)
        if bounds["min"].as_py() < 0:
            raise ValueError(f"column 'labels' in split {split_name!r} has negative values (min "
                             f"{bounds['min'].as_py()}); expected class ids 0..num_labels-1.")
        highest = max(highest, bounds["max"].as_py())
    num_labels = len(names) if names is not None else highest + 1
    if num_labels < 2:
        raise ValueError("column 'labels' takes a single value; a classification dataset needs at least two classes.")
    if highest >= num_labels:
        raise ValueError(f"column 'labels' has class id {highest} but the ClassLabel names only {num_labels} classes.")
    return num_labels, names


# The schemas of the last datasets inspected, by their splits' fingerprints (which `datasets` changes with every
# transform): loading a dataset and then training or evaluating on it checks it once.
_INSPECTED: dict[tuple, DatasetSchema] = {}
_INSPECTED_KEPT = 8


def inspect_dataset(dsd) -> DatasetSchema:
    """Validate `dsd` against the schema (see the module docstring) and describe it; raises ValueError naming the
    offending split or column. A dataset already inspected (same splits, same fingerprints) is not read again."""
    key = tuple((name, getattr(split, "_fingerprint", None)) for name, split in dsd.items()) \
        if isinstance(dsd, DatasetDict) else ()
    cacheable = bool(key) and all(fingerprint for _, fingerprint in key)
    if cacheable and key in _INSPECTED:
        return _INSPECTED[key]
    schema = _inspect(dsd)
    if cacheable:
        _INSPECTED[key] = schema
        while len(_INSPECTED) > _INSPECTED_KEPT:
            _INSPECTED.pop(next(iter(_INSPECTED)))
    return schema


def _inspect(dsd) -> DatasetSchema:
    if not isinstance(dsd, DatasetDict):
        raise ValueError(f"expected a datasets.DatasetDict with splits {list(SPLITS)}; got {type(dsd).__name__}.")
    missing, extra = [s for s in SPLITS if s not in dsd], sorted(set(dsd) - set(SPLITS))
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise ValueError(f"dataset splits must be exactly {list(SPLITS)}; {' and '.join(parts)} (got {sorted(dsd)}). "
                         "Rename or split them, e.g. DatasetDict(train=..., validation=..., test=...).")
    columns = list(dsd["train"].column_names)
    for name in SPLITS[1:]:
        if set(dsd[name].column_names) != set(columns):
            raise ValueError(f"split {name!r} has columns {sorted(dsd[name].column_names)} but split 'train' has "
                             f"{sorted(columns)}; every split needs the same columns.")
    for column in columns:
        if column in ("labels", "interaction", *_RATE_COLUMNS.values(), *_TOWER_COLUMNS):
            continue
        feature_name = column[: -len(_SUFFIX)] if column.endswith(_SUFFIX) else None
        if feature_name is None:
            raise ValueError(f"column {column!r} is not recognised; expected one of: {_EXPECTED_COLUMNS}.")
        if not feature_name.isidentifier() or feature_name in TOWERS:
            raise ValueError(f"column {column!r}: a feature modality name must be a Python identifier other than "
                             f"{sorted(TOWERS)} (use the {'/'.join(_TOWER_COLUMNS)} columns for those).")
    if "labels" not in columns:
        raise ValueError(f"column 'labels' is missing (columns: {columns}); add integer class ids as 'labels'.")
    for column, rate_column in _RATE_COLUMNS.items():
        if column in columns and rate_column not in columns:
            raise ValueError(f"column {column!r} needs a column {rate_column!r} (int Hz per row).")
        if rate_column in columns and column not in columns:
            raise ValueError(f"column {rate_column!r} is present without a column {column!r}.")
    modalities = [m for m, tower in TOWERS.items() if tower.column in columns]
    modalities += [c[: -len(_SUFFIX)] for c in columns if c.endswith(_SUFFIX)]
    if len(modalities) < 2:
        raise ValueError(f"a multimodal dataset needs at least two modality columns; found {modalities or 'none'} "
                         f"(columns: {columns}). Modality columns: text, image, audio, <name>_features.")
    num_labels, label_names = _check_labels(dsd)
    feature_dims = {}
    for split_name in SPLITS:
        split = dsd[split_name]
        _check_types(split_name, split, columns)
        if "audio_sampling_rate" in columns and pc.min(_arrow_column(split, "audio_sampling_rate")).as_py() <= 0:
            raise ValueError(f"column 'audio_sampling_rate' in split {split_name!r} has non-positive rates.")
        for m in (m for m in modalities if m not in TOWERS):
            width = _feature_width(split_name, split, column_of(m))
            if feature_dims.setdefault(m, width) != width:
                raise ValueError(f"column '{m}_features' is {width} wide in split {split_name!r} but {feature_dims[m]} "
                                 "wide in split 'train'; feature widths must agree across splits.")
    interactions = ()
    if "interaction" in columns:
        allowed = ["redundancy"] + [f"unique_{m}" for m in modalities] + ["synergy"]
        found = set()
        for split_name in SPLITS:
            array = _arrow_column(dsd[split_name], "interaction")
            if array.null_count:
                raise ValueError(f"column 'interaction' in split {split_name!r} has missing (null) values.")
            values = set(pc.unique(array).to_pylist())
            unknown = sorted(values - set(allowed))
            if unknown:
                raise ValueError(f"column 'interaction' in split {split_name!r} has values {unknown}; expected "
                                 f"{allowed}.")
            found |= values
        interactions = tuple(k for k in allowed if k in found)
    if label_names is None:  # the built-in datasets store their class names in the metadata
        stored = dataset_metadata(dsd).get("label_names")
        if isinstance(stored, list) and len(stored) == num_labels:
            label_names = tuple(str(name) for name in stored)
    return DatasetSchema(modalities=tuple(modalities), feature_dims=feature_dims, num_labels=num_labels,
                         has_interaction="interaction" in columns, interactions=interactions, label_names=label_names)


def load_dataset_from_name_or_path(name_or_path, **builder_kwargs) -> DatasetDict:
    """A built-in dataset by name (`synthetic`, `digits`; `builder_kwargs` go to its builder) or a DatasetDict saved
    with `save_to_disk` at a path; validated with `inspect_dataset`."""
    name = os.fspath(name_or_path)
    if name in BUILTIN_DATASETS:
        from .digits import make_digits
        from .synthetic import make_synthetic

        builder = {"synthetic": make_synthetic, "digits": make_digits}[name]
        try:
            inspect.signature(builder).bind(**builder_kwargs)
        except TypeError as error:
            raise ValueError(f"bad arguments for the built-in dataset {name!r}: {error}; it takes "
                             f"{list(inspect.signature(builder).parameters)}.") from error
        dsd = builder(**builder_kwargs)
    else:
        if builder_kwargs:
            raise ValueError(f"dataset arguments {sorted(builder_kwargs)} only apply to the built-in datasets "
                             f"{list(BUILTIN_DATASETS)}, not to a saved dataset ({name!r}).")
        if not os.path.exists(name):
            raise FileNotFoundError(f"dataset {name!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                                    "nor an existing folder written by DatasetDict.save_to_disk.")
        _check_saved_splits_not_empty(name)
        try:
            dsd = load_from_disk(name)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ValueError(f"could not load a dataset from {name!r} with datasets.load_from_disk: {error}") from error
        if not isinstance(dsd, DatasetDict):
            raise ValueError(f"{name!r} holds a single Dataset; save a DatasetDict with splits {list(SPLITS)} instead "
                             "(DatasetDict(train=..., validation=..., test=...).save_to_disk(path)).")
    inspect_dataset(dsd)
    return dsd


def _check_saved_splits_not_empty(path: str) -> None:
    """A split saved with no rows has no Arrow file, and `load_from_disk` fails on it with an IndexError: say so."""
    import json

    index = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(index):
        return
    try:
        splits = json.loads(open(index).read()).get("splits", [])
        for split in splits:
            state = os.path.join(path, split, "state.json")
            if os.path.isfile(state) and not json.loads(open(state).read()).get("_data_files"):
                raise ValueError(f"split {split!r} of the dataset at {path!r} is empty (it was saved with no rows); "
                                 "every split (train, validation, test) needs at least one row.")
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # not our concern here: load_from_disk reports unreadable folders below


def dataset_metadata(dsd) -> dict:
    """Metadata stored by the built-in builders (e.g. `bayes_accuracy`), read from the train split (or from a
    single Dataset); {} when there is none."""
    if isinstance(dsd, DatasetDict):
        dsd = dsd["train"] if "train" in dsd else next(iter(dsd.values()), None)
    return metadata_of(dsd) if isinstance(dsd, Dataset) else {}


__all__ = ["DatasetSchema", "dataset_metadata", "inspect_dataset", "load_dataset_from_name_or_path"]
