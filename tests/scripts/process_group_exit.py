"""Build a DmilTrainer inside a one-process gloo group and report, from an exit handler that runs after the trainer's
(atexit runs last-in first-out), whether the group is still alive (`tests/test_training.py`)."""

import atexit
import tempfile

import torch.distributed as dist
from transformers import TrainingArguments

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.training import DmilTrainer

atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
model = DmilForMultimodalClassification(DmilConfig(feature_modalities={"a": 3, "b": 4}, num_labels=2))
DmilTrainer(model=model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True))
print("initialized after the trainer:", dist.is_initialized(), flush=True)
