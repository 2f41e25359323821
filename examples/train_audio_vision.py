"""Train DMIL on audio + images with the Trainer API, step by step (the functions `dmil train` calls).

    python examples/train_audio_vision.py --output-dir runs/example-audio-vision
    python examples/train_audio_vision.py --smoke --output-dir /tmp/audio-vision          # offline, seconds
    python examples/train_audio_vision.py --audio-model path/or/hub-id --output-dir runs/example-audio-whisper

The data is the built-in `digits` set without its text: a spoken digit (1 s at 16 kHz, espeak-ng voices) and a
16 x 16 handwritten digit per sample. Its synergy samples need both: the label is the sum (mod 10) of the digit
shown and the digit spoken.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainingArguments

from dmil_hf import DmilConfig, DmilForMultimodalClassification
from dmil_hf.data import inspect_dataset, make_digits
from dmil_hf.experiment import evaluate_encoded
from dmil_hf.interactions import make_compute_metrics
from dmil_hf.preprocess import build_processor, encode_dataset
from dmil_hf.run_folder import prepare_output_dir
from dmil_hf.towers import tower_configs, vision_tower_config
from dmil_hf.training import train_staged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/example-audio-vision")
    parser.add_argument("--audio-model", help="pretrained audio tower, e.g. a Whisper checkpoint (hub id or local "
                        "folder); default: a tiny random Whisper encoder")
    parser.add_argument("--smoke", action="store_true", help="120 samples, one epoch per stage: runs in seconds")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    training_args = TrainingArguments(str(output_dir / "checkpoints"), per_device_train_batch_size=32,
                                      per_device_eval_batch_size=64, remove_unused_columns=False, report_to="none",
                                      logging_steps=10, seed=0)
    with training_args.main_process_first(local=False, desc="output folder"):
        if training_args.process_index == 0:  # refuse a non-empty folder unless --overwrite, like `dmil train`
            prepare_output_dir(output_dir, resume=False, overwrite=args.overwrite)

    # Only the sample types audio + vision can explain (digits' unique_text samples need the sentence).
    dsd = make_digits(num_samples=120 if args.smoke else 2000,
                      mixture={"redundancy": 1, "unique_vision": 1, "unique_audio": 1, "synergy": 1})
    dsd = dsd.remove_columns(["text"])
    schema = inspect_dataset(dsd)  # modalities ("vision", "audio"), 10 labels, interaction types
    pretrained = {"audio": args.audio_model} if args.audio_model else {}
    processor = build_processor(schema.modalities, dsd["train"], pretrained)
    encoded = encode_dataset(dsd, processor, schema.modalities)

    # The head's settings; the stage epochs and learning rates default to DmilConfig's presets.
    head = dict(num_labels=schema.num_labels, id2label=dict(enumerate(schema.label_names)))
    if args.smoke:
        head.update(stage1_epochs=1, stage2_epochs=1, stage3_epochs=1)
    torch.manual_seed(0)
    if args.audio_model:  # pretrained audio tower (Whisper: its encoder), random tiny ViT; the DMIL head is new
        model = DmilForMultimodalClassification.from_encoders_pretrained(
            audio=args.audio_model, vision_config=vision_tower_config("tiny", processor.image_channels), **head)
    else:
        towers = tower_configs(schema.modalities, "tiny", image_channels=processor.image_channels)
        model = DmilForMultimodalClassification(DmilConfig(**towers, **head))

    stages = train_staged(model, training_args, encoded["train"], encoded["validation"],
                          compute_metrics=make_compute_metrics(dsd["validation"]["interaction"]))
    if training_args.process_index != 0:  # under `accelerate launch`, one process saves and reports
        return
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    report, _ = evaluate_encoded(model, encoded["test"], dsd["test"])
    print(json.dumps({"best_validation": {s["stage"]: s["best_metric"] for s in stages}, "test": report}, indent=2))
    print(f"test accuracy: {report['accuracy']:.3f}; model saved to {output_dir}")


if __name__ == "__main__":
    main()
