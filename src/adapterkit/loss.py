"""The training loss: mean cross-entropy over the completion tokens, without a [tokens, vocabulary]
tensor when the head is frozen, as it is under every adapter.

With SmolLM2's 49k-word vocabulary a batch of 8 × 128 tokens has 192 MiB of logits, and a
cross-entropy over them keeps those and their log-probabilities alive at the end of the forward
pass, when a training step's memory peaks. When the model's logits are exactly a frozen head's
product (a plain ``nn.Linear`` holding its whole weight, nothing attached to it, nothing done to
its output: no soft-capping or scaling), the head and the loss run here together over chunks of
rows, and each chunk's gradient is turned at once into the hidden states' gradient, the one thing
kept. Whether the logits are the head's product is seen, not assumed: a one-token pass watches
the head's call (once per head, with the random state put back, so the dropout masks stay a
plain run's), and every step's own pass confirms it (an adapter put on the head later is seen,
and the step runs again the plain way, with the same masks). Otherwise, and in full fine-tuning,
whose head's weight gradient needs every row's logit gradient, the loss takes the head's logits
over the completion positions.

Measured with bench/peers.py on the default base (8 × 128 tokens, 2 CPU cores): a Houlsby step's
resident peak went from 2,808 MiB to 2,654 with the fused loss, and to 2,516 with the recomputed
activations below (full fine-tuning's from 4,069 to 3,931 MiB, the activations alone); the step
time did not change beyond the runs' spread.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX
from .evaluate import completion_logits

# The fused head and loss take logits over chunks of 512 rows, whose products run as fast as a
# whole batch's, and log-softmax over parts of 2**21 numbers (8 MiB). On 2 CPU cores, the head, loss
# and gradient of 1,024 rows of SmolLM2's vocabulary took 1.41 s in chunks of 170 rows, 1.19 s in
# chunks of 341, 1.14-1.15 s in chunks of 512 (parts of 21 to 170 rows alike) and 1.16 s unchunked.
CHUNK_ROWS = 512
PART_ELEMENTS = 2**21
_LOGITS_ARE_THE_HEADS_PRODUCT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], tokens: float | None = None) -> torch.Tensor:
    """Mean cross-entropy over the batch's completion tokens, plus the adapters' regularization
    (AdaLoRA's orthogonality penalty). The same value as ``model(**batch).loss``, computed with the
    LM head on completion positions only. With ``tokens``, the summed cross-entropy is divided by
    it instead of by the batch's own count: a rank's part of a larger batch's mean."""
    summed, count = summed_completion_loss(model, batch)
    loss = summed / (count if tokens is None else tokens)
    regularization = getattr(model, "regularization_loss", None)  # a plain base (full fine-tuning) has none
    return loss + regularization() if regularization else loss


def summed_completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of completion tokens) of a batch with ``labels``."""
    head = model.get_output_embeddings()
    if head is not None:
        device = head.weight.device
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        if fusable(model, head, inputs):
            targets = batch["labels"][:, 1:].to(device)
            keep = targets != IGNORE_INDEX
            restore_random_state = random_state_restorer(device)
            with HeadWatch(head, keep, run_head=False) as watch, activations_recomputed():
                logits = model(**inputs).logits
            if watch.made(logits):
                summed = HeadCrossEntropy.apply(watch.selected, head.weight, head.bias, targets[keep],
                                                torch.is_grad_enabled())
                return summed, int(keep.sum())
            _LOGITS_ARE_THE_HEADS_PRODUCT[head] = False  # something took hold of the head since it was checked
            restore_random_state()  # the pass again, with the dropout masks it had
    with activations_recomputed():
        logits, targets = completion_logits(model, batch)
    return SummedCrossEntropy.apply(logits.float(), targets), targets.numel()


def fusable(model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Whether the loss may take the head's product itself: ``head`` is a plain, frozen
    ``nn.Linear`` with its whole weight (not an FSDP shard), and a one-token pass shows the model
    returning exactly what the head's own forward made of exactly what the model gave it."""
    if type(head) is not nn.Linear or isinstance(head.weight, distributed_tensor_type()):
        return False
    if any(parameter.requires_grad for parameter in head.parameters()):
        return False
    if head not in _LOGITS_ARE_THE_HEADS_PRODUCT:
        one_token = {key: tensor[:1, :1] for key, tensor in inputs.items()}
        nothing = torch.ones(1, 0, dtype=torch.bool, device=head.weight.device)
        restore_random_state = random_state_restorer(head.weight.device)
        with torch.no_grad(), HeadWatch(head, nothing, run_head=True) as watch:
            logits = model(**one_token).logits
        restore_random_state()
        _LOGITS_ARE_THE_HEADS_PRODUCT[head] = watch.made(logits)
    return _LOGITS_ARE_THE_HEADS_PRODUCT[head]


def distributed_tensor_type() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.tensor import DTensor

    return (DTensor,)


