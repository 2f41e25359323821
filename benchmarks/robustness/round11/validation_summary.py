"""Means over seeds of `dmil evaluate --degraded --output FILE` reports (the validation split of `digits-pretrained` runs
here): clean accuracy per seed, synergy, every degradation gap and the partly noised sets.

    python benchmarks/robustness/round11/validation_summary.py TAG FILE [FILE ...]
"""

import json
import sys

import numpy as np


def main(tag, *files):
    reports = [json.load(open(path))["test"] for path in files]
    clean = [100 * r["accuracy"] for r in reports]
    synergy = np.mean([100 * r["by_interaction"]["synergy"] for r in reports])
    gaps = {k: np.mean([100 * r["degraded"]["gap"][k] for r in reports]) for k in sorted(reports[0]["degraded"]["gap"])}
    partial = {k: np.mean([100 * r["degraded"]["accuracy"][k] for r in reports])
               for k in reports[0]["degraded"]["accuracy"] if k.startswith("partial")}
    print(f"{tag} clean {np.mean(clean):.2f} ({' '.join(f'{c:.1f}' for c in clean)}) synergy {synergy:.1f} worst gap "
          f"{max(gaps.values()):.1f}")
    print("   gaps " + " ".join(f"{k} {v:.1f}" for k, v in gaps.items()))
    print("   partly noised " + " ".join(f"{k} {v:.1f}" for k, v in partial.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
