"""Training an adapter: a plain loop with AdamW, warmup + cosine decay, gradient clipping and
accumulation, length-bucketed batches, periodic evaluation, and checkpoints that resume exactly.

A checkpoint is one folder, ``<output>/checkpoint``, replaced atomically: the adapter's own files
(so a checkpoint loads as an adapter), ``optimizer.safetensors`` (AdamW's moment tensors, the
torch RNG state and the method's own training state, such as AdaLoRA's rank allocation) and
``trainer_state.json`` (step, scalars). No pickle anywhere. Every record of metrics.jsonl also
goes to TensorBoard event files beside it when ``report_to="tensorboard"``. Resuming from it
gives bit-for-bit the adapter an uninterrupted run gives: the data order is a function of the seed
and the step, and the dropout RNG state is saved with the rest.

Under torchrun (several processes in one torch.distributed group) the adapter trains with
DistributedDataParallel: every rank reads a disjoint share of each global batch (rows rank,
rank + N, ...), the adapter's gradients are all-reduced, and the loss is the mean over the whole
global batch's completion tokens, as one process would compute it. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from . import distributed
from .data import IGNORE_INDEX, TokenizedExample, collate, length_bucketed_batches, tokenize_all
from .errors import ConfigError, TrainingError
from .evaluate import METRICS, evaluate
from .io import (
    WEIGHTS_FILE,
    read_adapter_config,
    read_tensors,
    remove_interrupted_writes,
    with_prompt_template,
    write_folder_atomically,
)
from .io.folders import write_files_atomically
from .loss import training_loss
from .methods import dataclass_from_dict
from .templates import check_template

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_PREFIX = "adapter_state."  # in OPTIMIZER_FILE: AdapterModel.training_state's tensors
REPORT_TO = ("none", "tensorboard")
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # SummaryWriter's file names
MAX_LR = 1.0  # AdamW moves each weight by about lr a step: beyond this nothing trains (and float32 overflows)


@dataclasses.dataclass
class TrainConfig:
    """How to train. ``steps`` wins over ``epochs``; with neither, one epoch."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 128
    eval_every: int = 0  # 0: evaluate only at the end (when there is eval data)
    save_every: int = 0  # 0: no intermediate checkpoints
    metric: str = "chrf"
    eval_batch_size: int = 32
    max_new_tokens: int = 48
    progress: bool = True
    report_to: str = "none"  # "tensorboard": event files beside metrics.jsonl

    def __post_init__(self) -> None:
        for field in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ConfigError(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}")
        if not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"lr must be positive and at most {MAX_LR:g} (adapters train at 1e-4 to 1e-2), "
                              f"got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric {self.metric!r} is not one of {list(METRICS)}")
        if self.eval_every < 0 or self.save_every < 0:
            raise ConfigError("eval_every and save_every must be 0 (off) or positive")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to must be one of {list(REPORT_TO)}, got {self.report_to!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "training option", "options")


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to ``config.lr``, then cosine decay to zero at ``total_steps``."""
    warmup = int(total_steps * config.warmup_ratio)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps in the run: ``steps``, or ``epochs`` (default 1) over the data."""
    if config.steps is not None:
        return config.steps
    batches_per_epoch = math.ceil(n_examples / config.batch_size)
    return max(1, math.ceil((config.epochs or 1.0) * batches_per_epoch / config.grad_accum))


def earlier_run(output_dir: str | Path) -> list[str]:
    """The files and folders an earlier run left in an output folder, which a new run would overwrite."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    ours = [name for name in (ADAPTER_DIR, CHECKPOINT_DIR, METRICS_FILE, LOSS_PLOT) if (folder / name).exists()]
    return ours + sorted(path.name for path in folder.glob(TENSORBOARD_EVENTS))


def clear_run(output_dir: str | Path) -> None:
    """Delete what ``earlier_run`` lists (and nothing else of the folder)."""
    for name in earlier_run(output_dir):
        path = Path(output_dir) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def write_output_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file of the run (loss.png, metrics.jsonl) atomically: a failed write keeps the old
    file and leaves no partial one, and is a TrainingError naming the file."""
    try:
        write_files_atomically({path: write})
    except OSError as error:
        raise TrainingError(f"cannot write {path}: {error.strerror or error}") from None


