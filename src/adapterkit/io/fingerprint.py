"""A fingerprint of a base model, so an adapter is never silently applied to a different model.

It names the architecture, hashes the names and shapes of the parameters, and hashes the weights.
The same base in another dtype or on another device is the same base: the shapes hash leaves the
dtype out, and the weights are hashed as held ("dtype", "weights_sha256") and, for a float32
base, also as they read when cast to each half dtype ("weights_sha256_as"), which is exactly what
``load_base(dtype=...)`` or ``.to(dtype)`` makes of them. So an adapter saved over a float32 base
is verified over its bfloat16 or float16 copy, and one saved over a copy is verified over the
float32 base (by casting it); only two different half copies cannot be compared.

A base quantized by bitsandbytes (nf4, fp4, int8) records the fingerprint of the float32 weights
it was quantized from, read from its files, plus "quantized": its kind. An adapter trained over
the nf4 copy so loads over the float32 base and the other way round, with a warning that says it
runs over weights quantized otherwise than those it was trained on; another base is refused.

Hashing reads every byte of the base (about 0.3 s for 135M parameters, twice that with the half
casts of a float32 base), so the result is kept for the life of the base object, and computed
again only when a parameter's dtype changes (the base was cast after loading). The base is frozen,
so its values cannot go stale through adapterkit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..errors import BaseMismatchError, BaseModelError
from ..quantization import layer_quantization, quantization_of

_fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, Any]]] = weakref.WeakKeyDictionary()
FINGERPRINT_FIELDS = ("architecture", "shapes_sha256", "weights_sha256")
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_LEGACY_DTYPE = "float32"  # fingerprints without a "dtype" were taken of float32 bases, dtypes in the shapes hash


def base_fingerprint(base: nn.Module) -> dict[str, Any]:
    """Architecture, model type, parameter count, dtype, and hashes of the shapes and of the weights."""
    signature = tuple(tensor.dtype for tensor in base.state_dict().values())
    cached = _fingerprints.get(base)
    if cached is None or cached[0] != signature:
        cached = _fingerprints[base] = (signature, _compute(base))
    return cached[1]


def forget_base_fingerprint(base: nn.Module) -> None:
    """Drop the kept fingerprint of a base whose weights were changed for good (merge_and_unload)."""
    _fingerprints.pop(base, None)


def check_base(saved: Any, base: nn.Module, source: Path) -> None:
    """Refuse an adapter whose recorded fingerprint ``saved`` is not this base's (in any dtype)."""
    if not isinstance(saved, dict):
        raise BaseMismatchError(f"{source} records no base fingerprint, so it cannot be checked against this base; "
                                "re-save it with adapterkit")
    here = base_fingerprint(base)
    if saved.get("architecture") != here["architecture"]:
        _refuse(saved, source, f"the architecture differs ({saved.get('architecture')} vs {here['architecture']})")
    shapes = here["shapes_sha256"] if "dtype" in saved else _shapes_hash(_layout(base), with_dtypes=True)
    if saved.get("shapes_sha256") != shapes:
        _refuse(saved, source, "the parameter names or shapes differ")
    theirs, ours = saved.get("dtype", _LEGACY_DTYPE), here["dtype"]
    if theirs == ours:
        same = saved.get("weights_sha256") == here["weights_sha256"]
    elif ours in _as_dict(saved.get("weights_sha256_as")):
        same = saved["weights_sha256_as"][ours] == here["weights_sha256"]
    elif theirs in here["weights_sha256_as"]:
        same = saved.get("weights_sha256") == here["weights_sha256_as"][theirs]
    else:
        copy = (f" or a {theirs} copy (load_base(..., dtype=torch.{theirs}))" if theirs != "float32"
                else " (load_base(..., dtype=torch.float32))")
        _refuse(saved, source, f"the dtype differs ({theirs} there, {ours} here) "
                f"and a {ours} copy cannot be checked against a {theirs} one", f"Load it over the float32 base{copy}")
    quantized = (saved.get("quantized"), here.get("quantized"))
    if not same:
        dtype = f" (and the dtype: {theirs} there, {ours} here)" if theirs != ours else ""
        made = f"; it was trained over a {quantized[0]}-quantized base" if quantized[0] else ""
        _refuse(saved, source, f"the weights differ{dtype}{made}")
    if quantized[0] != quantized[1]:
        there, here_ = (f"an {q}" if q in ("nf4", "int8") else f"a {q}" if q else "the full-precision"
                        for q in quantized)
        warnings.warn(f"adapter at {source} was trained over {there} copy of this base and runs here over "
                      f"{here_} one: the same weights, quantized otherwise, so its outputs differ a little "
                      "from those it was trained with", stacklevel=3)


