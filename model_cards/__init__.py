"""The model card templates, shipped with dmil_hf as package data: this folder is the `dmil_hf.model_cards` package
(pyproject.toml maps it), so `importlib.resources.files("dmil_hf.model_cards")` finds them installed or editable."""
