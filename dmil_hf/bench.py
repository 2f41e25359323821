"""The comparison benchmark: every method on every dataset configuration over several seeds, per kind of sample.

Each training run is a `dmil train` subprocess (so its peak memory is its own), then this process loads the saved
model and measures the test set, the degraded test sets, the per-sample interaction readout and inference latency.
An ablation trains DMIL with the paper's settings and with each of the package's deviations from them. Writes
`results.json` (per-seed numbers), `results.md` (mean ± std tables and the targets) and PNG plots.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .methods import METHODS

# Benchmark configurations: name -> (built-in dataset, builder arguments). `synthetic3` tries the defaults beyond two
# modalities and equal shares: three feature modalities and a synergy-heavy mixture.
CONFIGURATIONS = {
    "synthetic": ("synthetic", {}),
    "synthetic3": ("synthetic", {"num_modalities": 3, "mixture": {
        "redundancy": 0.175, "unique_a": 0.175, "unique_b": 0.175, "unique_c": 0.175, "synergy": 0.3}}),
    "digits": ("digits", {}),
    "digits-pretrained": ("digits", {}),
}
# `dmil train` options of a configuration beyond its data. `digits-pretrained` is `make run`'s setting: frozen, cached
# MiniLM text and Whisper tiny.en audio towers, a tiny vision transformer trained from scratch, DMIL's stages 4/4/32
# (the baselines train as long: 40 epochs).
CONFIGURATION_OPTIONS = {
    "digits-pretrained": ("--text-model", "all-minilm-l6-v2", "--audio-model", "whisper-tiny.en",
                          "--freeze-towers", "text", "audio", "--stage-epochs", "4", "4", "32"),
}
DATASETS = tuple(CONFIGURATIONS)


def _rows() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The benchmark's rows: row name -> (registered method, extra `dmil train` options). Every method as its
    defaults train it, and after joint `joint_robust`: joint learning with the robustness training DMIL gets by
    default (corrupted training rows and modality dropout at DMIL's rates), what a practitioner would do instead."""
    from .configuration_dmil import DEFAULT_MODALITY_DROPOUT

    robust = ("--train-corruption", str(METHODS["dmil"].train_corruption),
              "--modality-dropout", str(DEFAULT_MODALITY_DROPOUT["dmil"]))
    rows = {}
    for method in METHODS:
        rows[method] = (method, ())
        if method == "joint":
            rows["joint_robust"] = ("joint", robust)
    return rows


ROWS = _rows()
# Sizes and epochs per mode. Full: the defaults of `dmil train`; quick: a smoke-sized version of the same runs.
PRESETS = {
    "full": {"dataset_kwargs": {}, "stage_epochs": None, "seeds": 3, "ablation_seeds": 1},
    "quick": {"dataset_kwargs": {"synthetic": {"num_samples": 800}, "digits": {"num_samples": 600}},
              "stage_epochs": (3, 2, 2), "seeds": 1, "ablation_seeds": 1},
}
# The DMIL paper's choices where the package's defaults differ (each a `DmilConfig` field). The ablation trains the
# paper's settings, then the paper's settings with one deviation each, then the defaults.
PAPER_SETTINGS = {"synergy_source": "irrelevant", "synergy_structure": "joint", "synergy_gate_penalty": 0.0,
                  "synergy_subset_weight": 0.0,
                  "tower_pooling": "auto", "stage1_synergy_weight": 0.0, "reliability_gating": False,
                  "reliability_marginalization": False, "reliability_tower_gradient": 0.0,
                  "reliability_partial_target": "level", "reliability_refit_steps": 0, "modality_dropout": 0.0,
                  "frozen_tower_dropout": 0.1, "partial_corruption_weight": 0.0, "train_corruption": 0.0}
# Settings of the ablation that are `dmil train` options rather than `DmilConfig` fields.
RUN_OPTIONS = {"train_corruption": "--train-corruption"}
# Fields that act on some modalities only: their variants are trained only on configurations that have them.
FIELD_SCOPES = {"tower_pooling": "towers", "reliability_tower_gradient": "towers",
                "frozen_tower_dropout": "frozen towers", "partial_corruption_weight": "frozen towers",
                "reliability_refit_steps": "feature vectors or frozen towers"}


