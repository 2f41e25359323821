"""The readout after marginalisation, mixing the subsets of working modalities by their posterior given the predicted
class (rounds 7-10, `dmil_hf.modeling_dmil.subset_posterior`) or by their share of the evidence for it (round 11,
`subset_evidence`), on trained runs of one benchmark configuration: accuracy (the same either way), the share of
samples whose largest `interaction_weights` entry names the true interaction type, among right and wrong predictions,
and per type (`type:readout/accuracy`).

    python benchmarks/robustness/round11/readout_evidence.py SPLIT CONFIGURATION RUN [RUN ...]
"""

import sys

import numpy as np
from transformers import AutoProcessor

from dmil_hf import modeling_dmil
from dmil_hf.bench import CONFIGURATIONS
from dmil_hf.data import load_dataset_from_name_or_path
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model


def main(split, configuration, *runs):
    name, kwargs = CONFIGURATIONS[configuration]
    data = load_dataset_from_name_or_path(name, **kwargs)[split]
    interactions, labels = np.asarray(data["interaction"]), np.asarray(data["labels"])
    evidence = modeling_dmil.subset_evidence
    for run in runs:
        model = load_model(run).eval()
        processor = AutoProcessor.from_pretrained(run) if any(
            model.config.tower_config(m) is not None for m in model.config.modalities) else None
        names = np.asarray(model.config.component_names)
        for mode, mixing in (("posterior", modeling_dmil.subset_posterior), ("evidence", evidence)):
            modeling_dmil.subset_evidence = mixing
            report, predictions = evaluate_model(model, processor, data)
            right = predictions["logits"].argmax(1) == labels
            named = names[predictions["interaction_weights"].argmax(1)] == interactions
            per_type = " ".join(f"{t}:{100 * named[interactions == t].mean():.0f}/{100 * right[interactions == t].mean():.0f}"
                                for t in np.unique(interactions))
            print(f"{run.rstrip('/').split('/')[-1]} {split} {mode:9s} accuracy {100 * report['accuracy']:.1f} readout "
                  f"{100 * named.mean():.1f} (right {100 * named[right].mean():.1f}, wrong "
                  f"{100 * named[~right].mean():.1f})  {per_type}", flush=True)
        modeling_dmil.subset_evidence = evidence


if __name__ == "__main__":
    main(*sys.argv[1:])
