"""Train the head only, the body frozen bit for bit: how a model without a masked-LM head
(the embedded all-MiniLM-L6-v2 is a sentence encoder) gets one.

`sparsebert finetune --recipe mlm-head --task mlm-general --model M` loads M as a
*ForMaskedLM model (transformers adds the standard BERT head: transform + LayerNorm +
decoder tied to the word embeddings), trains only the head's own parameters (the transform,
its LayerNorm and the decoder bias; the tied decoder weight is the word embeddings and stays
frozen with the body) and saves a plain masked-LM model that `AutoModelForMaskedLM` loads and
SMP's label-word head can use. A short full fine-tune afterwards (`finetune --task
mlm-general --model <that output>`) adapts the body too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsebert.heads import is_head
from sparsebert.methods.base import PruningMethod, register_method


@register_method
class HeadOnly(PruningMethod):
    name = "head-only"
    prunes = False
    lr_rewarm_default = False

    def configure_trainable(self, model: nn.Module) -> None:
        self.trained = []
        for name, p in model.named_parameters():  # a tied weight is named once, by its owner
            p.requires_grad_(is_head(name))
            if is_head(name):
                self.trained.append(name)

    @property
    def weights_trained(self) -> bool:
        return False

    def report(self) -> dict[str, Any]:
        return {"trained": getattr(self, "trained", [])}
