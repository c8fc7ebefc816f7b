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
"""

from __future__ import annotations

import importlib.util
import logging
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
    """Keep every 4-bit layer on the path that has a backward (see the module docstring), and let
    bitsandbytes say once, not at every int8 layer of every forward, that it casts inputs to float16."""
    kinds = set()
    for module in model.modules():
        kind = layer_quantization(module)
        kinds.add(kind)
        if kind in ("nf4", "fp4"):
            module.support_avx512bf16_for_cpu = False
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


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as floating-point numbers, dequantized from 4 or 8 bits where it is
    quantized (a copy without gradient)."""
    kind = layer_quantization(layer)
    if kind is None:
        return layer.weight
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if kind == "int8":  # the row scales move from the weight to the layer's state on its first forward
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB
        return weight.data.float() * scales.float()[:, None] / 127
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
