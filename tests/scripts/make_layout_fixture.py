"""Write tests/fixtures/dmil_v1_layout/: tiny DMIL checkpoints in the per-modality parameter layout (one module per
modality in `nn.ModuleDict`s, the layout before issue 20's stacked parameters), each with the outputs, losses and
gradients that the code of that layout computed on fixed inputs. tests/test_layout_conversion.py loads them with the
current code and checks that it computes the same.

Run from the repository root, with the code of the old layout checked out (it was run at commit f249425):
    python tests/scripts/make_layout_fixture.py
"""

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertConfig  # noqa: E402

from dmil_hf import DmilConfig, DmilForMultimodalClassification  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "dmil_v1_layout"
BATCH = 6
FEATURES = {"alpha": 5, "beta": 3}
SMALL = dict(hidden_size=8, latent_size=4, feature_hidden_size=8, gate_hidden_size=8, num_labels=3)


def tiny_text_config() -> BertConfig:
    return BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                      max_position_embeddings=8, type_vocab_size=1)


# name -> (config, whether the reliability heads are calibrated, i.e. gate the components)
VARIANTS = {
    # The case: two feature modalities, every default (synergy from the towers, reliability heads).
    "two_features": (lambda: DmilConfig(feature_modalities=FEATURES, **SMALL), False),
    # A text tower first, then two feature modalities: config order (text, alpha, beta) is not the sorted order of
    # the checkpoint's keys; synergy from the latents; calibrated reliability heads gate the components.
    "text_two_features": (lambda: DmilConfig(text_config=tiny_text_config(), feature_modalities=FEATURES,
                                             synergy_source="all", **SMALL), True),
}


def inputs_for(config) -> dict:
    g = torch.Generator().manual_seed(1)
    inputs = {f"{m}_features": torch.randn(BATCH, width, generator=g) for m, width in config.feature_modalities.items()}
    if config.text_config is not None:
        inputs["text_input_ids"] = torch.randint(1, 20, (BATCH, 6), generator=g)
        inputs["text_attention_mask"] = torch.ones(BATCH, 6, dtype=torch.long)
        inputs["text_attention_mask"][0, -2:] = 0
    mask = torch.ones(BATCH, len(config.modalities), dtype=torch.bool)
    mask[1, -1] = False  # one sample misses its last modality
    mask[2, 0] = False  # another its first
    corruption = torch.zeros(BATCH, len(config.modalities))
    corruption[3, 0] = 1.0  # a corrupted first modality (the level-1 and component losses skip it)
    inputs.update(modality_mask=mask, modality_corruption=corruption,
                  labels=torch.arange(BATCH) % config.num_labels)
    return inputs


def expected_outputs(model, inputs) -> dict:
    """Outputs (eval mode: no dropout, mean latents) and per-stage losses and gradients, flat by name."""
    tensors = {f"input.{k}": v for k, v in inputs.items()}
    model.eval()
    for stage in (1, 2, 3):
        model.config.training_stage = stage
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        tensors[f"stage{stage}.loss"] = out.loss.detach()
        tensors[f"stage{stage}.logits"] = out.logits.detach()
        for name, param in model.named_parameters():
            if param.grad is not None:
                tensors[f"stage{stage}.grad.{name}"] = param.grad.detach().clone()
    for field in ("interaction_weights", "gate_weights", "component_logits", "unimodal_logits", "modality_logits",
                  "component_embeds", "modality_embeds", "modality_reliability"):
        tensors[f"output.{field}"] = getattr(out, field).detach()
    for name, value in out.loss_terms.items():
        tensors[f"term.{name}"] = value.detach()
    model.zero_grad(set_to_none=True)
    return {k: v.contiguous() for k, v in tensors.items()}


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    for name, (make_config, calibrated) in VARIANTS.items():
        torch.manual_seed(0)
        model = DmilForMultimodalClassification(make_config())
        if calibrated:
            model.dmil.reliability.calibrated.fill_(1.0)
        folder = ROOT / name
        model.save_pretrained(folder)
        for stale in folder.glob("*.py"):  # the fixture is the weights and config only, not the code of that time
            stale.unlink()
        save_file(expected_outputs(model, inputs_for(model.config)), str(folder / "expected.safetensors"))
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"wrote {ROOT} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