def _refuse(saved: dict, source: Path, what: str, advice: str | None = None) -> None:
    count = saved.get("num_parameters")
    size = f", {count:,} parameters" if isinstance(count, int) else ""
    advice = advice or f"Load it over the base it was trained on ({saved.get('architecture')}{size})"
    raise BaseMismatchError(f"adapter at {source} was made for another base model: {what}. {advice}")


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _compute(base: nn.Module) -> dict[str, Any]:
    quantized = quantization_of(base)
    if quantized is not None:
        return {**_source_fingerprint(base), "quantized": quantized}
    tensors = [tensor.detach() for tensor in base.state_dict(keep_vars=False).values()]
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = str(floating[0] if floating else torch.float32).removeprefix("torch.")
    casts = [None, *_HALF.values()] if dtype == "float32" else [None]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        hashes = _combine(pool.map(lambda tensor: _digests(tensor, casts), tensors))
    return _record(base, _layout(base), sum(p.numel() for p in base.parameters()), dtype, hashes)


def _record(base: nn.Module, layout: list[tuple[str, tuple, torch.dtype]], num_parameters: int, dtype: str,
            hashes: list[str]) -> dict[str, Any]:
    config = getattr(base, "config", None)
    return {
        "architecture": type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": num_parameters,
        "shapes_sha256": _shapes_hash(layout, with_dtypes=False),
        "dtype": dtype,
        "weights_sha256": hashes[0],
        "weights_sha256_as": dict(zip(_HALF, hashes[1:])),
    }


def _source_fingerprint(base: nn.Module) -> dict[str, Any]:
    """A quantized base's fingerprint is that of the float32 base its weights were quantized from
    (what ``load_base`` without ``quantize`` records), read one tensor at a time from the base's
    files, so the full-precision model is never in memory."""
    layout = _layout(base)
    casts = [None, *_HALF.values()]
    hashes = _combine(_digests(tensor, casts) for tensor in _source_tensors(base, layout))
    numel = {name: math.prod(shape) for name, shape, _ in layout}  # a quantized weight's, unpacked
    count = sum(numel.get(name, p.numel()) for name, p in base.named_parameters())
    return _record(base, layout, count, "float32", hashes)


def _layout(base: nn.Module) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of each tensor the float32 base holds (floating ones as float32), in
    its state_dict order: a quantized layer's weight at its [out, in] shape, without bitsandbytes'
    quantization state."""
    quantized = {f"{name}.": module for name, module in base.named_modules() if layer_quantization(module)}
    layout = []
    for key, tensor in base.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        module = quantized.get(f"{owner}.")
        if module is not None and leaf == "weight":
            layout.append((key, (module.out_features, module.in_features), torch.float32))
        elif (module is not None and leaf == "bias") or not any(key.startswith(prefix) for prefix in quantized):
            layout.append((key, tuple(tensor.shape), torch.float32 if tensor.is_floating_point() else tensor.dtype))
    return layout


def _source_tensors(base: nn.Module, layout: list[tuple[str, tuple, torch.dtype]]) -> Iterator[torch.Tensor]:
    """Each tensor of ``layout`` as the float32 base holds it: from the base's safetensors files
    (a tied weight under the name it is saved as), else (a buffer) as this base holds it."""
    from ..bases import pretrained_path

    name = str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    folder = Path(pretrained_path(name)) if name else None
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if not files:
        raise BaseModelError(f"cannot fingerprint this quantized base: its full-precision weights are not at "
                             f"{name or 'its config._name_or_path'!r} (a local folder with .safetensors files); "
                             "load it with adapterkit.load_base(folder, quantize=...)")
    held = base.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in held.items():
        aliases.setdefault(id(tensor), []).append(key)
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(safe_open(str(path), framework="pt")) for path in files]
        where = {key: handle for handle in opened for key in handle.keys()}
        for key, shape, dtype in layout:
            saved = next((k for k in [key, *aliases[id(held[key])]] if k in where), None)
            tensor = where[saved].get_tensor(saved) if saved is not None else held[key].detach()
            if tuple(tensor.shape) != shape:
                raise BaseModelError(f"cannot fingerprint this quantized base: {key} is {tuple(tensor.shape)} in "
                                     f"{folder}, {shape} in the model")
            yield tensor.to("cpu", dtype)


def _shapes_hash(layout: list[tuple[str, tuple, torch.dtype]], with_dtypes: bool) -> str:
    """Names and shapes; ``with_dtypes``: as fingerprints before dtypes were told apart hashed a
    float32 base (floating tensors as float32, whatever this copy holds)."""
    shapes = hashlib.sha256()
    for name, shape, dtype in layout:
        shapes.update(f"{name}:{tuple(shape)}{f':{dtype}' if with_dtypes else ''};".encode())
    return shapes.hexdigest()


def _digests(tensor: torch.Tensor, casts: list[torch.dtype | None]) -> list[bytes]:
    """The sha256 of the tensor's bytes as held (None) and, if it is floating, cast to each dtype."""
    def digest(cast: torch.dtype | None) -> bytes:
        cast_tensor = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
        return hashlib.sha256(cast_tensor.to("cpu").contiguous().view(-1).view(torch.uint8).numpy()).digest()

    return [digest(cast) for cast in casts]


def _combine(digests: Iterable[list[bytes]]) -> list[str]:
    """One hash per cast over every tensor's digest for it, in order."""
    per_cast: list = []
    for tensor_digests in digests:
        if not per_cast:
            per_cast = [hashlib.sha256() for _ in tensor_digests]
        for total, digest in zip(per_cast, tensor_digests):
            total.update(digest)
    return [total.hexdigest() for total in per_cast]