def acts_on(field: str, configuration: str) -> bool:
    """Whether changing `field` can change a DMIL run of `configuration` (see `FIELD_SCOPES`)."""
    features = CONFIGURATIONS[configuration][0] == "synthetic"
    frozen = "--freeze-towers" in CONFIGURATION_OPTIONS.get(configuration, ())
    return {"towers": not features, "feature vectors": features, "frozen towers": frozen,
            "feature vectors or frozen towers": features or frozen}.get(FIELD_SCOPES.get(field), True)


def ablation_variants() -> dict[str, dict]:
    """Variant name -> `DmilConfig` overrides: `paper`, `paper + <field>` for each deviating field, `defaults`."""
    from .configuration_dmil import DEFAULT_FROZEN_TOWER_PARTIAL_WEIGHT, DmilConfig

    config = DmilConfig(feature_modalities={"a": 1, "b": 1})
    defaults = {k: getattr(config, k) for k in PAPER_SETTINGS if k not in RUN_OPTIONS}
    defaults.update(modality_dropout=config.modality_dropout_probability,
                    frozen_tower_dropout=config.frozen_tower_dropout_probability,
                    partial_corruption_weight=DEFAULT_FROZEN_TOWER_PARTIAL_WEIGHT["dmil"],
                    train_corruption=METHODS["dmil"].train_corruption)
    variants = {"paper": dict(PAPER_SETTINGS)}
    for field, value in defaults.items():
        if value != PAPER_SETTINGS[field]:
            variants[f"paper + {field}={value}"] = {**PAPER_SETTINGS, field: value}
    variants["defaults"] = {}
    return variants


def dataset_arguments(configuration: str, preset: dict) -> tuple[str, dict]:
    """The built-in dataset of a configuration and its builder arguments (the preset's sizes on top)."""
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"unknown benchmark configuration {configuration!r}; expected some of {list(DATASETS)}.")
    dataset, kwargs = CONFIGURATIONS[configuration]
    return dataset, {**kwargs, **preset["dataset_kwargs"].get(dataset, {}), **preset["dataset_kwargs"].get(
        configuration, {})}


def train_command(configuration, row, seed, run_dir, preset, towers="tiny", overrides=None,
                  python=sys.executable) -> list[str]:
    """The `dmil train` command line of one run: a row of [`ROWS`] on a configuration (its data, then its
    [`CONFIGURATION_OPTIONS`]), with the ablation's `overrides` and the preset's epochs last (they win)."""
    dataset, kwargs = dataset_arguments(configuration, preset)
    method, options = ROWS[row]
    cmd = [python, "-m", "dmil_hf.cli", "train", "--dataset", dataset, "--method", method, "--seed", str(seed),
           "--output-dir", str(run_dir), "--overwrite", "--towers", towers,
           *CONFIGURATION_OPTIONS.get(configuration, ()), *options]
    for key, value in kwargs.items():
        cmd += ["--dataset-arg", f"{key}={json.dumps(value)}"]
    for key, value in (overrides or {}).items():
        cmd += [RUN_OPTIONS[key], str(value)] if key in RUN_OPTIONS else ["--config-arg", f"{key}={json.dumps(value)}"]
    if preset["stage_epochs"]:
        cmd += ["--stage-epochs", *map(str, preset["stage_epochs"])]
        if method != "dmil":
            cmd += ["--epochs", str(sum(preset["stage_epochs"]))]
    return cmd


