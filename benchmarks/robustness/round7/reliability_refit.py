"""A probe for the next step of issue 19 (not a feature): fit a trained model's reliability heads again, alone, on
its final tower outputs, and compare clean accuracy and degradation gaps before and after, on validation and test.

Feature modalities only. Each head (as trained) continues for 3,000 steps of 64 rows at learning rate 1e-3 (AdamW),
rows drawn from the train split clean (target 1), noised (target 0) and noised 40% / 70% (targets 0.6 / 0.3), in the
proportions of `add_training_corruption`'s defaults (a noised row of a modality per 13 clean ones).

    python benchmarks/robustness/round7/reliability_refit.py RUN DATASET ['{"builder": "kwargs"}']
"""

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from dmil_hf.data import load_dataset_from_name_or_path
from dmil_hf.data.degrade import DEGRADATIONS, Degradation, degradation_report, degrade_split
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model

KINDS = ("missing", "noise", "blank", "partial")
TARGETS = ((None, 1.0, 1.0), (Degradation("noise"), 0.0, 0.075), (Degradation("partial", 0.4), 0.6, 0.0375),
           (Degradation("partial", 0.7), 0.3, 0.0375))  # (degradation, target, share of draws per clean row)


def measure(model, dsd, tag):
    degradations = [d for d in DEGRADATIONS if d.kind in KINDS]
    for split in ("validation", "test"):
        clean, _ = evaluate_model(model, None, dsd[split])
        report = degradation_report(lambda s: evaluate_model(model, None, s)[0], dsd, split=split,
                                    num_labels=model.config.num_labels, clean=clean, degradations=degradations)
        gaps = report["gap"]
        worst = max(gaps, key=gaps.get)
        print(f"{tag:10s} {split:10s} clean {100 * clean['accuracy']:.1f}  worst gap {100 * gaps[worst]:.1f} ({worst})  "
              + " ".join(f"{k} {100 * v:.1f}" for k, v in sorted(gaps.items())), flush=True)


def refit(model, train, steps=3000, seed=0):
    torch.manual_seed(seed)
    for modality in model.config.modalities:
        tower, column = model.dmil.encoders.towers[modality], f"{modality}_features"
        inputs, targets, weights = [], [], []
        for degradation, target, share in TARGETS:
            rows = train if degradation is None else degrade_split(train, modality, degradation, seed=11)
            with torch.no_grad():
                inputs.append(tower(torch.tensor(np.asarray(rows[column]), dtype=torch.float32)))
            targets.append(torch.full((len(rows),), target))
            weights.append(torch.full((len(rows),), share))
        inputs, targets, weights = torch.cat(inputs), torch.cat(targets), torch.cat(weights)
        head = model.dmil.reliability.heads[modality]
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
        draw = torch.distributions.Categorical(probs=weights / weights.sum())
        for _ in range(steps):
            index = draw.sample((64,))
            loss = F.binary_cross_entropy_with_logits(head(inputs[index]).squeeze(-1), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def main(run, dataset, kwargs="{}"):
    model = load_model(run).eval()
    dsd = load_dataset_from_name_or_path(dataset, **json.loads(kwargs))
    measure(model, dsd, "as trained")
    refit(model, dsd["train"])
    measure(model, dsd, "refit")


if __name__ == "__main__":
    main(*sys.argv[1:])
