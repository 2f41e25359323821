"""Train a tiny model with DmilTrainer; run plainly or under `accelerate launch`. The `alpha` tower is frozen and read
from the embedding cache in OUTPUT_DIR/cache (built by the main process). Saves each rank's parameters, its cache
records and the logged losses. Usage: ddp_train.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE [METHOD]"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402
from transformers import TrainingArguments, set_seed  # noqa: E402

from ddp_data import feature_rows  # noqa: E402
from dmil_hf import DmilConfig  # noqa: E402
from dmil_hf import build_model  # noqa: E402
from dmil_hf.embedding_cache import cache_tower_embeddings  # noqa: E402
from dmil_hf.training import DmilTrainer  # noqa: E402

output_dir, batch_size = Path(sys.argv[1]), int(sys.argv[2])
method = sys.argv[3] if len(sys.argv) > 3 else "joint"
data = feature_rows().with_format("torch")
set_seed(0)
# Dropout off, so one process and two see exactly the same computation on the same global batch.
config = DmilConfig(feature_modalities={"alpha": 6, "beta": 4}, num_labels=3, hidden_size=16, latent_size=8,
                    feature_hidden_size=16, dropout=0.0, modality_dropout=0.0,
                    freeze_towers=["alpha"])
model = build_model(method, config)
splits, records = cache_tower_embeddings(model, {"train": data}, ["alpha"], output_dir / "cache", show_progress=False)
data = splits["train"]
assert "alpha_tower_embeds" in data.column_names and "alpha_features" not in data.column_names
args = TrainingArguments(str(output_dir), per_device_train_batch_size=batch_size, num_train_epochs=2, logging_steps=1,
                         learning_rate=1e-2, report_to="none", seed=0, save_strategy="no", disable_tqdm=True,
                         remove_unused_columns=False)
trainer = DmilTrainer(model=model, args=args, train_dataset=data)
trainer.train()
output_dir.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output_dir / f"rank{args.process_index}.safetensors"))
(output_dir / f"cache_rank{args.process_index}.json").write_text(json.dumps(records))
if args.process_index == 0:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (output_dir / "losses.json").write_text(json.dumps(losses))