def _train(configuration, row, seed, run_dir, preset, towers, threads=None, overrides=None) -> dict:
    """Run [`train_command`] in a subprocess (with `threads` torch threads); returns its metrics plus the
    subprocess's peak resident memory."""
    from .scale import run_measured

    cmd = train_command(configuration, row, seed, run_dir, preset, towers, overrides)
    env = dict(os.environ, TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    status, peak_mb, _ = run_measured(cmd, Path(run_dir).with_suffix(".log"), env)
    if status != 0:
        raise RuntimeError(f"training {row} on {configuration} (seed {seed}) failed; see "
                           f"{Path(run_dir).with_suffix('.log')}")
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    metrics["peak_memory_mb"] = peak_mb
    return metrics


@functools.lru_cache(maxsize=2)
def _load_dataset(dataset: str, kwargs_json: str):
    """Each built-in dataset is built once for all the runs measured on it."""
    from .data import load_dataset_from_name_or_path

    return load_dataset_from_name_or_path(dataset, **json.loads(kwargs_json))


def _configuration_dataset(configuration, preset):
    dataset, kwargs = dataset_arguments(configuration, preset)
    return _load_dataset(dataset, json.dumps(kwargs, sort_keys=True))


def readout_agreement(weights: np.ndarray, interactions, component_names) -> dict:
    """How well per-sample weights over `component_names` name each sample's ground-truth interaction type:
    `match` (the largest weight is the true type's component, over all samples) and `profile` (mean weight of each
    component per type, as in `interaction_profile.json`)."""
    from .experiment import interaction_profile

    interactions = np.asarray(list(interactions))
    names = np.asarray(component_names)
    return {"match": float((names[weights.argmax(1)] == interactions).mean()),
            "profile": interaction_profile(weights, interactions, component_names)}


def reference_readout(configuration, preset, seed: int = 0) -> dict:
    """The label-aware reference: `dmil_hf.interactions.per_sample_interactions` (out-of-fold MLPs on the default
    modality representations of the test split, with the true labels), read as weights like a model's readout."""
    from .data import inspect_dataset
    from .interactions import per_sample_interactions
    from .interactions.dataset import modality_arrays

    dsd = _configuration_dataset(configuration, preset)
    test = dsd["test"]
    modalities = inspect_dataset(dsd).modalities
    per_sample = per_sample_interactions(modality_arrays(test, modalities, seed=seed), np.asarray(test["labels"]),
                                         seed=seed)
    names = ["redundancy"] + [f"unique_{m}" for m in modalities] + ["synergy"]
    values = np.stack([per_sample[n] for n in names], 1)
    total = values.sum(1, keepdims=True)
    weights = np.where(total > 0, values / np.maximum(total, 1e-12), 1.0 / len(names))
    return readout_agreement(weights, test["interaction"], names)


def _measure(run_dir, configuration, preset) -> dict:
    """Degraded-set accuracies, inference latency per batch of 64, parameter count, interaction readout (and for
    DMIL the gate's weights) against the true interaction types."""
    import torch
    from transformers import AutoProcessor

    from .data import dataset_metadata
    from .data.degrade import degradation_report
    from .experiment import evaluate_model
    from .loading import load_model
    from .preprocess import encode_split

    model = load_model(run_dir).eval()
    dsd = _configuration_dataset(configuration, preset)
    towers = any(model.config.tower_config(m) is not None for m in model.config.modalities)
    processor = AutoProcessor.from_pretrained(run_dir) if towers else None
    out = {"degraded": {}, "parameters": sum(p.numel() for p in model.parameters()),
           "num_labels": model.config.num_labels}
    clean, predictions = evaluate_model(model, processor, dsd["test"])
    report = degradation_report(lambda split: evaluate_model(model, processor, split)[0], dsd,
                                num_labels=model.config.num_labels, clean=clean)
    out["degraded"], out["degradation_gap"] = report["accuracy"], report["gap"]
    for key, name in (("interaction_weights", "readout"), ("gate_weights", "gate")):
        if key in predictions and "interaction" in dsd["test"].column_names:
            out[name] = readout_agreement(predictions[key], dsd["test"]["interaction"], model.config.component_names)
    batch = encode_split(dsd["test"].select(range(min(64, len(dsd["test"])))), processor, model.config.modalities)
    rows = batch[:]  # a dict of tensors (indexing a column alone gives a lazy `Column`, not a tensor)
    inputs = {c: rows[c] for c in batch.column_names if c != "labels"}
    times = []
    with torch.no_grad():
        for i in range(7):
            start = time.perf_counter()
            model(**inputs)
            if i >= 2:
                times.append(time.perf_counter() - start)
    out["latency_ms_per_batch64"] = 1000 * statistics.median(times)
    out["bayes_accuracy"] = dataset_metadata(dsd).get("bayes_accuracy", {})
    if "readout" in out:
        out["interaction_profile"] = out["readout"]["profile"]
    return out


def run_benchmark(output_dir, datasets=DATASETS, methods=tuple(ROWS), seeds=None, quick=False, towers="tiny",
                  jobs: int = 1, ablation: bool = True) -> dict:
    """
    Train and measure every (configuration, row of [`ROWS`] in `methods`, seed), and with `ablation` every DMIL
    variant of [`ablation_variants`] on every configuration (the preset's `ablation_seeds` seeds); write
    results.json, results.md and plots to `output_dir`.

    `jobs` training runs go at once, each with an equal share of the CPU cores as torch threads (tiny towers use
    two cores poorly, so two one-thread runs finish sooner than two two-thread runs in turn; their training times
    are then times under that shared load). The measurements (degraded sets, readout, latency) run afterwards, one at
    a time.
    """
    preset = PRESETS["quick" if quick else "full"]
    seeds = seeds or preset["seeds"]
    unknown = set(methods) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {list(ROWS)}.")
    for configuration in datasets:
        dataset_arguments(configuration, preset)  # unknown names fail before any training
    if int(jobs) < 1:
        raise ValueError(f"jobs must be at least 1; got {jobs}.")
    output_dir = Path(output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // int(jobs)) if int(jobs) > 1 else None
    grid = [(d, m, s, None) for d in datasets for s in range(seeds) for m in methods]
    variants = ablation_variants() if ablation else {}
    def applies(configuration, variant):
        """A variant is trained only where one of the fields it changes acts (`acts_on`)."""
        changed = {k for k, v in variants[variant].items() if PAPER_SETTINGS.get(k) != v}
        return not changed or any(acts_on(field, configuration) for field in changed)

    grid += [(d, "dmil", s, v) for d in datasets for v in variants if v != "defaults" and applies(d, v)
             for s in range(preset["ablation_seeds"])]

    def run_dir(job):
        dataset, method, seed, variant = job
        suffix = "" if variant is None else "-" + "".join(c if c.isalnum() else "_" for c in variant)
        return output_dir / "runs" / f"{dataset}-{method}{suffix}-seed{seed}"

    with ThreadPoolExecutor(int(jobs)) as pool:
        futures = {job: pool.submit(_train, *job[:3], run_dir(job), preset, towers, threads,
                                    variants.get(job[3])) for job in grid}
        trained = {job: future.result() for job, future in tqdm(futures.items(), desc="training")}
    runs, ablation_runs = [], []
    for job in tqdm(grid, desc="measuring"):
        dataset, method, seed, variant = job
        metrics = trained[job]
        record = {"dataset": dataset, "method": method, "seed": seed, "test": metrics["test"],
                  "train_seconds": metrics["train_seconds"], "peak_memory_mb": metrics["peak_memory_mb"]}
        record.update(_measure(run_dir(job), dataset, preset))
        if variant is None:
            runs.append(record)
        if variant is not None or (method == "dmil" and "defaults" in variants and seed < preset["ablation_seeds"]):
            ablation_runs.append({**record, "variant": variant or "defaults"})
    reference = {}
    for dataset in datasets:
        if "interaction" in _configuration_dataset(dataset, preset)["test"].column_names:
            reference[dataset] = reference_readout(dataset, preset)
    mode = "quick" if quick else "full"
    results = {"mode": mode, "towers": towers, "seeds": seeds, "jobs": int(jobs), "runs": runs,
               "summary": summarize(runs), "reference_readout": reference,
               "ablation": {"variants": variants, "seeds": preset["ablation_seeds"], "runs": ablation_runs,
                            "summary": summarize_ablation(ablation_runs)} if variants else None}
    return _write_results(results, output_dir)


def _write_results(results: dict, output_dir: Path) -> dict:
    """`results.json`, `results.md` (tables and targets) and the plots in `output_dir`."""
    from .bench_report import render_markdown, render_plots

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(render_markdown(results))
    render_plots(results, output_dir)
    return results


def combine_results(paths, output_dir) -> dict:
    """
    One benchmark from several runs' `results.json` (e.g. DMIL trained again after a change of its defaults, beside
    the baselines of an earlier run): every run of every file, where two files hold the same (configuration, row,
    seed) the later file's; summarised and written to `output_dir` as [`run_benchmark`] writes them. The
    ablation is not combined (it stays in each file). Each file's `runs` are kept as they were measured, so say which
    code made each when quoting the tables.
    """
    runs, reference, sources = {}, {}, []
    for path in paths:
        path = Path(path)
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read benchmark results {str(path)!r}: {err}") from None
        if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
            raise ValueError(f"{str(path)!r} is not a `dmil bench` results.json (it has no list of runs).")
        for run in results["runs"]:
            runs[(run["dataset"], run["method"], run["seed"])] = run
        reference.update(results.get("reference_readout") or {})
        sources.append({"path": str(path), "mode": results.get("mode"), "towers": results.get("towers")})
    if len({(s["mode"], s["towers"]) for s in sources}) > 1:
        raise ValueError(f"the results to combine were measured in different modes or with different towers: "
                         f"{sources}; combine runs of one kind only.")
    combined = list(runs.values())
    results = {"mode": sources[0]["mode"], "towers": sources[0]["towers"],
               "seeds": max(r["seed"] for r in combined) + 1 if combined else 0, "jobs": None, "runs": combined,
               "summary": summarize(combined), "reference_readout": reference, "ablation": None,
               "combined_from": sources}
    return _write_results(results, Path(output_dir))


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)) if len(values) > 1 else 0.0}


