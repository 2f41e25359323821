"""
transformers' own generic model tests (`ModelTesterMixin`, `ConfigTester`) run against DMIL, from transformers' source
distribution of the installed version (never copied into this repository).

`make test` (and so CI) downloads that sdist from PyPI into `.cache/transformers-sdist/` (`make transformers-tests`);
set `TRANSFORMERS_SDIST` to use another copy. Without it this file is skipped, saying why. The sdist ships
`tests/test_modeling_common.py` and `tests/test_configuration_common.py` but not three helper modules they import;
`_STAND_INS` provides those (see there). The mixin tells base models from sequence classifiers by the names in
transformers' mapping tables, so "dmil" is entered in them, as for a model of the library.

Run alone: `python -m pytest tests/test_transformers_common.py`. In `DmilModelTest`, the mixin's tests that do not
apply to DMIL are skipped with their reason (`_NOT_APPLICABLE`), and two run with a stated adaptation
(`test_eager_matches_sdpa_inference_*`, `test_reverse_loading_mapping`).
"""

import functools
import importlib
import os
import shutil
import sys
import tarfile
import tempfile
import types
import unittest
import unittest.mock
from pathlib import Path

import pytest
import transformers
from packaging import version
import torch
import transformers

from dmil_hf import DmilConfig, DmilForMultimodalClassification, DmilModel
from dmil_hf.modeling_dmil import DmilPreTrainedModel

from conftest import ModelTester

REPO = Path(__file__).resolve().parent.parent
SDIST_NAME = f"transformers-{transformers.__version__}"
PACKAGE = "transformers_sdist_tests"  # the sdist's tests/ folder, imported under this name


def _sdist_path() -> Path:
    given = os.environ.get("TRANSFORMERS_SDIST")
    return Path(given) if given else REPO / ".cache" / "transformers-sdist" / f"{SDIST_NAME}.tar.gz"


def _extract(sdist: Path) -> Path:
    """The sdist's `tests/*.py`, extracted once next to it (a folder per version; renamed into place when complete)."""
    target = sdist.parent / f"{SDIST_NAME}-tests"
    if target.is_dir():
        return target
    partial = Path(tempfile.mkdtemp(dir=sdist.parent, prefix=f"{SDIST_NAME}-tests."))
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and member.isfile() and parts[2].endswith(".py"):
                (partial / parts[2]).write_bytes(archive.extractfile(member).read())
    # test_configuration_common imports transformers through `tests/__init__.py`, which the sdist leaves out.
    (partial / "__init__.py").touch()
    try:
        partial.rename(target)
    except OSError:  # another process got there first
        shutil.rmtree(partial)
    return target


