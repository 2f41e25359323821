"""How do a dataset's modalities interact? Redundancy, uniqueness and synergy in bits, for the whole dataset and for
every sample (no model training: k-means + exact PID, and out-of-fold scikit-learn classifiers).

    python examples/estimate_interactions.py --output-dir runs/example-interactions
    python examples/estimate_interactions.py --smoke --output-dir /tmp/interactions      # offline, seconds

On your own data, pass one array per modality (rows = samples) and the labels, e.g.
`estimate_interactions({"text": text_embeddings, "vision": image_embeddings}, labels)`.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from dmil_hf.data import make_synthetic
from dmil_hf.interactions import estimate_interactions, per_sample_interactions, plot_per_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/example-interactions")
    parser.add_argument("--smoke", action="store_true", help="600 samples, smaller per-sample models: seconds")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Two feature modalities `a`, `b`; every sample is labelled with its true type (redundancy, unique_a, ...).
    split = make_synthetic(num_modalities=2, num_samples=600 if args.smoke else 4000, bayes_samples=2000)["train"]
    modalities = {m: np.asarray(split[f"{m}_features"]) for m in ("a", "b")}
    labels, kinds = np.asarray(split["labels"]), np.asarray(split["interaction"])

    # Dataset level: 4 clusters per modality keeps ~400 samples above the 4 x 4 x 4-cell table they fill.
    dataset = estimate_interactions(modalities, labels, n_clusters=4 if args.smoke else 8)
    print("dataset level (bits):", {k: round(v, 3) for k, v in
                                    {"redundancy": dataset["redundancy"], **{f"unique_{m}": u for m, u in
                                     dataset["unique"].items()}, "synergy": dataset["synergy"]}.items()})

    # Per sample, then averaged by the true type: each row should peak in its own column.
    classifier = dict(n_folds=3, hidden_layer_sizes=(32,), max_iter=200) if args.smoke else {}
    per_sample = per_sample_interactions(modalities, labels, **classifier)
    components = ["redundancy", "unique_a", "unique_b", "synergy"]
    print(f"\n{'true type':<12}" + "".join(f"{c:>12}" for c in components))
    table = {}
    for kind in sorted(set(kinds)):
        table[kind] = {c: float(per_sample[c][kinds == kind].mean()) for c in components}
        print(f"{kind:<12}" + "".join(f"{table[kind][c]:>12.3f}" for c in components))

    plot = plot_per_sample(per_sample, groups=kinds, path=output_dir / "per_sample_interactions.png")
    (output_dir / "interactions.json").write_text(json.dumps({"dataset": dataset, "per_sample_by_type": table},
                                                             indent=2, default=float))
    print(f"\nplot: {plot}\nnumbers: {output_dir / 'interactions.json'}")


if __name__ == "__main__":
    main()
