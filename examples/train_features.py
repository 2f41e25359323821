"""Train DMIL on precomputed feature vectors (CMU-MOSEI style) in one call, from a dataset saved on disk.

    python examples/train_features.py --output-dir runs/example-features
    python examples/train_features.py --smoke --output-dir /tmp/features                 # offline, seconds
    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp_cpu_2proc.yaml \\
        examples/train_features.py --smoke --output-dir /tmp/features-ddp                 # two CPU processes

Your own data: one `<name>_features` column per modality (float32 vectors, one width each), `labels`, optionally
`interaction`, in a DatasetDict with splits train / validation / test saved with `save_to_disk`. Here that folder
is a stand-in with MOSEI's widths (GloVe `language` 300, COVAREP `acoustic` 74, Facet `visual` 35): the built-in
`synthetic` task over three modalities, each lifted into its width by a fixed random linear map, so the
ground-truth interaction type of every sample is known. `dmil train --dataset <folder>` trains the same way.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from dmil_hf.data import make_synthetic
from dmil_hf.experiment import RunSettings, run_training

WIDTHS = {"language": 300, "acoustic": 74, "visual": 35}


def mosei_like(num_samples: int, seed: int = 0):
    """The 3-modality `synthetic` task with its columns `a/b/c_features` renamed and lifted to MOSEI's widths."""
    dsd = make_synthetic(num_modalities=3, num_samples=num_samples, feature_dim=16, seed=seed, bayes_samples=2000)
    rng = np.random.default_rng(seed)
    names = dict(zip("abc", WIDTHS))  # a -> language, b -> acoustic, c -> visual
    lifts = {s: rng.normal(size=(16, WIDTHS[n])) for s, n in names.items()}
    kinds = {f"unique_{s}": f"unique_{n}" for s, n in names.items()}

    def lift(batch):
        out = {f"{n}_features": (np.asarray(batch[f"{s}_features"]) @ lifts[s]).astype(np.float32)
               for s, n in names.items()}
        out["interaction"] = [kinds.get(k, k) for k in batch["interaction"]]
        return out

    return dsd.map(lift, batched=True, remove_columns=[f"{s}_features" for s in names])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/example-features", help="gets data/ (the dataset) and model/")
    parser.add_argument("--smoke", action="store_true", help="300 samples, one epoch per stage: runs in seconds")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model/ folder")
    args = parser.parse_args()
    data_dir, model_dir = Path(args.output_dir) / "data", Path(args.output_dir) / "model"

    # Under `accelerate launch` one process writes the dataset while the others wait (cpu=True lets several CPU
    # processes find each other; with GPUs the default applies).
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        if not data_dir.exists():
            mosei_like(300 if args.smoke else 6000).save_to_disk(str(data_dir))

    settings = RunSettings(dataset=str(data_dir), method="dmil", output_dir=str(model_dir), batch_size=32,
                           overwrite=args.overwrite, stage_epochs=(1, 1, 1) if args.smoke else None)
    metrics = run_training(settings)  # checkpoint, processor (none here), metrics.json, interaction plot
    if metrics:  # empty on the other processes under `accelerate launch`
        print(json.dumps({"test": metrics["test"], "train_seconds": round(metrics["train_seconds"], 1)}, indent=2))
        print(f"test accuracy: {metrics['test']['accuracy']:.3f}; model saved to {model_dir}")


if __name__ == "__main__":
    main()