class _ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py` (not in the sdist; it drives every exporter backend). Its core,
    kept: `torch.export` through transformers' own `DynamoExporter`, with static and with dynamic shapes, must
    reproduce the eager outputs, and the dynamic program must run at another batch size."""

    def test_torch_export(self):
        from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        other_batch = self.model_tester.inputs(batch_size=self.model_tester.batch_size + 3)
        for model_class in self.all_model_classes:
            for dynamic in (False, True):
                with self.subTest(model_class.__name__, dynamic=dynamic):
                    torch.manual_seed(0)
                    model = model_class(config).eval()
                    exported = DynamoExporter().export(model, dict(inputs), config=DynamoConfig(dynamic=dynamic))
                    for batch in (inputs, other_batch) if dynamic else (inputs,):
                        with torch.no_grad():
                            expected = model(**batch)
                            got = exported(**batch)
                        for name in ("logits", "component_embeds", "interaction_weights"):
                            if expected.get(name) is not None:
                                torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


# The sdist's modules import three helpers that it does not ship; what stands in for each, and why that is enough.
_STAND_INS = {
    # The mixin inherits the export tests from it: the stand-in above.
    "exporters.test_export": {"ExportTesterMixin": _ExportTesterMixin},
    # Only mixed into models that generate; DMIL does not (the mixin checks `can_generate()` against it).
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    # Read only by `check_config_arguments_init`, which returns before reading it for composite configs (DmilConfig
    # has `sub_configs`).
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}


def _load_common_tests():
    sdist = _sdist_path()
    if not sdist.is_file():
        pytest.skip(f"transformers' common model tests need its source distribution {sdist} (the installed version, "
                    f"{transformers.__version__}); `make transformers-tests` downloads it (or set TRANSFORMERS_SDIST).",
                    allow_module_level=True)
    pytest.importorskip("parameterized", reason="transformers' common model tests import `parameterized` (the `dev` "
                                                "extra installs it)")
    folder = _extract(sdist)
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
        for name, attributes in _STAND_INS.items():
            parent = PACKAGE
            for part in name.split("."):
                module = sys.modules.setdefault(f"{parent}.{part}", types.ModuleType(f"{parent}.{part}"))
                module.__path__ = []
                parent = f"{parent}.{part}"
            vars(module).update(attributes)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    # The mixin tells base models from sequence classifiers by the names in transformers' mapping tables (a model
    # registered with the Auto classes at run time is not in them): DMIL's are entered as a model of the library is.
    modeling.MODEL_MAPPING_NAMES.setdefault(DmilConfig.model_type, DmilModel.__name__)
    modeling.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.setdefault(
        DmilConfig.model_type, DmilForMultimodalClassification.__name__)
    return modeling, configuration.ConfigTester


common, ConfigTester = _load_common_tests()
ModelTesterMixin = common.ModelTesterMixin


class DmilModelTester(ModelTester):
    """conftest's tiny `ModelTester` (text and vision towers: hidden 32, 2 layers; plus a feature modality) with the
    attributes transformers' mixin reads."""

    def __init__(self, parent, batch_size=4):
        super().__init__(("text", "vision", "alpha"), batch_size=batch_size)
        self.parent = parent
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.seq_length = 7

    def get_config(self):
        return self.config()

    def prepare_config_and_inputs_for_common(self):
        return self.config(), self.inputs()


# Tests of the mixin that do not apply to DMIL, and why. The first four are the ones transformers' composite models
# (CLIP, SigLIP) skip for the same reason: DMIL returns each tower's own output (`text_model_output`, ...), and the
# towers are transformers models (BERT, ViT, Whisper, ...) that these tests cover in transformers' own test suite.
_TOWERS_TESTED_BY_TRANSFORMERS = ("each tower's output is the transformers model's own (`<modality>_model_output`, as "
                                  "CLIP's `text_model_output`), tested by transformers' tests of that model")
_NOT_APPLICABLE = {
    "test_hidden_states_output": "there is no single `hidden_states`: " + _TOWERS_TESTED_BY_TRANSFORMERS,
    "test_attention_outputs": "there is no single `attentions`: " + _TOWERS_TESTED_BY_TRANSFORMERS,
    "test_retain_grad_hidden_states_attentions": "there is no single `hidden_states`: " + _TOWERS_TESTED_BY_TRANSFORMERS,
    "test_model_get_set_embeddings": "DMIL has no single input embedding: each text tower keeps its own (CLIP skips it "
                                     "too)",
    # What it checks holds (test_modeling.py::test_from_pretrained_on_a_new_label_set); how it finds the resized
    # tensors does not.
    "test_can_load_ignoring_mismatched_shapes": "it expects one classification layer (a top-level nn.Linear) to be the "
                                                "only tensor sized by num_labels; DMIL has several label heads (unimodal, "
                                                "component, synergy, readout) and a label prior, all re-initialised, "
                                                "which test_modeling.py::test_from_pretrained_on_a_new_label_set checks",
}


@pytest.mark.timeout(900)
class DmilModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DmilModel, DmilForMultimodalClassification)
    # One tower per modality, each with its own embedding matrix and its own stack of layers.
    test_resize_embeddings = False
    _is_composite = True

    def setUp(self):
        self.model_tester = DmilModelTester(self)
        self.config_tester = ConfigTester(self, config_class=DmilConfig, has_text_modality=False,
                                          common_properties=["hidden_size", "num_labels"])

    def test_config(self):
        self.config_tester.run_common_tests()

    @common.parameterized.expand(common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
    def test_eager_matches_sdpa_inference(self, name, dtype, padding_side, use_attention_mask, output_attentions,
                                          enable_kernels):
        """The mixin's test, on the classifier: it compares the last of `hidden_states` (which `DmilModel` does not
        have: its main output is the component embeddings, and each tower's hidden states are in its
        `<modality>_model_output`) or a classifier's `logits`, which are computed from everything `DmilModel`
        computes."""
        self.all_model_classes = (DmilForMultimodalClassification,)
        common._test_eager_matches_sdpa_inference(self, name, dtype, padding_side, use_attention_mask,
                                                  output_attentions, enable_kernels)

    def test_reverse_loading_mapping(self):
        """The mixin's test, saving in the layout the conversion mapping reads. DMIL's mapping converts checkpoints of
        an older layout (one module per modality); `save_pretrained` keeps the current one by default (its docstring
        says why) and writes the older one with `save_original_format=True`, so the test saves with it. The mapping
        is registered for the model type, so it also names the classifier's heads, which `DmilModel` lacks: the
        test's own `skip_base_model` leaves the base model out (its weights are the classifier's `dmil.*`, which the
        test covers)."""
        save = DmilPreTrainedModel.save_pretrained
        with unittest.mock.patch.object(DmilPreTrainedModel, "save_pretrained",
                                        functools.partialmethod(save, save_original_format=True)):
            super().test_reverse_loading_mapping(skip_base_model=True)


# transformers 5.24's version of this test builds its failure message (`tuple_object - dict_object`) before it checks,
# which raises for boolean outputs such as DMIL's masks; 5.25 fixed it (the test passes there), but 5.25 cannot load a
# processor without a tokenizer, so pyproject keeps transformers below it.
if version.parse(transformers.__version__) < version.parse("5.25"):
    _NOT_APPLICABLE["test_model_outputs_equivalence"] = ("transformers < 5.25 subtracts boolean outputs (DMIL's masks) "
                                                         "to format its message before comparing; fixed in 5.25")

for _name, _reason in _NOT_APPLICABLE.items():
    setattr(DmilModelTest, _name, unittest.skip(_reason)(getattr(DmilModelTest, _name)))