def summarize(runs) -> dict:
    """Mean ± std over seeds, per dataset and method, of every measured number."""
    summary = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        summary[dataset] = {}
        for method in [m for m in ROWS if any(r["method"] == m and r["dataset"] == dataset for r in runs)]:
            rows = [r for r in runs if r["dataset"] == dataset and r["method"] == method]
            kinds = sorted({k for r in rows for k in r["test"].get("by_interaction", {})})
            degraded = sorted({k for r in rows for k in r["degraded"]})
            entry = {
                "accuracy": _mean_std([r["test"]["accuracy"] for r in rows]),
                "by_interaction": {k: _mean_std([r["test"]["by_interaction"].get(k) for r in rows]) for k in kinds},
                "degraded": {k: _mean_std([r["degraded"].get(k) for r in rows]) for k in degraded},
                "degradation_gap": {k: _mean_std([r.get("degradation_gap", {}).get(k) for r in rows])
                                    for k in sorted({k for r in rows for k in r.get("degradation_gap", {})})},
                "train_seconds": _mean_std([r["train_seconds"] for r in rows]),
                "latency_ms_per_batch64": _mean_std([r["latency_ms_per_batch64"] for r in rows]),
                "peak_memory_mb": _mean_std([r["peak_memory_mb"] for r in rows]),
                "parameters": rows[0]["parameters"],
                "num_labels": rows[0]["num_labels"],
                "bayes_accuracy": rows[0]["bayes_accuracy"],
            }
            # The readout's profile is the method's `interaction_profile`; the gate's is kept beside it.
            for name, profile_key in (("readout", "interaction_profile"), ("gate", "gate_profile")):
                measured = [r[name] for r in rows if name in r]
                if measured:
                    entry[f"{name}_match"] = _mean_std([m["match"] for m in measured])
                    entry[profile_key] = _mean_profile([m["profile"] for m in measured])
            summary[dataset][method] = entry
    return summary


