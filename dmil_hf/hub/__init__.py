"""To the Hub and back: model cards, a self-checking export and push.

- `card`: `render_model_card` / `write_model_card`, the card of a saved model from the templates shipped as package
  data (`dmil_hf.model_cards`, the repository's `model_cards/` folder), the model's config and the run's
  `metrics.json` / `interaction_profile.json` / `interaction_weights.png` when they lie beside it.
- `export`: `export_model`, a self-contained Hub folder (config with `auto_map`, safetensors weights, the `*_dmil.py`
  code, the processor, the card) that `reload_check.py` reloads in a fresh process *without* `dmil_hf`; it must give
  the same outputs before the export counts as done.
- `push`: `push_model`, export to a temporary folder (so the check runs), then create the repo and upload the folder.

Example:
```python
from dmil_hf.hub import export_model, push_model

export_model("runs/dmil-digits", "exports/dmil-digits")           # checked, ready to upload by hand
push_model("runs/dmil-digits", "my-user/dmil-digits", private=True)  # returns the commit URL
```
"""

from .card import CARD_TAGS, PAPER_CITATION, TEMPLATE_PATH, render_model_card, write_model_card
from .export import EXPORT_TOLERANCE, RUN_FILES, ExportCheckError, check_inputs, export_model
from .push import HubUnreachableError, check_hub_reachable, check_push_target, push_model

__all__ = [
    "CARD_TAGS",
    "EXPORT_TOLERANCE",
    "ExportCheckError",
    "HubUnreachableError",
    "PAPER_CITATION",
    "RUN_FILES",
    "TEMPLATE_PATH",
    "check_hub_reachable",
    "check_inputs",
    "check_push_target",
    "export_model",
    "push_model",
    "render_model_card",
    "write_model_card",
]
