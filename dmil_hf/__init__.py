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

# The baselines (same towers and data path); each has its own model_type so the Auto classes rebuild the right one.
from .baselines import (  # noqa: E402
    DmilEnsembleConfig,
    DmilEnsembleForMultimodalClassification,
    DmilI2moeConfig,
    DmilI2moeForMultimodalClassification,
    DmilJointConfig,
    DmilJointForMultimodalClassification,
)
from .methods import METHODS, Method, build_model, get_method, register_method  # noqa: E402

for _method in METHODS.values():
    if _method.config_class is not DmilConfig:
        AutoConfig.register(_method.model_type, _method.config_class, exist_ok=True)
        AutoModelForSequenceClassification.register(_method.config_class, _method.model_class, exist_ok=True)
        _method.config_class.register_for_auto_class()
        _method.model_class.register_for_auto_class("AutoModelForSequenceClassification")
del _method

__all__ += [
    "METHODS",
    "DmilEnsembleConfig",
    "DmilEnsembleForMultimodalClassification",
    "DmilI2moeConfig",
    "DmilI2moeForMultimodalClassification",
    "DmilJointConfig",
    "DmilJointForMultimodalClassification",
    "Method",
    "build_model",
    "get_method",
    "register_method",
]

# The processor: AutoProcessor finds it locally, and save_pretrained writes its auto_map for trust_remote_code.
from transformers import AutoProcessor  # noqa: E402

from .processing_dmil import DmilProcessor  # noqa: E402

AutoProcessor.register(DmilConfig, DmilProcessor, exist_ok=True)
DmilProcessor.register_for_auto_class("AutoProcessor")
__all__ += ["DmilProcessor"]

# The `multimodal-classification` pipeline: pipeline("multimodal-classification", model=DIR).
from .pipeline import MultimodalClassificationPipeline, register_pipeline  # noqa: E402

register_pipeline()
__all__ += ["MultimodalClassificationPipeline"]
