"""``AdapterTrainer``: ``transformers.Trainer`` for an ``AdapterModel``, in one import.

The plain Trainer trains an ``AdapterModel`` as it is, but saves any model that is not a
``PreTrainedModel`` (or peft's ``PeftModel``) as its whole ``state_dict()``, base included, loads
that file to resume or to pick the best model, and knows nothing of a method's per-step work.
transformers offers no hook for other adapter libraries there, so ``AdapterTrainerMixin`` replaces
the methods that do it, for ``AdapterTrainer`` here and ``integrations.trl.AdapterSFTTrainer``:

- ``checkpoint-N/`` and ``save_model()`` hold the trained adapter as ``save_adapter`` writes it
  (adapter_config.json + adapter_model.safetensors, see ``AdapterModel.save_pretrained``) plus
  what the Trainer adds (optimizer, scheduler, RNG and trainer state, training_args.bin) and,
  for a method that carries state between steps (AdaLoRA's importance averages), that state next
  to the optimizer's (``TRAINING_STATE_FILE``);
- ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` put the checkpoint's adapter
  (and that state) back into the model in place;
- after each optimizer step, while the gradients are there, ``AdapterModel.step`` runs the
  method's work (AdaLoRA's rank allocation), and the loss gets the method's regularization
  (AdaLoRA's orthogonality penalty) once per optimizer step, whatever the gradient accumulation
  and the number of processes.

Any other model goes to the Trainer's own code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import find_labels

from ..errors import AdapterFileError
from ..io import CONFIG_FILE, read_tensors, tensors_to_bytes
from ..model import AdapterModel

TRAINING_ARGS_FILE = "training_args.bin"  # transformers' TRAINING_ARGS_NAME
TRAINING_STATE_FILE = "adapter_training_state.safetensors"  # AdapterModel.training_state, in a checkpoint


class AdapterTrainerMixin:
    """Gives a ``transformers.Trainer`` subclass adapter-only checkpoints of an ``AdapterModel``,
    exact resumes and best-model loading from them, and the adapter method's per-step work.
    Put it first: ``class MyTrainer(AdapterTrainerMixin, Trainer)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_MethodStep())
        model = self._adapter_model()
        if model is not None and self.args.label_names is None:
            # the Trainer looks for them in the model class's forward, where AdapterModel cannot name
            # the base's; without them evaluation computes no loss (no eval_loss, no best model)
            self.label_names = find_labels(type(model.base))

    def _adapter_model(self) -> AdapterModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, AdapterModel) else None

    # ---- the loss ----------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The Trainer's loss plus the adapter's regularization, which counts once per optimizer
        step: added by the forward, it would be scaled as the task loss is (times the number of
        processes, once per micro-batch) or missing (TRL's loss does not call the forward)."""
        adapter_model = self._adapter_model()
        if adapter_model is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with adapter_model.task_loss_only():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        steps = self.current_gradient_accumulation_steps if self._loss_spans_the_step(num_items_in_batch) else 1
        loss = loss + adapter_model.regularization_loss() / steps
        return (loss, outputs) if return_outputs else loss

    def _loss_spans_the_step(self, num_items_in_batch) -> bool:
        """Whether the Trainer takes ``compute_loss``'s value as a share of the whole optimizer
        step's loss (normalised by ``num_items_in_batch``, the step's token count) rather than
        dividing it by the accumulation steps: transformers' rule, ``Trainer.loss_is_scaled_for_ga``."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        return normalised or self.compute_loss_func is not None

    # ---- checkpoints -------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter alone (the Trainer would write the whole state_dict, base included)."""
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

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The method's training state goes with the optimizer's: what a resume needs, not the adapter."""
        super()._save_optimizer_and_scheduler(output_dir)
        model = self._adapter_model()
        if model is None or model.trained_adapter is None or not self.args.should_save:
            return
        state = model.training_state(model.trained_adapter)
        if state:
            Path(output_dir, TRAINING_STATE_FILE).write_bytes(tensors_to_bytes(state))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """In place, so that the optimizer the Trainer restores next holds the same parameters."""
        adapter_model = self._adapter_model() if model is None else model
        if not isinstance(adapter_model, AdapterModel) or not (Path(resume_from_checkpoint) / CONFIG_FILE).exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _restore(adapter_model, Path(resume_from_checkpoint))
        return None

    def _load_best_model(self) -> None:
        """The best checkpoint's adapter (the Trainer looks for a whole model.safetensors there)."""
        model = self._adapter_model()
        folder = Path(self.state.best_model_checkpoint)
        if model is None or not (folder / CONFIG_FILE).exists():
            return super()._load_best_model()
        _restore(model, folder)
        return None


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` for an ``AdapterModel``: adapter-only checkpoints, exact resumes,
    ``load_best_model_at_end``, and AdaLoRA's rank allocation and penalty without a callback."""


class _MethodStep(TrainerCallback):
    """``AdapterModel.step`` after each optimizer step: ``on_optimizer_step`` comes before the
    gradients are cleared and before ``state.global_step`` counts the step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if isinstance(model, AdapterModel):
            model.step(state.global_step + 1)


def _restore(model: AdapterModel, folder: Path) -> None:
    """Put the trained adapter back as the checkpoint ``folder`` holds it, with its method's state."""
    name = model.trained_adapter
    state_file = folder / TRAINING_STATE_FILE
    if state_file.exists():
        model.load_adapter_weights(folder, name, read_tensors(state_file))
        return
    if name is not None and model.training_state(name):
        raise AdapterFileError(
            f"{folder} holds no {TRAINING_STATE_FILE}, which adapter {name!r} ({model.adapters[name].method}) "
            "needs to be put back as it was (its method's state between steps: AdaLoRA's importance averages and "
            "pruned ranks); save_only_model=True leaves it out of checkpoints with the optimizer state: train without "
            "save_only_model to resume or to load the best model"
        )
    model.load_adapter_weights(folder, name)