def random_state_restorer(device: torch.device) -> Callable[[], None]:
    """A function that puts the random state of the CPU and of ``device`` back to what it is now."""
    cpu = torch.random.get_rng_state()
    accelerator = None if device.type == "cpu" else torch.get_device_module(device.type)
    on_device = None if accelerator is None else accelerator.get_rng_state(device)

    def restore() -> None:
        torch.random.set_rng_state(cpu)
        if accelerator is not None:
            accelerator.set_rng_state(on_device, device)

    return restore


# activations whose backward keeps their input: (node's class name, the output from that node)
RECOMPUTABLE = {
    "SiluBackward0": lambda node: nn.functional.silu(node._saved_self),
    "GeluBackward0": lambda node: nn.functional.gelu(node._saved_self, approximate=node._saved_approximate),
}


@contextmanager
def activations_recomputed() -> Iterator[None]:
    """Saved activations recomputed in the backward pass from what autograd keeps anyway: where an
    op saves a SiLU's or GELU's output (SwiGLU's silu(gate) * up keeps silu(gate) and up), the
    output is made again from the input that the activation's own backward keeps, bit for bit
    the same. On the default base that is one 1,536-wide tensor a block, 180 MiB of a batch of
    8 × 128 tokens, for 47 M SiLUs more a step."""

    def pack(tensor: torch.Tensor) -> Any:
        recompute = RECOMPUTABLE.get(type(tensor.grad_fn).__name__)
        return tensor if recompute is None else (recompute, tensor.grad_fn)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        recompute, node = packed
        with torch.no_grad():
            return recompute(node)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class HeadWatch:
    """Hooks on the LM head for one forward pass: its input narrowed to the completion positions
    (``selected``), given to the head itself only with ``run_head``, and a record of what the
    head's own forward received and returned, to tell whether the model's logits are that."""

    def __init__(self, head: nn.Module, keep: torch.Tensor, run_head: bool) -> None:
        self.head, self.keep, self.run_head = head, keep, run_head
        self.selected = self.given = self.received = self.returned = None

    def __enter__(self) -> HeadWatch:
        self.handles = [self.head.register_forward_pre_hook(self.select, prepend=True),
                        self.head.register_forward_hook(self.record, prepend=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def select(self, module: nn.Module, args: tuple) -> tuple:
        self.selected = args[0][:, :-1][self.keep]
        self.given = self.selected if self.run_head else self.selected[:0]
        return (self.given, *args[1:])

    def record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.received, self.returned = args[0], output

    def made(self, logits: torch.Tensor) -> bool:
        """Whether ``logits`` are the head's own product of what this watch gave it."""
        return self.received is self.given and logits is self.returned


class SummedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``logits`` [tokens, vocabulary] against ``targets`` [tokens].

    torch's cross_entropy (log-softmax, then NLL) spends a tenth of a Houlsby step on the default
    base in its backward pass: NLL's gradient is a zero-filled [tokens, vocabulary] tensor with one
    entry per row, which log-softmax's backward then reads beside its saved output to write a third
    such tensor. The gradient is softmax minus the one-hot targets, so this backward turns the
    saved log-probabilities into it in place: one pass and no new [tokens, vocabulary] tensor
    (which is why a second backward through the same graph is refused, as autograd refuses any
    tensor changed in place)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, targets)
        return -log_probs.gather(1, targets[:, None]).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, targets = ctx.saved_tensors
        gradient = log_probs.exp_()
        gradient[torch.arange(len(targets), device=targets.device), targets] -= 1
        return gradient.mul_(grad), None


class HeadCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``hidden @ weight.T + bias`` [tokens, vocabulary] against
    ``targets`` for a frozen head, taken over chunks of rows: each chunk's logits become its
    softmax minus the one-hot targets in place (the gradient of its logits; log-softmax over
    smaller parts, so the only other vocabulary-wide tensor is a part's), which one product turns
    into the hidden states' gradient. That gradient alone is kept for the backward pass, scaled
    there in place (so, as for ``SummedCrossEntropy``, a second backward through the same graph is
    refused). ``differentiable`` is False under ``torch.no_grad``: no gradient then."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, differentiable: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        gradient_of_hidden = torch.empty_like(hidden) if differentiable else None
        rows, part_rows = CHUNK_ROWS, max(1, PART_ELEMENTS // weight.shape[0])
        for start in range(0, len(hidden), rows):
            chunk_targets = targets[start:start + rows]
            logits = nn.functional.linear(hidden[start:start + rows], weight, bias).float()
            for part_start in range(0, len(logits), part_rows):
                part = logits[part_start:part_start + part_rows]
                log_probs = torch.log_softmax(part, dim=-1)
                total -= log_probs.gather(1, chunk_targets[part_start:part_start + part_rows, None]).sum()
                if differentiable:
                    torch.exp(log_probs, out=part)
            if differentiable:
                logits[torch.arange(len(chunk_targets), device=targets.device), chunk_targets] -= 1
                torch.mm(logits.to(weight.dtype), weight, out=gradient_of_hidden[start:start + rows])
        ctx.save_for_backward(gradient_of_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gradient_of_hidden,) = ctx.saved_tensors
        return gradient_of_hidden.mul_(grad), None, None, None, None
