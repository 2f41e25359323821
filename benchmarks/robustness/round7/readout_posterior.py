"""The readout after marginalisation, mixing the subsets of working modalities by their prior (the code before round 7)
or by their posterior given the predicted class (`dmil_hf.modeling_dmil.subset_posterior`, round 7), on one trained
model: the share of samples whose largest weight names the true interaction type, per type, on the validation and
test splits, and the mean `unique_<m>` weight with modality m clean, noised and half noised. Predictions are the same
either way (the mixture of the logits does not change).

    python benchmarks/robustness/round7/readout_posterior.py runs/dmil-digits digits text
"""

import sys

import numpy as np
from transformers import AutoProcessor

from dmil_hf import modeling_dmil
from dmil_hf.data import load_dataset_from_name_or_path
from dmil_hf.data.degrade import Degradation, degrade_split
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model


def main(run, dataset, modality):
    model = load_model(run).eval()
    processor = AutoProcessor.from_pretrained(run) if any(
        model.config.tower_config(m) is not None for m in model.config.modalities) else None
    dsd = load_dataset_from_name_or_path(dataset)
    names = np.asarray(model.config.component_names)
    unique = list(names).index(f"unique_{modality}")
    evidence = modeling_dmil.subset_evidence  # the readout's mixing since round 11; round 7 compared these two
    for mode, mixing in (("prior", lambda prior, probabilities, predicted: prior),
                         ("posterior", modeling_dmil.subset_posterior)):
        modeling_dmil.subset_evidence = mixing
        for split in ("validation", "test"):
            interactions = np.asarray(dsd[split]["interaction"])
            report, predictions = evaluate_model(model, processor, dsd[split])
            named = names[predictions["interaction_weights"].argmax(1)] == interactions
            per_type = " ".join(f"{t} {100 * named[interactions == t].mean():.1f}" for t in np.unique(interactions))
            print(f"{mode:9s} {split:10s} accuracy {100 * report['accuracy']:.1f}  readout {100 * named.mean():.1f}"
                  f"  ({per_type})")
            for name, degradation in (("noise", Degradation("noise")), ("partial50", Degradation("partial", 0.5))):
                _, degraded = evaluate_model(model, processor, degrade_split(dsd[split], modality, degradation))
                weights = {"clean": predictions["interaction_weights"], name: degraded["interaction_weights"]}
                own = interactions == f"unique_{modality}"
                print(f"{'':21s}unique_{modality} weight on its own samples, clean -> {name}: "
                      f"{weights['clean'][own, unique].mean():.2f} -> {weights[name][own, unique].mean():.2f}; "
                      f"on all samples {weights['clean'][:, unique].mean():.3f} -> {weights[name][:, unique].mean():.3f}")
    modeling_dmil.subset_evidence = evidence


if __name__ == "__main__":
    main(*sys.argv[1:4])
