"""
How a dataset's modalities interact about its labels: redundancy, uniqueness and synergy (partial information
decomposition, in bits). Pure functions on numpy arrays (numpy, scipy, scikit-learn); no model code.

- [`pid_from_table`], [`pid_from_samples`]: exact BROJA decomposition of a discrete distribution.
- [`estimate_interactions`]: dataset-level estimate for continuous features (k-means codes + BROJA).
- [`per_sample_interactions`], [`pointwise_interactions`], [`fit_pointwise_classifiers`]: per-sample estimates from
  out-of-fold classifier probabilities.
- [`make_compute_metrics`]: accuracy per interaction type for `transformers.Trainer`; [`plot_per_sample`].
- [`metric_path`]: the folder of the `evaluate` metric module (`evaluate.load(metric_path())`).

`dmil estimate`'s whole run on a dataset (loading it, optionally a trained model, writing the report, per-sample file
and plot) is `dmil_hf.interactions.dataset_estimate.estimate_dataset`, imported from its module.
"""

from pathlib import Path

from .estimate import discretize, estimate_interactions
from .pid import PIDConvergenceWarning, PIDResult, joint_table, mutual_information, pid_from_samples, pid_from_table
from .pointwise import fit_pointwise_classifiers, per_sample_interactions, pointwise_interactions
from .reporting import make_compute_metrics, plot_per_sample


def metric_path() -> str:
    """Folder of the `dmil_interactions` metric module shipped with the package, for `evaluate.load(...)`."""
    return str(Path(__file__).resolve().parent.parent / "metrics" / "dmil_interactions")


__all__ = [
    "PIDConvergenceWarning",
    "PIDResult",
    "discretize",
    "estimate_interactions",
    "fit_pointwise_classifiers",
    "joint_table",
    "make_compute_metrics",
    "metric_path",
    "mutual_information",
    "per_sample_interactions",
    "pid_from_samples",
    "pid_from_table",
    "plot_per_sample",
    "pointwise_interactions",
]
