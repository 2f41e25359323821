"""Refit a tiny DMIL model's reliability heads (`dmil_hf.training.refit_reliability_heads`) on a corrupted feature
split; run under `accelerate launch`, each process refits on its own shard and then takes the main process's heads.
Saves each rank's reliability heads and the heads before the refit. Usage: ddp_refit.py OUTPUT_DIR"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402
from transformers import TrainingArguments, set_seed  # noqa: E402

from ddp_data import feature_rows  # noqa: E402
from dmil_hf import DmilConfig, DmilForMultimodalClassification  # noqa: E402
from dmil_hf.data import add_training_corruption  # noqa: E402
from dmil_hf.training import refit_reliability_heads  # noqa: E402

output_dir = Path(sys.argv[1])
data = add_training_corruption(feature_rows(), ["alpha", "beta"], fraction=0.3, seed=0).with_format("torch")
set_seed(0)
model = DmilForMultimodalClassification(DmilConfig(
    feature_modalities={"alpha": 6, "beta": 4}, num_labels=3, hidden_size=16, latent_size=8, feature_hidden_size=16,
    reliability_refit_steps=20))
before = {k: v.clone() for k, v in model.dmil.reliability.state_dict().items()}
args = TrainingArguments(str(output_dir), per_device_train_batch_size=8, report_to="none", seed=0, disable_tqdm=True,
                         remove_unused_columns=False)
record = refit_reliability_heads(model, args, data)
assert record["steps"] == 20, record
output_dir.mkdir(parents=True, exist_ok=True)
heads = {k: v.contiguous() for k, v in model.dmil.reliability.state_dict().items()}
save_file(heads, str(output_dir / f"heads_rank{args.process_index}.safetensors"))
if args.process_index == 0:
    save_file({k: v.contiguous() for k, v in before.items()}, str(output_dir / "heads_before.safetensors"))
