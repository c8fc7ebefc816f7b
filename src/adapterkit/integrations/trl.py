"""``AdapterSFTTrainer``: TRL's ``SFTTrainer`` over an ``AdapterModel``, with the checkpoints,
resumes, best-model loading and per-step method work of ``integrations.hf.AdapterTrainerMixin``.

``SFTTrainer`` takes an ``AdapterModel`` as it is (TRL's data preparation, completion-only loss on
prompt/completion data, its collator). Its loss does not call the model's forward: TRL patches
``model.forward`` with a "fused LM head" that runs the backbone and multiplies the hidden states by
``lm_head.weight`` itself, so the adapter's regularization is added by the mixin, and an adapter on
the output embeddings (which would neither run nor train there) is refused when the trainer is made.
"""

from __future__ import annotations

from trl import SFTTrainer

from ..errors import ConfigError
from ..model import AdapterModel
from .hf import AdapterTrainerMixin


class AdapterSFTTrainer(AdapterTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` for an ``AdapterModel``: adapter-only checkpoints, exact resumes,
    ``load_best_model_at_end``, and AdaLoRA's rank allocation and penalty."""

    def __init__(self, model, *args, **kwargs) -> None:
        if isinstance(model, AdapterModel):
            _check_output_embeddings(model)
        super().__init__(model, *args, **kwargs)


def _check_output_embeddings(model: AdapterModel) -> None:
    """TRL computes the log-probabilities from ``lm_head.weight`` directly: no active adapter may act there."""
    head = model.base.get_output_embeddings()
    for name in model.active:
        for site in model.adapter_sites(name):
            if model.base.get_submodule(site.module_name) is head:
                raise ConfigError(
                    f"adapter {name!r} acts on {site.module_name}, the output embeddings; TRL's SFTTrainer computes "
                    "the log-probabilities from their weight directly, so it would neither run nor train there. "
                    "Leave that module out of the adapter's target_modules, or train with "
                    "adapterkit.integrations.hf.AdapterTrainer"
                )
