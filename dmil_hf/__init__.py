"""dmil_hf: Decomposition-based Multimodal Interaction Learning (DMIL, CVPR 2026) as Hugging Face models.

Importing the package registers the `dmil` model type with the transformers Auto classes, and marks the classes
for `trust_remote_code` export: `save_pretrained` writes `auto_map` and copies the `*_dmil.py` files.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_dmil import DmilConfig
from .modeling_dmil import (
    DmilClassifierOutput,
    DmilEncoders,
    DmilForMultimodalClassification,
    DmilModel,
    DmilModelOutput,
    DmilPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("dmil", DmilConfig, exist_ok=True)
AutoModel.register(DmilConfig, DmilModel, exist_ok=True)
# transformers has no multimodal-classification auto class; sequence classification is the closest generic one.
AutoModelForSequenceClassification.register(DmilConfig, DmilForMultimodalClassification, exist_ok=True)
DmilConfig.register_for_auto_class()
DmilModel.register_for_auto_class("AutoModel")
DmilForMultimodalClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "DmilClassifierOutput",
    "DmilConfig",
    "DmilEncoders",
    "DmilForMultimodalClassification",
    "DmilModel",
    "DmilModelOutput",
    "DmilPreTrainedModel",
]
