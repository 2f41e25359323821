"""PNG plots shared by training runs and the benchmark (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_component_boxes(values, groups, component_names, path, title, ylabel, ylim=None):
    """Box plots of each component's per-sample value (`values`: (N, components)), one panel per group."""
    plt = _pyplot()
    values, groups = np.asarray(values), np.asarray(groups)
    kinds = sorted(set(groups.tolist()))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = values[groups == kind]
        ax.boxplot([rows[:, k] for k in range(len(component_names))], showfliers=False)
        ax.set_xticks(range(1, len(component_names) + 1), [n.replace("unique_", "U_") for n in component_names],
                      rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{kind} (n={len(rows)})", fontsize=9)
        if ylim is not None:
            ax.set_ylim(*ylim)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_interaction_weights(weights, interactions, component_names, path, title="Per-sample interaction weights"):
    """Box plots of each component's per-sample interaction weight (the readout, `outputs.interaction_weights`: each
    row sums to one), one panel per ground-truth interaction type. Not the gate's weights (`gate_weights`), which mix
    the components' predictions and serve accuracy."""
    return plot_component_boxes(weights, interactions, component_names, path, title, "interaction weight (readout)",
                                ylim=(0, 1))


__all__ = ["plot_component_boxes", "plot_interaction_weights"]
