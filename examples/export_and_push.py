"""Export a trained model as a self-contained Hub folder (proved to reload without dmil_hf), then push it.

    python examples/export_and_push.py --model runs/dmil-digits --output-dir exports/dmil-digits
    python examples/export_and_push.py --model runs/dmil-digits --output-dir exports/dmil-digits --repo-id you/dmil
    python examples/export_and_push.py --smoke --output-dir /tmp/export                  # trains a tiny model first

The export holds config.json (with auto_map), model.safetensors, the *_dmil.py code, the processor and a model
card; `export_model` reloads it in a fresh Python process where dmil_hf cannot be imported and compares outputs.
Pushing needs a token with write access (`hf auth login` or HF_TOKEN). The CLI does the same: `dmil export` and
`dmil push`.
"""

import argparse
import json
from pathlib import Path

from dmil_hf.experiment import RunSettings, run_training
from dmil_hf.hub import export_model, push_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder written by `dmil train` / save_pretrained (default: train a tiny one)")
    parser.add_argument("--output-dir", default="runs/example-export", help="gets export/ (and model/ when training)")
    parser.add_argument("--repo-id", help="user/name or org/name to push to; without it nothing leaves this machine")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic model, one epoch per stage: seconds")
    parser.add_argument("--overwrite", action="store_true", help="replace existing model/ and export/ folders")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)

    model_dir = args.model
    if model_dir is None:  # a quick DMIL on the built-in synthetic features, exactly as `dmil train` would
        model_dir = str(output_dir / "model")
        run_training(RunSettings(dataset="synthetic", output_dir=model_dir, overwrite=args.overwrite,
                                 dataset_kwargs={"num_samples": 300 if args.smoke else 3000, "bayes_samples": 2000},
                                 stage_epochs=(1, 1, 1) if args.smoke else None))

    report = export_model(model_dir, output_dir / "export", overwrite=args.overwrite, repo_id=args.repo_id)
    print(json.dumps({"export": report["output_dir"], "reloaded_as": report["model_class"],
                      "max_abs_diff": report["max_abs_diff"]}, indent=2, default=str))
    print(f"exported to {report['output_dir']} (checked in a fresh process)")

    if args.repo_id:
        print("pushed:", push_model(model_dir, args.repo_id, private=args.private))
    else:
        print(f"not pushed (no --repo-id). To publish: `hf auth login`, then\n"
              f"  python examples/export_and_push.py --model {model_dir} --repo-id <user>/<name>\n"
              f"  (or: dmil push --model {model_dir} --repo-id <user>/<name>)")


if __name__ == "__main__":
    main()
