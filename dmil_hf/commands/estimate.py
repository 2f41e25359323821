"""`dmil estimate`: how a dataset's modalities interact about its labels (redundancy, uniqueness, synergy, in bits).

Writes three files:

- `--output FILE.json`: the dataset-level estimate, `{"units": "bits", "redundancy", "unique": {modality: ...},
  "synergy", "total", "pairs": [...], "method": {...}}` (k-means codes + exact BROJA PID, see
  `dmil_hf.interactions.estimate_interactions`; `method` records the split, the representation of each modality and
  every setting);
- `FILE.per_sample.jsonl`: one JSON object per row of the split, in row order: `index` (row in its split), `split`,
  `label`, `interaction` (the ground truth, when the dataset has it), the pointwise `redundancy`, `unique_<m>`,
  `synergy` (and the raw `information_<m>`, `joint_information`) from `per_sample_interactions`, and with `--model`
  the model's per-sample interaction weights `weight_<component>` (when it has them; they sum to one);
- `FILE.per_sample.png`: box plots of the per-sample components, one panel per ground-truth interaction type.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

SPLIT_CHOICES_HELP = "train, validation, test, or all (the three concatenated)"


def add_parser(subparsers):
    p = subparsers.add_parser("estimate", help="estimate redundancy / uniqueness / synergy of a dataset (bits)")
    p.add_argument("--dataset", required=True, help="built-in name (synthetic, digits) or a save_to_disk folder")
    p.add_argument("--output", required=True,
                   help="JSON file to write; FILE.per_sample.jsonl and FILE.per_sample.png go beside it")
    p.add_argument("--split", default="test", help=f"which split to estimate on: {SPLIT_CHOICES_HELP}")
    p.add_argument("--model", default=None,
                   help="folder of a trained model: use its projected tower embeddings as the modality "
                        "representations, and add its per-sample interaction weights")
    p.add_argument("--modalities", nargs="+", default=None, metavar="M",
                   help="modalities to use (default: all the dataset's); at least two")
    p.add_argument("--n-clusters", type=int, default=10,
                   help="k-means clusters per modality (dataset-level estimate); keep N well above "
                        "n_clusters^2 x classes (a warning says when it is not)")
    p.add_argument("--seed", type=int, default=0, help="k-means, reductions, folds and classifiers")
    p.add_argument("--dims", type=int, default=32,
                   help="width of the default text / image / audio representations (TF-IDF SVD / PCA)")
    p.add_argument("--per-sample-classifier", default="mlp", choices=["mlp", "logistic"],
                   help="unimodal classifiers of the per-sample estimate (the joint one is always an MLP); logistic "
                        "is several times faster but, when a modality's signal is non-linear, credits what the "
                        "unimodal models miss to synergy")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the per-sample estimate")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights; only if you trust them")
    p.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="argument for a built-in dataset builder, e.g. num_samples=600 or 'mixture={\"synergy\": 1}'")
    p.set_defaults(func=run)
    return p


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


def run(args) -> int:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from ..data import inspect_dataset, load_dataset_from_name_or_path
    from ..interactions import estimate_interactions, per_sample_interactions, plot_per_sample
    from ..interactions.dataset import modality_arrays_with_info
    from ..run_settings import parse_key_values

    if args.n_clusters < 2:
        raise ValueError(f"--n-clusters must be at least 2; got {args.n_clusters}.")
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2; got {args.folds}.")
    if args.dims < 1:
        raise ValueError(f"--dims must be at least 1; got {args.dims}.")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a folder; give a file name such as estimate.json.")
    timings = {}
    start = time.perf_counter()
    dsd = load_dataset_from_name_or_path(args.dataset, **parse_key_values(args.dataset_arg))
    schema = inspect_dataset(dsd)
    split, split_names, row_indices = select_split(dsd, args.split)
    modalities = choose_modalities(schema, args.modalities)
    timings["load"] = time.perf_counter() - start

    model = processor = None
    if args.model is not None:
        from transformers import AutoProcessor

        from ..loading import load_model

        model = load_model(args.model, allow_pickle=args.allow_pickle)
        if any(m in ("text", "vision", "audio") and m in model.config.modalities for m in modalities):
            processor = AutoProcessor.from_pretrained(args.model)

    start = time.perf_counter()
    arrays, representation = modality_arrays_with_info(split, modalities, model, processor, dims=args.dims,
                                                       seed=args.seed)
    timings["representation"] = time.perf_counter() - start
    labels = np.asarray(split["labels"])

    # The classifiers and the PID solves multiply small matrices: multi-threaded BLAS only adds overhead there, and
    # stalls badly on a busy machine (8x slower MLP fits measured on 2 busy cores).
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = estimate_interactions(arrays, labels, n_clusters=args.n_clusters, seed=args.seed)
        timings["dataset_level"] = time.perf_counter() - start
        start = time.perf_counter()
        per_sample = per_sample_interactions(arrays, labels, seed=args.seed, unimodal=args.per_sample_classifier,
                                             n_folds=args.folds)
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
        predictions = predict(model, encode_split(split, processor, shared))
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
    interactions = list(split["interaction"]) if schema.has_interaction else None

    method = dict(result.pop("method"))
    method.update({
        "dataset": str(args.dataset),
        "dataset_args": parse_key_values(args.dataset_arg),
        "split": args.split,
        "modalities": modalities,
        "representation": {
            "source": "model" if model is not None else "default",
            "model": str(args.model) if args.model is not None else None,
            "dims": args.dims,
            "per_modality": representation,
        },
        "per_sample": {
            "estimator": "pointwise minimum-mutual-information PID of out-of-fold classifier probabilities",
            "unimodal_classifier": args.per_sample_classifier,
            "joint_classifier": "mlp",
            "folds": args.folds,
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
                    title=f"Per-sample interaction estimates ({Path(str(args.dataset)).name}, {args.split})")

    by_type = None
    if interactions is not None:
        shown = {k: v for k, v in columns.items() if k in components or k.startswith("weight_")}
        by_type = per_type_means(shown, interactions)
    header = (f"Interaction estimate (bits) of {Path(str(args.dataset)).name}, split {args.split}, "
              f"n={len(labels)}, modalities {modalities}, n_clusters={args.n_clusters}, "
              f"representation: {method['representation']['source']}")
    print(format_table(report, by_type, header))
    print(f"wrote {output}, {per_sample_path}, {plot_path}")
    return 0
