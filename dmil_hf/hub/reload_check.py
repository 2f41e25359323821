"""The other half of the export check, run by path in a fresh Python process where `dmil_hf` cannot be imported.

`python reload_check.py EXPORT_FOLDER WORK_FOLDER` loads the exported folder with
`AutoModelForSequenceClassification.from_pretrained(..., trust_remote_code=True)` (and its processor with
`AutoProcessor`, when `WORK_FOLDER/processor.json` holds a sample), runs it on the inputs that `export.py` left in
`WORK_FOLDER`, and writes the outputs (`outputs.safetensors`) and the loaded classes (`info.json`) back there for
`export.py` to compare. It imports nothing from `dmil_hf`: the export must stand on its own files.
"""

import json
import os
import sys


def _isolate() -> None:
    """Run by path, Python put this folder (`dmil_hf/hub`) first on `sys.path`: take it off, and block the installed
    package, so that the export loads from its own files only."""
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [path for path in sys.path if os.path.realpath(path) != here]
    sys.modules["dmil_hf"] = None


def _cases(work: str) -> dict:
    """The `{case: {input name: tensor}}` that export.py flattened to `case/name` keys."""
    from safetensors.torch import load_file

    cases = {}
    for key, value in load_file(f"{work}/inputs.safetensors").items():
        case, name = key.split("/", 1)
        cases.setdefault(case, {})[name] = value
    return cases


def main(folder: str, work: str) -> None:
    _isolate()
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    info = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    outputs = {}
    with torch.no_grad():
        for case, inputs in _cases(work).items():
            out = model(**inputs)
            for name in ("logits", "interaction_weights"):
                if getattr(out, name, None) is not None:
                    outputs[f"{case}/{name}"] = getattr(out, name).contiguous()
    with open(f"{work}/processor.json") as handle:
        sample = json.load(handle)
    if sample is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        info["processor_class"] = f"{type(processor).__module__}.{type(processor).__qualname__}"
        arrays = dict(np.load(f"{work}/processor_arrays.npz"))
        if "images" in arrays:
            arrays["images"] = list(arrays["images"])
        if "audio" in arrays:
            arrays["audio"] = list(arrays["audio"])
        for key, value in processor(**sample, **arrays, return_tensors="pt").items():
            outputs[f"processor/{key}"] = value.contiguous()
    save_file(outputs, f"{work}/outputs.safetensors")
    with open(f"{work}/info.json", "w") as handle:
        json.dump(info, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
