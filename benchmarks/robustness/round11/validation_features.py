"""Validation figures of `dmil bench` runs on the feature configurations: clean accuracy (per seed), synergy, the
degradation gaps (missing, noise, blank) and the partly noised sets, means over the seeds of each configuration.

    python benchmarks/robustness/round11/validation_features.py BENCH_DIR [BENCH_DIR ...]
"""

import glob
import sys

import numpy as np

from dmil_hf.bench import CONFIGURATIONS
from dmil_hf.data import load_dataset_from_name_or_path
from dmil_hf.data.degrade import DEGRADATIONS, degradation_report
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model


def main(*benches):
    degradations = [d for d in DEGRADATIONS if d.kind in ("missing", "noise", "blank", "partial")]
    for bench in benches:
        for configuration in ("synthetic", "synthetic3"):
            runs = sorted(glob.glob(f"{bench}/runs/{configuration}-dmil-seed?"))
            if not runs:
                continue
            name, kwargs = CONFIGURATIONS[configuration]
            data = load_dataset_from_name_or_path(name, **kwargs)
            rows = []
            for run in runs:
                model = load_model(run).eval()
                clean, _ = evaluate_model(model, None, data["validation"])
                report = degradation_report(lambda split: evaluate_model(model, None, split)[0], data,
                                            split="validation", num_labels=model.config.num_labels, clean=clean,
                                            degradations=degradations)
                rows.append((clean, report))
            accuracy = [100 * clean["accuracy"] for clean, _ in rows]
            synergy = np.mean([100 * clean["by_interaction"]["synergy"] for clean, _ in rows])
            gaps = {k: np.mean([100 * report["gap"][k] for _, report in rows]) for k in rows[0][1]["gap"]}
            partial = {k: np.mean([100 * report["accuracy"][k] for _, report in rows])
                       for k in rows[0][1]["accuracy"] if k.startswith("partial")}
            print(f"{bench} {configuration} validation clean {np.mean(accuracy):.1f} "
                  f"({' '.join(f'{a:.1f}' for a in accuracy)}) synergy {synergy:.1f} worst gap {max(gaps.values()):.1f}")
            print("   gaps " + " ".join(f"{k} {v:.1f}" for k, v in gaps.items()))
            print("   partly noised " + " ".join(f"{k} {v:.1f}" for k, v in partial.items()), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
