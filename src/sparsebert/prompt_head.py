"""A sequence classifier made of a masked-LM model: logits = MLM scores of the label words at
the [MASK] position (SMP's head, so that nothing but masks has to be learned).

Only the [MASK] position goes through the MLM head (not every position over the whole
vocabulary), which keeps the cost of the head at B x vocab instead of B x L x vocab.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from sparsebert.errors import SparseBertError
from sparsebert.heads import is_finetuned, is_mlm_head

MLM_HEAD_ATTRS = ("cls", "lm_head", "predictions")
"""Attributes of a *ForMaskedLM model that hold its whole vocabulary head as one module
(called on the [MASK] positions only); other models go through their full forward."""


def has_mlm_head(path: str) -> bool:
    """Whether the checkpoint at ``path`` stores trained masked-LM head weights (not just an
    architecture name: a sentence-embedding BertModel has none, and loading it as
    *ForMaskedLM would silently create a random head)."""
    import json
    import os

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if not is_finetuned(config, "masked-lm"):
        return False
    keys: list[str] = []
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            keys = list(f.keys())
    elif os.path.isfile(index):
        with open(index) as f:
            keys = list(json.load(f)["weight_map"])
    else:
        return True  # a hub model or a .bin checkpoint whose architecture says it has one
    return any(is_mlm_head(k) for k in keys)


class PromptClassifier(nn.Module):
    """Wraps a *ForMaskedLM model; forward returns class logits read at the [MASK] token."""

    def __init__(self, mlm: nn.Module, mask_token_id: int, label_word_ids: list[int]):
        super().__init__()
        self.mlm = mlm
        self.config = mlm.config
        self.mask_token_id = int(mask_token_id)
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids, dtype=torch.long),
                             persistent=False)
        # plain references, not submodules: the parameters belong to `mlm` only (one name each)
        head = next((getattr(mlm, a) for a in MLM_HEAD_ATTRS if hasattr(mlm, a)), None)
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_encoder", getattr(mlm, mlm.base_model_prefix, None))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        is_mask = input_ids == self.mask_token_id
        if not bool(torch.all(is_mask.any(dim=1))):
            raise SparseBertError("an input has no [MASK] token: tokenise it with the task's prompt")
        first = is_mask.float().argmax(dim=1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self._head is not None and self._encoder is not None:
            hidden = self._encoder(input_ids=input_ids, **kwargs)[0]
            vocab_logits = self._head(hidden[rows, first])
        else:
            vocab_logits = self.mlm(input_ids=input_ids, **kwargs).logits[rows, first]
        logits = vocab_logits[:, self.label_word_ids]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