def _mean_profile(profiles):
    return {kind: {c: float(np.mean([p[kind][c] for p in profiles])) for c in profiles[0][kind]}
            for kind in profiles[0]}


def summarize_ablation(runs) -> dict:
    """Per configuration and variant: mean over seeds of overall and synergy accuracy, the mean over degraded test
    sets, and the readout's and the gate's per-sample match rates."""
    summary = {}
    for record in runs:
        summary.setdefault(record["dataset"], {}).setdefault(record["variant"], []).append(record)
    out = {}
    for dataset, by_variant in summary.items():
        out[dataset] = {}
        for variant, rows in by_variant.items():
            out[dataset][variant] = {
                "accuracy": _mean_std([r["test"]["accuracy"] for r in rows]),
                "synergy": _mean_std([r["test"].get("by_interaction", {}).get("synergy") for r in rows]),
                "degraded_mean": _mean_std([float(np.mean(list(r["degraded"].values()))) for r in rows
                                            if r["degraded"]]),
                "readout_match": _mean_std([r["readout"]["match"] for r in rows if "readout" in r]),
                "gate_match": _mean_std([r["gate"]["match"] for r in rows if "gate" in r]),
            }
    return out


__all__ = ["CONFIGURATIONS", "CONFIGURATION_OPTIONS", "DATASETS", "PAPER_SETTINGS", "PRESETS", "ROWS",
           "ablation_variants", "readout_agreement", "reference_readout", "run_benchmark", "summarize",
           "summarize_ablation", "train_command"]
