"""A dataset's interaction estimate end to end, as `dmil estimate` runs it: load the dataset (and optionally a trained
model for the representations and per-sample interaction weights), estimate redundancy, uniqueness and synergy for
the whole split ([`estimate_interactions`]) and for every sample ([`per_sample_interactions`]), and write three files:

- `output` (JSON): the dataset-level estimate, `{"units": "bits", "redundancy", "unique": {modality: ...},
  "synergy", "total", "pairs": [...], "method": {...}}` (k-means codes + exact BROJA PID; `method` records the split,
  the representation of each modality and every setting);
- `<output stem>.per_sample.jsonl`: one JSON object per row of the split, in row order: `index` (row in its split),
  `split`, `label`, `interaction` (the ground truth, when the dataset has it), the pointwise `redundancy`,
  `unique_<m>`, `synergy` (and the raw `information_<m>`, `joint_information`), and with a model its per-sample
  interaction weights `weight_<component>` (when it has them; they sum to one);
- `<output stem>.per_sample.png`: box plots of the per-sample components, one panel per ground-truth interaction type.

Example:
```python
from dmil_hf.interactions.dataset_estimate import estimate_dataset

result = estimate_dataset("synthetic", "runs/est.json", dataset_kwargs={"num_samples": 600})
print(result["table"])
```
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

from ..configuration_dmil import TOWERS

logger = logging.getLogger(__name__)


def beside(output: Path, suffix: str) -> Path:
    """`est.json` -> `est<suffix>` in the same folder."""
    return output.with_name(output.stem + suffix)


def select_split(dsd, name: str):
    """`(split, split name per row, index within that split per row)`; `all` concatenates the three splits."""
    from datasets import concatenate_datasets

    if name == "all":
        parts = list(dsd.values())
        names = [n for n, part in dsd.items() for _ in range(len(part))]
        indices = [i for part in parts for i in range(len(part))]
        return concatenate_datasets(parts), names, indices
    if name not in dsd:
        raise ValueError(f"split {name!r} is not in the dataset; it has {list(dsd)} (or use 'all').")
    return dsd[name], [name] * len(dsd[name]), list(range(len(dsd[name])))


def choose_modalities(schema, requested) -> list[str]:
    if requested is None:
        modalities = list(schema.modalities)
    else:
        unknown = [m for m in requested if m not in schema.modalities]
        if unknown:
            raise ValueError(f"modalities {unknown} are not in the dataset; it has {list(schema.modalities)}.")
        modalities = list(dict.fromkeys(requested))
    if len(modalities) < 2:
        raise ValueError(f"interaction estimates need at least two modalities; got {modalities} "
                         f"(the dataset has {list(schema.modalities)}).")
    return modalities


def _number(value):
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def per_type_means(columns: dict, groups) -> dict[str, dict[str, float]]:
    """Mean of every column per ground-truth group (plus `n`)."""
    import numpy as np

    groups = np.asarray(groups)
    table = {}
    for kind in dict.fromkeys(groups.tolist()):
        rows = groups == kind
        table[kind] = {"n": int(rows.sum()), **{k: float(np.mean(v[rows])) for k, v in columns.items()}}
    return table


def format_table(result: dict, by_type: dict | None, header: str) -> str:
    lines = [header]
    names = ["redundancy"] + [f"unique_{m}" for m in result["unique"]] + ["synergy", "total"]
    values = [result["redundancy"], *result["unique"].values(), result["synergy"], result["total"]]
    width = max(len(n) for n in names)
    lines += [f"  {n:<{width}}  {v:8.4f}" for n, v in zip(names, values)]
    if by_type:
        columns = [c for c in next(iter(by_type.values())) if c != "n"]
        kind_width = max(12, *(len(k) for k in by_type))
        shown = [c.replace("unique_", "U_").replace("weight_", "w_") for c in columns]
        col_width = max(8, *(len(c) for c in shown))
        lines.append("Per-sample means by ground-truth interaction (pointwise bits; w_* = model interaction weights):")
        lines.append(f"  {'type':<{kind_width}} {'n':>6}  " + "  ".join(f"{c:>{col_width}}" for c in shown))
        for kind, row in by_type.items():
            lines.append(f"  {kind:<{kind_width}} {row['n']:>6}  "
                         + "  ".join(f"{row[c]:>{col_width}.4f}" for c in columns))
    return "\n".join(lines)


def estimate_dataset(dataset: str, output: str | Path, *, split: str = "test", model: str | None = None,
                     modalities=None, n_clusters: int = 10, seed: int = 0, dims: int = 32,
                     per_sample_classifier: str = "mlp", folds: int = 5, allow_pickle: bool = False,
                     dataset_kwargs: dict | None = None) -> dict:
    """Estimate the interactions of `split` of `dataset` (a built-in name or a `save_to_disk` folder; `dataset_kwargs`
    go to a built-in builder) and write the three files (module docstring). `model`: folder of a trained model whose
    projected tower embeddings represent the modalities, and whose per-sample interaction weights are added.
    `modalities`: at least two (default: all the dataset's). Returns `{"report": <the JSON written>, "by_type": <per-
    sample means by ground-truth interaction, or None>, "table": <both as text>, "files": [the three paths]}`."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from ..data import inspect_dataset, load_dataset_from_name_or_path
    from . import estimate_interactions, per_sample_interactions, plot_per_sample
    from .dataset import modality_arrays_with_info

    dataset_kwargs = dict(dataset_kwargs or {})
    if n_clusters < 2:
        raise ValueError(f"--n-clusters must be at least 2; got {n_clusters}.")
    if folds < 2:
        raise ValueError(f"--folds must be at least 2; got {folds}.")
    if dims < 1:
        raise ValueError(f"--dims must be at least 1; got {dims}.")
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a folder; give a file name such as estimate.json.")
    timings = {}
    start = time.perf_counter()
    dsd = load_dataset_from_name_or_path(dataset, **dataset_kwargs)
    schema = inspect_dataset(dsd)
    rows, split_names, row_indices = select_split(dsd, split)
    modalities = choose_modalities(schema, modalities)
    timings["load"] = time.perf_counter() - start

    model_dir, model, processor = model, None, None
    if model_dir is not None:
        from transformers import AutoProcessor

        from ..loading import load_model

        model = load_model(model_dir, allow_pickle=allow_pickle)
        if any(m in TOWERS and m in model.config.modalities for m in modalities):
            processor = AutoProcessor.from_pretrained(model_dir)

    start = time.perf_counter()
    arrays, representation = modality_arrays_with_info(rows, modalities, model, processor, dims=dims, seed=seed)
    timings["representation"] = time.perf_counter() - start
    labels = np.asarray(rows["labels"])

    # The classifiers and the PID solves multiply small matrices: multi-threaded BLAS only adds overhead there, and
    # stalls badly on a busy machine (8x slower MLP fits measured on 2 busy cores).
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = estimate_interactions(arrays, labels, n_clusters=n_clusters, seed=seed)
        timings["dataset_level"] = time.perf_counter() - start
        start = time.perf_counter()
        per_sample = per_sample_interactions(arrays, labels, seed=seed, unimodal=per_sample_classifier, n_folds=folds)
        timings["per_sample"] = time.perf_counter() - start
    messages = list(dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)))
    for message in messages:
        logger.warning(message)

    weights, component_names = None, None
    if model is not None:
        from ..experiment import predict
        from ..preprocess import encode_split

        start = time.perf_counter()
        shared = [m for m in modalities if m in model.config.modalities]
        predictions = predict(model, encode_split(rows, processor, shared))
        if "interaction_weights" in predictions:
            weights = predictions["interaction_weights"]
            component_names = list(model.config.component_names)
        timings["model_weights"] = time.perf_counter() - start

    per_sample_path, plot_path = beside(output, ".per_sample.jsonl"), beside(output, ".per_sample.png")
    components = ["redundancy"] + [f"unique_{m}" for m in modalities] + ["synergy"]
    columns = {name: np.asarray(per_sample[name]) for name in components}
    columns.update({k: np.asarray(v) for k, v in per_sample.items() if k not in columns})
    if weights is not None:
        columns.update({f"weight_{name}": weights[:, k] for k, name in enumerate(component_names)})
    interactions = list(rows["interaction"]) if schema.has_interaction else None

    method = dict(result.pop("method"))
    method.update({
        "dataset": str(dataset),
        "dataset_args": dataset_kwargs,
        "split": split,
        "modalities": modalities,
        "representation": {
            "source": "model" if model is not None else "default",
            "model": str(model_dir) if model_dir is not None else None,
            "dims": dims,
            "per_modality": representation,
        },
        "per_sample": {
            "estimator": "pointwise minimum-mutual-information PID of out-of-fold classifier probabilities",
            "unimodal_classifier": per_sample_classifier,
            "joint_classifier": "mlp",
            "folds": folds,
            "file": per_sample_path.name,
            "plot": plot_path.name,
            "model_weights": component_names is not None,
        },
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "warnings": messages,
    })
    report = {"units": result.pop("units"), "redundancy": result.pop("redundancy"), "unique": result.pop("unique"),
              "synergy": result.pop("synergy"), "total": result.pop("total"), **result, "method": method}

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    with per_sample_path.open("w") as handle:
        for row in range(len(labels)):
            record = {"index": int(row_indices[row]), "split": split_names[row], "label": labels[row].item()}
            if interactions is not None:
                record["interaction"] = interactions[row]
            record.update({k: _number(v[row]) for k, v in columns.items()})
            handle.write(json.dumps(record) + "\n")
    plot_per_sample({k: columns[k] for k in components}, interactions, plot_path,
                    title=f"Per-sample interaction estimates ({Path(str(dataset)).name}, {split})")

    by_type = None
    if interactions is not None:
        shown = {k: v for k, v in columns.items() if k in components or k.startswith("weight_")}
        by_type = per_type_means(shown, interactions)
    header = (f"Interaction estimate (bits) of {Path(str(dataset)).name}, split {split}, "
              f"n={len(labels)}, modalities {modalities}, n_clusters={n_clusters}, "
              f"representation: {method['representation']['source']}")
    return {"report": report, "by_type": by_type, "table": format_table(report, by_type, header),
            "files": [output, per_sample_path, plot_path]}