def checkpoint_step(output_dir: str | Path) -> int | None:
    """The step of the checkpoint in a run's output folder (None when it has none)."""
    path = Path(output_dir) / CHECKPOINT_DIR / STATE_FILE
    return json.loads(path.read_text())["step"] if path.is_file() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics file: a line that is not a JSON object with an integer
    "step" (the torn end of a write a kill interrupted) is skipped rather than stopping a resume."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


class LossModule(nn.Module):
    """``training_loss`` as a module, the unit DistributedDataParallel wraps: it all-reduces the
    gradients of the parameters that require grad (the adapter's) and of nothing else."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], tokens: float | None = None) -> torch.Tensor:
        return training_loss(self.model, batch, tokens)


class Trainer:
    """Trains the parameters of ``model`` that require grad on prompt/completion examples.

    With ``adapter_name`` (an AdapterModel's adapter) it checkpoints and saves that adapter; without
    it (full fine-tuning, for comparisons) it only trains. Batches go to the model's device.
    ``gradient_checkpointing`` recomputes each block's activations in the backward pass. In a
    torch.distributed process group (torchrun) it trains data-parallel over the ranks.
    ``prompt_template`` is recorded in the saved adapter (and its checkpoints): the format of the
    examples' prompts, which generation then applies by default (``adapterkit.templates``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        train_examples: list[dict],
        config: TrainConfig,
        output_dir: str | Path,
        eval_examples: list[dict] | None = None,
        adapter_name: str | None = None,
        gradient_checkpointing: bool = False,
        prompt_template: str | None = None,
    ) -> None:
        if adapter_name is None and config.save_every:
            raise ConfigError("checkpoints need an adapter to save: pass adapter_name or set save_every=0")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.output_dir = Path(output_dir)
        self.eval_examples = eval_examples or []
        self.adapter_name = adapter_name
        self.prompt_template = check_template(prompt_template)
        self._tensorboard = None
        if adapter_name is not None:
            model.train_adapter(adapter_name)
        self.examples: list[TokenizedExample] = tokenize_all(train_examples, tokenizer, config.max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.batches_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        self.total_steps = planned_steps(len(self.examples), config)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ConfigError("nothing to train: no parameter of the model requires grad")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.loss = LossModule(model)
        if self.world > 1:
            self.loss = distributed.data_parallel(self.loss, self.parameters)
        torch.manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self._epoch_batches: tuple[int, list[list[int]]] | None = None

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run to ``total_steps``; returns the final evaluation (or {} without eval data)."""
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name in (CHECKPOINT_DIR, ADAPTER_DIR):
                remove_interrupted_writes(self.output_dir, name)
        distributed.barrier()  # the other ranks read the checkpoint only once rank 0 has tidied
        if resume and (self.output_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
            self._restore()
        self._trim_metrics()
        self._tensorboard = self._open_tensorboard()
        try:
            return self._train()
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None

    def _train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.config.progress or self.rank != 0, dynamic_ncols=True)
        tokens_seen, started = 0, time.perf_counter()
        try:
            while self.step < self.total_steps:
                tic = time.perf_counter()
                loss, tokens = self._optimizer_step()
                seconds = time.perf_counter() - tic
                self.step += 1
                tokens_seen += tokens
                rate = tokens_seen / (time.perf_counter() - started)
                self._log({"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "tokens": tokens, "seconds": seconds})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
                    self._evaluate()
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
        except BaseException:
            self._plot_losses_if_possible()
            raise
        finally:
            bar.close()
            self.model.train(was_training)
        self._plot_losses_if_possible()  # a first look before the evaluation; failing here must not lose the adapter
        result = self._evaluate() if self.eval_examples else {}
        if self.adapter_name is not None and self.rank == 0:
            write_folder_atomically(self.output_dir / ADAPTER_DIR, self._adapter_files(), "the trained adapter")
        self.plot_losses()
        return result

    def _optimizer_step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` batches; returns (mean loss, tokens read)."""
        lr = lr_at(self.step, self.total_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss, tokens = 0.0, 0
        for micro in range(self.config.grad_accum):
            examples = self._batch_examples(self.step * self.config.grad_accum + micro)
            last = micro == self.config.grad_accum - 1
            with nullcontext() if last or self.world == 1 else self.loss.no_sync():  # all-reduce once per step
                loss = self._loss(examples)
                value = distributed.average(loss.detach())  # the global batch's loss, the same on every rank
                if not torch.isfinite(value):
                    raise TrainingError(
                        f"the loss became {value.item()} at step {self.step + 1}; training stopped. "
                        f"{self._last_good_checkpoint()} Try a lower learning rate (now {lr:.2e}) or check the data"
                    )
                (loss / self.config.grad_accum).backward()
            total_loss += value.item() / self.config.grad_accum
            tokens += sum(len(e.input_ids) for e in examples)
        if self.config.max_grad_norm:
            nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        if self.adapter_name is not None:
            self.model.step(self.step + 1)  # AdaLoRA's rank allocation (reads the gradients); else a no-op
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def _loss(self, examples: list[TokenizedExample]) -> torch.Tensor:
        """This rank's loss on its share of a global batch, scaled so that the ranks' gradients,
        averaged by the all-reduce, are those of the global batch's mean loss. A rank left without
        rows (a batch smaller than the world) runs one row that carries no loss, since every rank
        must join the all-reduce."""
        if self.world == 1:
            return self.loss(collate(examples, self.pad_id))
        share = examples[self.rank :: self.world]
        if not share:
            share = [TokenizedExample(examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].labels))]
        completion_tokens = sum(label != IGNORE_INDEX for e in examples for label in e.labels[1:])
        return self.loss(collate(share, self.pad_id), max(1, completion_tokens) / self.world)

    def _batch_examples(self, index: int) -> list[TokenizedExample]:
        """The ``index``-th global batch of the run: a pure function of the seed (neither of the
        state nor of the number of ranks), so resuming needs no state."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            lengths = [len(e.input_ids) for e in self.examples]
            self._epoch_batches = (epoch, length_bucketed_batches(lengths, self.config.batch_size, self.config.seed,
                                                                  epoch))
        return [self.examples[i] for i in self._epoch_batches[1][position]]

    def _evaluate(self) -> dict[str, Any]:
        if not self.eval_examples:
            return {}
        result = evaluate(
            self.model, self.tokenizer, self.eval_examples, self.config.metric,
            self.config.eval_batch_size, self.config.max_new_tokens, self.config.max_length,
        )
        record = {"step": self.step, "eval_loss": result["loss"]}
        if self.config.metric != "none":
            record[f"eval_{self.config.metric}"] = result[self.config.metric]
        self._log(record)
        return result

    # ---- records -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        path = self.output_dir / METRICS_FILE
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise TrainingError(f"cannot write {path}: {error.strerror or error}") from None
        if self._tensorboard is not None:  # HF Trainer's names: train/loss, eval/loss, ...
            for key, value in record.items():
                if key != "step":
                    tag = ("eval/" + key.removeprefix("eval_") if key.startswith("eval_")
                           else "train/" + {"lr": "learning_rate"}.get(key, key))
                    self._tensorboard.add_scalar(tag, value, record["step"])

    def _open_tensorboard(self):
        """A SummaryWriter into the output folder (rank 0, when asked); a resumed run first drops
        the events a killed run wrote after its checkpoint."""
        if self.config.report_to != "tensorboard" or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("report_to='tensorboard' needs the tensorboard package: "
                              "pip install 'adapterkit[train]'") from None
        return SummaryWriter(log_dir=str(self.output_dir), purge_step=self.step or None)

    def _trim_metrics(self) -> None:
        """Drop records written after the step training restarts from (a killed run's tail), and
        the torn line a kill in the middle of a write leaves."""
        path = self.output_dir / METRICS_FILE
        if self.rank != 0 or not path.exists():
            return
        text = "".join(json.dumps(record) + "\n" for record in read_metrics(path) if record["step"] <= self.step)
        write_output_file(path, lambda handle: handle.write(text.encode("utf-8")))

    def plot_losses(self) -> None:
        """loss.png: training loss per step, and eval loss where it was measured (rank 0 only)."""
        path = self.output_dir / METRICS_FILE
        if self.rank != 0 or not path.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        figure, axes = plt.subplots(figsize=(6, 3.5))
        if train:
            axes.plot(*zip(*train), label="train loss", linewidth=1)
        if held:
            axes.plot(*zip(*held), "o-", label="eval loss")
        axes.set_xlabel("step")
        axes.set_ylabel("loss (per completion token)")
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        try:
            write_output_file(self.output_dir / LOSS_PLOT, lambda file: figure.savefig(file, format="png", dpi=100))
        finally:
            plt.close(figure)

    def _plot_losses_if_possible(self) -> None:
        """loss.png where a failure to write it must not hide why a run stopped (the full disk that
        stopped it, say) nor keep the trained adapter from being saved."""
        try:
            self.plot_losses()
        except TrainingError:
            pass

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write <output>/checkpoint atomically: it is either the previous complete one or this one.
        Rank 0 writes it; every rank holds the same adapter and optimizer state."""
        if self.rank != 0:
            return
        state = self.optimizer.state_dict()
        tensors = {"rng.torch": torch.get_rng_state()}
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{index}.{key}"] = value.contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        for key, value in self.model.training_state(self.adapter_name).items():
            tensors[TRAINING_STATE_PREFIX + key] = value.contiguous()
        document = {
            "step": self.step,
            "total_steps": self.total_steps,
            "config": dataclasses.asdict(self.config),
            "param_groups": state["param_groups"],
            "scalar_state": scalars,
        }
        files = {
            OPTIMIZER_FILE: save_safetensors_bytes(tensors),
            STATE_FILE: (json.dumps(document, indent=2) + "\n").encode(),
            **self._adapter_files(),  # its config file goes last
        }
        write_folder_atomically(self.output_dir / CHECKPOINT_DIR, files, "the checkpoint")

    def _adapter_files(self) -> dict[str, bytes]:
        return with_prompt_template(self.model.adapter_files(self.adapter_name), self.prompt_template)

    def _restore(self) -> None:
        folder = self.output_dir / CHECKPOINT_DIR
        document = json.loads((folder / STATE_FILE).read_text())
        if document["total_steps"] != self.total_steps:
            raise ConfigError(
                f"the checkpoint in {folder} belongs to a run of {document['total_steps']} steps, this one has "
                f"{self.total_steps}; resume with the same options or use another output folder"
            )
        self._check_same_adapter_options(folder)
        weights = read_tensors(folder / WEIGHTS_FILE)
        tensors = read_tensors(folder / OPTIMIZER_FILE)
        training_state = {key.removeprefix(TRAINING_STATE_PREFIX): t for key, t in tensors.items()
                          if key.startswith(TRAINING_STATE_PREFIX)}
        self.model.load_training_state(self.adapter_name, weights, training_state)
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = tensor
        for index, entry in document["scalar_state"].items():
            state.setdefault(int(index), {}).update(entry)
        self.optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.step = document["step"]

    def _check_same_adapter_options(self, folder: Path) -> None:
        """A checkpoint only resumes the adapter it was saved from; other options would meet its
        tensors with wrong shapes, or silently continue a different adapter."""
        saved = read_adapter_config(folder)
        current = self.model.adapters[self.adapter_name]
        ours = json.loads(json.dumps(current.to_dict()))
        theirs = saved["config"]
        if saved["method"] != current.method:
            differences = [f"method: {saved['method']!r} there, {current.method!r} here"]
        else:
            differences = [
                f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here"
                for key in sorted(set(ours) | set(theirs))
                if key not in current.set_by_training and theirs.get(key) != ours.get(key)
            ]
        if differences:
            raise ConfigError(
                f"the checkpoint in {folder} was saved from an adapter with other options ({'; '.join(differences)}); "
                "resume with the same adapter options or use another output folder"
            )

    def _last_good_checkpoint(self) -> str:
        step = checkpoint_step(self.output_dir)
        if step is not None:
            return f"The last good checkpoint (step {step}) is kept in {self.output_dir / CHECKPOINT_DIR}."
        return "No checkpoint had been saved yet."

