"""Bases quantized by bitsandbytes: 4-bit (nf4, fp4) and 8-bit (int8) linear layers, as in QLoRA.

Adapters never change a quantized layer. LoRA, AdaLoRA, VeRA and bottlenecks add to its output,
IA³ scales its output or input, all through hooks, so they sit on ``Linear4bit``/``Linear8bitLt``
as on ``nn.Linear`` (both are subclasses of it). What needs the layer's weight as numbers (DoRA's
column norms) reads a dequantized copy (``dense_weight``). Merging is refused: an update folded
into 4-bit or 8-bit weights would be rounded away or requantized into another model.

On a CPU with AVX512-bf16, bitsandbytes repacks a 4-bit weight for a faster kernel the first time
the layer runs in eval mode without gradient, and keeps it repacked. That kernel has no backward,
so a training step after an evaluation sends no correct gradient through the base: adapters
below the last block then train on wrong gradients (measured: gradients 0.54 apart after one
evaluation on a 2-block model), silently. ``prepare_quantized`` turns that repacking off, so
evaluation and training run the same dequantize-then-matmul path on every machine.

An int8 layer in training mode on CPU also computes with its dequantized weight, but bitsandbytes
keeps every layer's input (and autograd the float32 weight) for a backward pass that, the weight
being frozen, needs neither: training over int8 took 1.02-1.15 of float32's peak memory. Our int8
training forward does the same arithmetic and keeps nothing; its backward dequantizes the weight
again, so the numbers are bitsandbytes' own, bit for bit, at less memory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import types
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI builds its parser from QUANTIZATIONS without it
    import torch
    from torch import nn

QUANTIZATIONS = ("nf4", "fp4", "int8")
PIP_COMMAND = "pip install 'adapterkit[quantize]'"


def check_quantize(quantize: str | None) -> str | None:
    """``quantize`` if it names a quantization bitsandbytes can make here, else our error."""
    if quantize is None:
        return None
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZATIONS)} (or None for full weights), "
                          f"got {quantize!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"a {quantize} base needs bitsandbytes, which is not installed: {PIP_COMMAND}")
    return quantize


def bitsandbytes_config(quantize: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantize``; 4-bit layers compute in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    # on import, bitsandbytes warns when it cannot fetch its CPU inference kernel, which adapterkit keeps off
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype)


def quantization_of(model: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8" for a base with bitsandbytes layers, None for full weights."""
    for module in model.modules():
        kind = layer_quantization(module)
        if kind is not None:
            return kind
    return None


def layer_quantization(module: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8" for one bitsandbytes linear layer, None for any other module."""
    name = type(module).__name__
    if name == "Linear8bitLt":
        return "int8"
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        state = getattr(module.weight, "quant_state", None)
        return getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "nf4")
    return None


def prepare_quantized(model: nn.Module) -> None:
    """Keep every 4-bit layer on the path that has a backward and every int8 layer on the training
    path that keeps nothing for it (see the module docstring), and let bitsandbytes say once, not at
    every int8 layer of every forward, that it casts inputs to float16."""
    kinds = set()
    for module in model.modules():
        kind = layer_quantization(module)
        kinds.add(kind)
        if kind in ("nf4", "fp4"):
            module.support_avx512bf16_for_cpu = False
        if kind == "int8":
            module.forward = types.MethodType(int8_forward, module)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if "int8" in kinds and not any(isinstance(f, OnceFilter) for f in logger.filters):
        logger.addFilter(OnceFilter())


class OnceFilter(logging.Filter):
    """Passes each distinct message the first time only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def int8_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An int8 layer's forward: bitsandbytes' own, except in training on CPU, where bitsandbytes
    multiplies by the dequantized weight and we do the same without keeping anything for backward."""
    frozen = layer.bias is None or not layer.bias.requires_grad
    if not (layer.training and x.device.type == "cpu" and frozen):
        return type(layer).forward(layer, x)
    if layer.bias is not None and layer.bias.dtype != x.dtype:  # as bitsandbytes casts it
        layer.bias.data = layer.bias.data.to(x.dtype)
    return frozen_int8_matmul().apply(x, layer)


@functools.cache
def frozen_int8_matmul() -> type:
    """``x @ W.T + b`` for an int8 layer whose weight and bias are frozen: the backward pass needs
    only the weight, which it dequantizes again, so the forward saves nothing."""
    import torch

    scratch = threading.local()

    def dequantized(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """Into one buffer per weight shape and thread: a fresh weight-sized tensor twice per layer
        and step left glibc's heap in pieces and the process larger."""
        weight = layer.weight
        buffers = vars(scratch).setdefault("buffers", {})
        key = (weight.shape, dtype, weight.device)
        if key not in buffers:
            buffers[key] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        return int8_dequantized_into(buffers[key], layer)

    class FrozenInt8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
            ctx.layer = layer
            return torch.nn.functional.linear(x, dequantized(layer, x.dtype), layer.bias)

        @staticmethod
        def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad_output @ dequantized(ctx.layer, grad_output.dtype), None

    return FrozenInt8Matmul


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as float32 numbers, dequantized from 4 or 8 bits where it is quantized
    (a copy without gradient)."""
    kind = layer_quantization(layer)
    if kind is None:
        return layer.weight
    import bitsandbytes.functional as bnb_functional
    import torch

    if kind == "int8":
        return int8_dequantized_into(torch.empty(layer.weight.shape, device=layer.weight.device), layer)
    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def int8_dequantized_into(out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``out`` filled with an int8 layer's weight in ``out``'s dtype, by bitsandbytes' arithmetic."""
    weight = layer.weight
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # they move to the state on a first forward
    out.copy_(weight.data)
    return out.mul_(scales.unsqueeze(1).mul(1.0 / 127.0))
