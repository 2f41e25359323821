"""Refit a trained feature model's reliability heads after the fact (as `dmil train` does after the last stage) three
ways: on the stages' corrupted copy of the training split with `reliability_partial_target`'s target (round 8's
default), and on a copy with half the rows corrupted per modality with the 'level' and the 'responsibility' target;
the degradation gaps on validation and test (round 7's `measure`). Round 10's post-hoc measurements on models trained
with `--config-arg reliability_refit_steps=0`.

    python benchmarks/robustness/round10/refit_features.py RUN CONFIGURATION
"""
import sys, json, tempfile, copy
from transformers import TrainingArguments
sys.path.insert(0, "/work/main/benchmarks/robustness/round7")
from reliability_refit import measure
from dmil_hf.data import add_training_corruption, inspect_dataset, load_dataset_from_name_or_path
from dmil_hf.loading import load_model
from dmil_hf.methods import METHODS
from dmil_hf.preprocess import encode_dataset
from dmil_hf.training import refit_reliability_heads
run, dataset = sys.argv[1], sys.argv[2]
from dmil_hf.bench import CONFIGURATIONS
name, kw = CONFIGURATIONS[dataset]
dsd = load_dataset_from_name_or_path(name, **kw)
modalities = inspect_dataset(dsd).modalities
base = load_model(run).eval()
measure(base, None, dsd, "as trained")
for share, target in ((None, "responsibility"), (0.5, "level"), (0.5, "responsibility")):
    model = copy.deepcopy(base)
    model.config.reliability_partial_target = target
    train = add_training_corruption(dsd["train"], modalities, share or METHODS["dmil"].train_corruption, seed=0 if share is None else 1)
    encoded = encode_dataset(dsd, None, modalities, train=train)
    model.config.reliability_refit_steps = 3000
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, per_device_train_batch_size=64, seed=0, report_to="none", disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_num_workers=0)
        refit_reliability_heads(model, args, encoded["train"], encoded["validation"])
    measure(model.eval(), None, dsd, f"{share}/{target[:5]}")
