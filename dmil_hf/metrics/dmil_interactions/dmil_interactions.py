# An `evaluate` metric module, loaded offline with `evaluate.load(dmil_hf.interactions.metric_path())`. evaluate's
# loader reads the top-level imports line by line to check dependencies: keep one import per line.
"""Dataset-level redundancy, uniqueness and synergy (BROJA partial information decomposition, bits)."""

import datasets
import evaluate
import numpy as np
from dmil_hf.interactions import estimate_interactions

_DESCRIPTION = """
How two modalities inform a label: the partial information decomposition I(X1, X2; Y) = R + U1 + U2 + S (BROJA
definition, as in Liang et al., NeurIPS 2023), in bits. Vector features are clustered with k-means (standardised,
seeded) first; inputs with at most `n_clusters` distinct values are used as they are.
"""

_KWARGS_DESCRIPTION = """
Args:
    x1 (`list[int]` or `list[list[float]]`): the first modality, one discrete id or one feature vector per sample.
    x2 (`list[int]` or `list[list[float]]`): the second modality, same kind as `x1`.
    references (`list[int]`): class labels.
    n_clusters (`int`, defaults to 10): k-means clusters per modality.
    seed (`int`, defaults to 0): k-means random state.
Returns:
    redundancy, unique_x1, unique_x2, synergy, total (`float`, bits), n_samples (`int`), converged (`bool`).
Example:
    >>> import evaluate
    >>> from dmil_hf.interactions import metric_path
    >>> metric = evaluate.load(metric_path())
    >>> result = metric.compute(x1=[0, 0, 1, 1], x2=[0, 1, 0, 1], references=[0, 1, 1, 0])
    >>> round(result["synergy"], 6)
    1.0
"""

_CITATION = """
@article{bertschinger2014quantifying,
  title={Quantifying Unique Information}, author={Bertschinger, Nils and Rauh, Johannes and Olbrich, Eckehard and
  Jost, J{\\"u}rgen and Ay, Nihat}, journal={Entropy}, volume={16}, number={4}, pages={2161--2183}, year={2014}}
@inproceedings{liang2023quantifying,
  title={Quantifying \\& Modeling Multimodal Interactions: An Information Decomposition Framework},
  author={Liang, Paul Pu and Cheng, Yun and Fan, Xiang and Ling, Chun Kai and Nie, Suzanne and Chen, Richard and
  Deng, Zihao and Allen, Nicholas and Auerbach, Randy and Mahmood, Faisal and Salakhutdinov, Ruslan and
  Morency, Louis-Philippe}, booktitle={NeurIPS}, year={2023}}
"""


def _features(kind):
    return datasets.Features({"x1": kind, "x2": kind, "references": datasets.Value("int64")})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DmilInteractions(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Either one discrete id per sample, or one feature vector per sample (both modalities the same kind).
            features=[_features(datasets.Value("int64")), _features(datasets.Sequence(datasets.Value("float64")))],
        )

    def _compute(self, x1, x2, references, n_clusters=10, seed=0):
        result = estimate_interactions({"x1": np.asarray(x1), "x2": np.asarray(x2)}, np.asarray(references),
                                       n_clusters=n_clusters, seed=seed)
        return {
            "redundancy": result["redundancy"],
            "unique_x1": result["unique"]["x1"],
            "unique_x2": result["unique"]["x2"],
            "synergy": result["synergy"],
            "total": result["total"],
            "n_samples": result["method"]["n_samples"],
            "converged": result["method"]["converged"],
        }
