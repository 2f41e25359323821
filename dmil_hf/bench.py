"""The comparison benchmark: every method on every dataset over several seeds, per kind of sample.

Each training run is a `dmil train` subprocess (so its peak memory is its own), then this process loads the saved
model and measures the test set, the degraded test sets and inference latency. Writes `results.json` (per-seed
numbers), `results.md` (mean ± std tables and the targets) and PNG plots.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .experiment import METHODS

DATASETS = ("synthetic", "digits")
# Sizes and epochs per mode. Full: the defaults of `dmil train`; quick: a smoke-sized version of the same runs.
PRESETS = {
    "full": {"dataset_kwargs": {"synthetic": {}, "digits": {}}, "stage_epochs": None, "seeds": 3},
    "quick": {"dataset_kwargs": {"synthetic": {"num_samples": 800}, "digits": {"num_samples": 600}},
              "stage_epochs": (3, 2, 2), "seeds": 1},
}


def _train(dataset, method, seed, run_dir, preset, towers, threads=None, python=sys.executable) -> dict:
    """Run `dmil train` in a subprocess (with `threads` torch threads); returns its metrics plus the subprocess's peak
    resident memory."""
    cmd = [python, "-m", "dmil_hf.cli", "train", "--dataset", dataset, "--method", method, "--seed", str(seed),
           "--output-dir", str(run_dir), "--overwrite", "--towers", towers]
    for key, value in preset["dataset_kwargs"].get(dataset, {}).items():
        cmd += ["--dataset-arg", f"{key}={json.dumps(value)}"]
    if preset["stage_epochs"]:
        cmd += ["--stage-epochs", *map(str, preset["stage_epochs"])]
        if method != "dmil":
            cmd += ["--epochs", str(sum(preset["stage_epochs"]))]
    log = open(Path(run_dir).with_suffix(".log"), "w")
    env = dict(os.environ, TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"training {method} on {dataset} (seed {seed}) failed; see {Path(run_dir).with_suffix('.log')}")
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    metrics["peak_memory_mb"] = usage.ru_maxrss / 1024.0  # Linux reports KiB
    return metrics


@functools.lru_cache(maxsize=2)
def _load_dataset(dataset: str, kwargs_json: str):
    """Each built-in dataset is built once for all the runs measured on it."""
    from .data import load_dataset_from_name_or_path

    return load_dataset_from_name_or_path(dataset, **json.loads(kwargs_json))


def _measure(run_dir, dataset, preset) -> dict:
    """Degraded-set accuracies, inference latency per batch of 64, parameter count, interaction profile."""
    import torch
    from transformers import AutoProcessor

    from .data import dataset_metadata, degraded_test_sets
    from .experiment import evaluate_model
    from .loading import load_model
    from .preprocess import encode_split

    model = load_model(run_dir).eval()
    dsd = _load_dataset(dataset, json.dumps(preset["dataset_kwargs"].get(dataset, {}), sort_keys=True))
    towers = any(model.config.tower_config(m) is not None for m in model.config.modalities)
    processor = AutoProcessor.from_pretrained(run_dir) if towers else None
    out = {"degraded": {}, "parameters": sum(p.numel() for p in model.parameters()),
           "num_labels": model.config.num_labels}
    for name, split in degraded_test_sets(dsd).items():
        out["degraded"][name] = evaluate_model(model, processor, split)[0]["accuracy"]
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
    profile = Path(run_dir) / "interaction_profile.json"
    if profile.exists():
        out["interaction_profile"] = json.loads(profile.read_text())
    return out


def run_benchmark(output_dir, datasets=DATASETS, methods=METHODS, seeds=None, quick=False, towers="tiny",
                  jobs: int = 1) -> dict:
    """
    Train and measure every (dataset, method, seed); write results.json, results.md and plots to `output_dir`.

    `jobs` training runs go at once, each with an equal share of the CPU cores as torch threads (tiny towers use
    two cores poorly, so two one-thread runs finish sooner than two two-thread runs in turn; their training times
    are then times under that shared load). The measurements (degraded sets, latency) run afterwards, one at a time.
    """
    preset = PRESETS["quick" if quick else "full"]
    seeds = seeds or preset["seeds"]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {list(METHODS)}.")
    output_dir = Path(output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if int(jobs) < 1:
        raise ValueError(f"jobs must be at least 1; got {jobs}.")
    threads = max(1, (os.cpu_count() or 1) // int(jobs)) if int(jobs) > 1 else None
    grid = [(d, m, s) for d in datasets for s in range(seeds) for m in methods]
    run_dirs = {job: output_dir / "runs" / f"{job[0]}-{job[1]}-seed{job[2]}" for job in grid}
    with ThreadPoolExecutor(int(jobs)) as pool:
        futures = {job: pool.submit(_train, *job, run_dirs[job], preset, towers, threads) for job in grid}
        trained = {job: future.result() for job, future in tqdm(futures.items(), desc="training")}
    runs = []
    for job in tqdm(grid, desc="measuring"):
        dataset, method, seed = job
        metrics = trained[job]
        record = {"dataset": dataset, "method": method, "seed": seed, "test": metrics["test"],
                  "train_seconds": metrics["train_seconds"], "peak_memory_mb": metrics["peak_memory_mb"]}
        record.update(_measure(run_dirs[job], dataset, preset))
        runs.append(record)
    mode = "quick" if quick else "full"
    results = {"mode": mode, "towers": towers, "seeds": seeds, "jobs": int(jobs), "runs": runs,
               "summary": summarize(runs)}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    from .bench_report import render_markdown, render_plots

    (output_dir / "results.md").write_text(render_markdown(results))
    render_plots(results, output_dir)
    return results


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
        for method in [m for m in METHODS if any(r["method"] == m and r["dataset"] == dataset for r in runs)]:
            rows = [r for r in runs if r["dataset"] == dataset and r["method"] == method]
            kinds = sorted({k for r in rows for k in r["test"].get("by_interaction", {})})
            degraded = sorted({k for r in rows for k in r["degraded"]})
            entry = {
                "accuracy": _mean_std([r["test"]["accuracy"] for r in rows]),
                "by_interaction": {k: _mean_std([r["test"]["by_interaction"].get(k) for r in rows]) for k in kinds},
                "degraded": {k: _mean_std([r["degraded"].get(k) for r in rows]) for k in degraded},
                "train_seconds": _mean_std([r["train_seconds"] for r in rows]),
                "latency_ms_per_batch64": _mean_std([r["latency_ms_per_batch64"] for r in rows]),
                "peak_memory_mb": _mean_std([r["peak_memory_mb"] for r in rows]),
                "parameters": rows[0]["parameters"],
                "num_labels": rows[0]["num_labels"],
                "bayes_accuracy": rows[0]["bayes_accuracy"],
            }
            profiles = [r["interaction_profile"] for r in rows if "interaction_profile" in r]
            if profiles:
                entry["interaction_profile"] = {
                    kind: {c: float(np.mean([p[kind][c] for p in profiles])) for c in profiles[0][kind]}
                    for kind in profiles[0]
                }
            summary[dataset][method] = entry
    return summary


__all__ = ["DATASETS", "PRESETS", "run_benchmark", "summarize"]
