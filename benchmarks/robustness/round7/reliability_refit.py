"""Fit a trained model's reliability heads again after training (`DmilConfig.reliability_refit_steps`,
`dmil_hf.training.refit_reliability_heads`, as `dmil train` runs it after the last stage) and compare clean accuracy
and the degradation gaps before and after, on validation and test. The training split is rebuilt as `dmil train`
builds it (the method's default corruption, drawn with seed 0).

    python benchmarks/robustness/round7/reliability_refit.py RUN DATASET STEPS ['{"builder": "kwargs"}' [MODALITIES]]

MODALITIES (comma-separated): the heads to refit (`DmilConfig.reliability_refit_modalities`; default: the config's).
"""

import json
import sys
import tempfile

from transformers import AutoProcessor, TrainingArguments

from dmil_hf.data import add_training_corruption, inspect_dataset, load_dataset_from_name_or_path
from dmil_hf.data.degrade import DEGRADATIONS, degradation_report
from dmil_hf.experiment import evaluate_model
from dmil_hf.loading import load_model
from dmil_hf.methods import METHODS
from dmil_hf.preprocess import encode_dataset
from dmil_hf.training import refit_reliability_heads

KINDS = ("missing", "noise", "blank", "partial")


def measure(model, processor, dsd, tag):
    degradations = [d for d in DEGRADATIONS if d.kind in KINDS]
    for split in ("validation", "test"):
        clean, _ = evaluate_model(model, processor, dsd[split])
        report = degradation_report(lambda s: evaluate_model(model, processor, s)[0], dsd, split=split,
                                    num_labels=model.config.num_labels, clean=clean, degradations=degradations)
        gaps = report["gap"]
        worst = max(gaps, key=gaps.get)
        print(f"{tag:10s} {split:10s} clean {100 * clean['accuracy']:.1f}  worst gap {100 * gaps[worst]:.1f} ({worst})  "
              + " ".join(f"{k} {100 * v:.1f}" for k, v in sorted(gaps.items())), flush=True)


def main(run, dataset, steps, kwargs="{}", refit=None):
    model = load_model(run).eval()
    towers = any(model.config.tower_config(m) is not None for m in model.config.modalities)
    processor = AutoProcessor.from_pretrained(run) if towers else None
    dsd = load_dataset_from_name_or_path(dataset, **json.loads(kwargs))
    measure(model, processor, dsd, "as trained")
    modalities = inspect_dataset(dsd).modalities
    train = add_training_corruption(dsd["train"], modalities, METHODS["dmil"].train_corruption, seed=0)
    encoded = encode_dataset(dsd, processor, modalities, train=train)
    model.config.reliability_refit_steps = int(steps)
    if refit:
        model.config.reliability_refit_modalities = refit.split(",")
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, per_device_train_batch_size=64, seed=0, report_to="none",
                                 disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
        record = refit_reliability_heads(model, args, encoded["train"], encoded["validation"])
    print(f"refit: {record['steps']} steps in {record['train_seconds']:.1f} s, loss {record['first_loss']:.3f} -> "
          f"{record['last_loss']:.3f}", flush=True)
    measure(model.eval(), processor, dsd, "refit")


if __name__ == "__main__":
    main(*sys.argv[1:])
