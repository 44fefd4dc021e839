"""Dense fine-tuning: no masks (the teacher for distillation). A model that is already sparse
is not fine-tuned with this method unless the user asks: the pipeline locks its zeros with
`transfer` instead (see `pipeline.choose_method`)."""

from __future__ import annotations

from sparsebert.methods.base import PruningMethod, register_method


@register_method
class DenseFinetune(PruningMethod):
    name = "dense"
    prunes = False
    lr_rewarm_default = False
