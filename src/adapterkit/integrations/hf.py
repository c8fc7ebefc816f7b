"""``AdapterTrainer``: ``transformers.Trainer`` whose checkpoints hold only the adapter.

The plain Trainer trains an ``AdapterModel`` as it is, but saves any model that is not a
``PreTrainedModel`` (or peft's ``PeftModel``) as its whole ``state_dict()``, base included, and
resumes by loading that file. transformers offers no hook for other adapter libraries there, so
this subclass overrides the two methods that do it, ``_save`` and ``_load_from_checkpoint``:

- ``checkpoint-N/`` and ``save_model()`` hold the trained adapter as ``save_adapter`` writes it
  (adapter_config.json + adapter_model.safetensors, see ``AdapterModel.save_pretrained``) plus
  what the Trainer adds (optimizer, scheduler, RNG and trainer state, training_args.bin);
- ``train(resume_from_checkpoint=...)`` copies the checkpoint's adapter back into the model in
  place before the optimizer state is restored.

Any other model goes to the Trainer's own code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer

from ..io import CONFIG_FILE
from ..model import AdapterModel

TRAINING_ARGS_FILE = "training_args.bin"  # transformers' TRAINING_ARGS_NAME


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` for an ``AdapterModel``: adapter-only checkpoints, and resuming from them."""

    def _adapter_model(self) -> AdapterModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, AdapterModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        adapter_model = self._adapter_model() if model is None else model
        if not isinstance(adapter_model, AdapterModel) or not (Path(resume_from_checkpoint) / CONFIG_FILE).exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        adapter_model.load_adapter_weights(resume_from_checkpoint, adapter_model._trained)
        return None
