"""What a training run costs as the data grows: seconds per epoch and peak resident memory of `dmil train` for each
method on `synthetic`-shaped feature data of several sizes, each size saved with `save_to_disk` (so the rows are
memory-mapped, as a user's saved dataset is) and each run a subprocess of its own (so its peak memory is its own),
one at a time. `dmil profile --scale` runs it.

Example:
```python
from dmil_hf.scale import measure_scale

results = measure_scale([6000, 60000], ["joint", "dmil"], "runs/scale")
results["rss_growth_mb"]["dmil"]  # {"6000->60000": ...}
```
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# One epoch per DMIL stage (three epochs for the baselines): 600,000 rows take minutes per epoch on a CPU, and the
# peak memory of a run does not grow with its epochs.
SCALE_STAGE_EPOCHS = (1, 1, 1)


def run_measured(cmd: list[str], log_path, env: dict | None = None) -> tuple[int, float, float]:
    """Run `cmd` with its output in `log_path`; returns `(exit status, peak resident memory in MB, wall seconds)` of
    that command alone. It is started through `dmil_hf/peak_rss.py`: started straight from this process, Linux would
    count this process's own peak memory as the command's (see that file)."""
    with tempfile.TemporaryDirectory(prefix="dmil-measure-") as folder, open(log_path, "w") as log:
        result = Path(folder) / "usage.json"
        subprocess.run([sys.executable, str(Path(__file__).with_name("peak_rss.py")), str(result), *cmd],
                       stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
        usage = json.loads(result.read_text())
    return usage["status"], usage["peak_rss_mb"], usage["wall_seconds"]


def scale_dataset(num_samples: int, folder) -> Path:
    """`synthetic` with `num_samples` rows (default arguments otherwise), saved to `folder` unless already there."""
    folder = Path(folder)
    if not (folder / "dataset_dict.json").is_file():
        from .data import make_synthetic

        make_synthetic(num_samples=int(num_samples)).save_to_disk(str(folder))
    return folder


def scale_train_command(dataset, method: str, run_dir, threads: int = 1, python: str = sys.executable) -> list[str]:
    """The `dmil train` command of one measurement: `SCALE_STAGE_EPOCHS` (DMIL) or as many epochs (baselines)."""
    epochs = SCALE_STAGE_EPOCHS if method == "dmil" else ()
    cmd = [python, "-m", "dmil_hf.cli", "train", "--dataset", str(dataset), "--method", method, "--output-dir",
           str(run_dir), "--overwrite", "--threads", str(threads)]
    if method == "dmil":
        return cmd + ["--stage-epochs", *map(str, epochs)]
    return cmd + ["--epochs", str(sum(SCALE_STAGE_EPOCHS))]


def measure_scale(sizes, methods=("joint", "dmil"), work_dir="runs/scale", threads: int = 1, output=None) -> dict:
    """
    Train every method of `methods` on every size of `sizes` (rows of `synthetic`, all splits) and measure each run.

    Returns (and writes to `output` as JSON) `{"runs": [...], "rss_growth_mb": {method: {"<a>-><b>": MB}}, ...}`,
    one run per (size, method): `rows`, `train_rows` (before the corrupted copies DMIL adds: 30% more), `epochs`,
    `seconds_per_epoch` (Trainer's time over all stages, each epoch's evaluation and checkpoint included, divided by
    the epochs), `refit_seconds` (DMIL's reliability refit after the stages, `DmilConfig.reliability_refit_steps`: a
    fixed cost per run, not per epoch; 0 for the others), `wall_seconds` (the whole process: loading, encoding, the stage-2 embedding pass, the test report),
    `peak_rss_mb` and the test accuracy. Raises RuntimeError naming the log of a run that fails.
    """
    from .methods import METHODS
    from .run_folder import RUN_MARKER

    sizes = [int(size) for size in sizes]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not sizes or min(sizes) < 20:
        raise ValueError(f"measure_scale needs sizes of at least 20 rows and methods among {list(METHODS)}; got sizes "
                         f"{sizes} and methods {list(methods)}.")
    work_dir = Path(work_dir)
    (work_dir / "runs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1")
    runs = []
    for size in sizes:
        dataset = scale_dataset(size, work_dir / "data" / f"synthetic-{size}")
        for method in methods:
            run_dir = work_dir / "runs" / f"{method}-{size}"
            log = run_dir.with_suffix(".log")
            status, peak_mb, wall = run_measured(scale_train_command(dataset, method, run_dir, threads), log, env)
            if status != 0:
                raise RuntimeError(f"dmil train --method {method} on {size} rows failed (exit {status}); see {log}.")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            # The stages' epochs; DMIL's reliability refit after them has none: a fixed cost per run, kept apart.
            stages = [stage for stage in metrics["stages"] if "epochs" in stage]
            epochs = sum(stage["epochs"] for stage in stages)
            train = sum(stage["train_seconds"] for stage in stages)
            refit = sum(stage["train_seconds"] for stage in metrics["stages"] if "epochs" not in stage)
            train_rows = json.loads((run_dir / RUN_MARKER).read_text())["data"]["train"]["rows"]
            runs.append({"rows": size, "method": method, "train_rows": train_rows, "epochs": epochs,
                         "seconds_per_epoch": train / epochs, "train_seconds": train, "refit_seconds": refit,
                         "wall_seconds": wall,
                         "peak_rss_mb": peak_mb, "test_accuracy": metrics["test"].get("accuracy"),
                         "stages": {stage["stage"]: stage["train_seconds"] for stage in metrics["stages"]}})
    growth = {}
    for method in methods:
        peaks = [(r["rows"], r["peak_rss_mb"]) for r in runs if r["method"] == method]
        growth[method] = {f"{a}->{b}": pb - pa for (a, pa), (b, pb) in zip(peaks, peaks[1:])}
    import torch

    results = {"command": "dmil profile --scale " + " ".join(map(str, sizes)) + " --methods " + " ".join(methods),
               "threads": threads, "stage_epochs": list(SCALE_STAGE_EPOCHS), "cpu_count": os.cpu_count(),
               "machine": platform.machine(), "torch": torch.__version__, "runs": runs, "rss_growth_mb": growth}
    if output:
        Path(output).write_text(json.dumps(results, indent=2))
    return results


__all__ = ["SCALE_STAGE_EPOCHS", "measure_scale", "run_measured", "scale_dataset", "scale_train_command"]
