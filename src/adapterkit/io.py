"""Saving and loading adapters: safetensors only, atomic writes, and a fingerprint of the base.

An adapter folder holds two files:
- ``adapter_config.json``: {"format": "adapterkit", "format_version": 1, "name", "method",
  "config", "base": fingerprint, "weights_crc32"}
- ``adapter_model.safetensors``: the tensors, keyed "<base module name>.adapter.<parameter>".

The base fingerprint names the architecture, hashes the names and shapes of its parameters, and
hashes its weights (computed once per base object), so an adapter is never silently applied to a
different model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import math
import mmap
import os
import shutil
import tempfile
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .errors import AdapterFileError, AdapterNameError, BaseMismatchError, ConfigError, ShapeMismatchError
from .methods import config_class

if TYPE_CHECKING:
    from .model import AdapterModel

FORMAT = "adapterkit"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_fingerprints: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


# ---- base fingerprint ----------------------------------------------------------------------------
def base_fingerprint(base: nn.Module) -> dict[str, Any]:
    """Architecture, a hash of parameter names and shapes, and a hash of the weights.

    Hashing the weights reads every byte of the base once (about 0.3 s for 135M parameters), so
    the result is kept for the life of the base object; the base is frozen, so it cannot go stale
    through adapterkit."""
    cached = _fingerprints.get(base)
    if cached is None:
        cached = _fingerprints[base] = _compute_fingerprint(base)
    return cached


def forget_base_fingerprint(base: nn.Module) -> None:
    """Drop the kept fingerprint of a base whose weights were changed for good (merge_and_unload)."""
    _fingerprints.pop(base, None)


def _compute_fingerprint(base: nn.Module) -> dict[str, Any]:
    named = list(base.state_dict(keep_vars=False).items())
    shapes = hashlib.sha256()
    for name, tensor in named:
        shapes.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(_tensor_digest, (tensor for _, tensor in named)))
    weights = hashlib.sha256(b"".join(digests))
    config = getattr(base, "config", None)
    return {
        "architecture": type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "shapes_sha256": shapes.hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).digest()


def _check_base(saved: dict[str, Any], base: nn.Module, path: Path) -> None:
    here = base_fingerprint(base)
    for field, what in (
        ("architecture", "architecture"),
        ("shapes_sha256", "parameter names or shapes"),
        ("weights_sha256", "weights"),
    ):
        if saved.get(field) != here[field]:
            detail = f" ({saved.get(field)} vs {here[field]})" if field == "architecture" else ""
            raise BaseMismatchError(
                f"adapter at {path} was made for another base model: the {what} differ{detail}. "
                f"Load it over the base it was trained on ({saved.get('architecture')}, "
                f"{saved.get('num_parameters'):,} parameters)"
            )


# ---- saving --------------------------------------------------------------------------------------
def save_adapter(model: "AdapterModel", name: str, path: str | Path, format: str = FORMAT) -> None:
    """Write one adapter as a folder, in adapterkit's format or (format="peft") peft's."""
    if format not in (FORMAT, "peft"):
        raise ConfigError(f"format must be {FORMAT!r} or 'peft', got {format!r}")
    files = peft_adapter_files(model, name) if format == "peft" else adapter_files(model, name)
    write_folder_atomically(Path(path), files)


def adapter_files(model: "AdapterModel", name: str) -> dict[str, bytes]:
    """The bytes of a saved adapter folder, by file name (config last: see write_folder_atomically)."""
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in saved_tensors(model, name).items()}
    weights = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    config = model.adapters[name]
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "base": base_fingerprint(model.base),
        "weights_crc32": zlib.crc32(weights),
    }
    return {WEIGHTS_FILE: weights, CONFIG_FILE: (json.dumps(document, indent=2) + "\n").encode()}


def write_folder_atomically(path: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` as the folder ``path``; a crash at any point leaves the old folder (if any)
    intact at ``path`` or, on systems without an atomic exchange, beside it under a hidden name."""
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"{path} exists and is not a folder; refusing to replace it")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).exists():
        raise AdapterFileError(f"{path} is a non-empty folder that holds no adapter; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".saving", dir=path.parent))
    try:
        for file_name, data in files.items():  # the config goes last: a partial folder never loads
            _write_durably(staging / file_name, data)
        _fsync_dir(staging)
        if not path.exists():
            os.rename(staging, path)
        elif not _exchange(staging, path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(staging, path)
            staging = old
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_durably(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


# ---- loading -------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed adapter_config.json of a saved adapter folder, or a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"no adapter folder at {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFileError(f"{path} holds no {CONFIG_FILE}; is it an adapter folder?")
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"{config_path} is corrupt: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise AdapterFileError(f"{config_path} is corrupt: expected a JSON object")
    return document


def load_adapter(model: "AdapterModel", path: str | Path, name: str | None = None) -> str:
    path = Path(path)
    document = read_adapter_config(path)
    if is_peft_config(document):
        return load_peft_adapter(model, path, document, name)
    if document.get("format") != FORMAT:
        raise AdapterFileError(f"{path / CONFIG_FILE} is not an adapterkit adapter (format {document.get('format')!r})")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} has adapter format version {version!r}; this adapterkit reads version {FORMAT_VERSION}. "
            "Upgrade adapterkit to load it"
        )
    try:
        config = config_class(document["method"]).from_dict(document["config"])
    except KeyError as error:
        raise AdapterFileError(f"{path / CONFIG_FILE} lacks the field {error}") from None
    except (ConfigError, TypeError) as error:
        raise AdapterFileError(f"{path / CONFIG_FILE} holds an invalid adapter config: {error}") from None
    name = name or document.get("name")
    model._check_new_name(name)
    _check_base(document.get("base") or {}, model.base, path)
    tensors = _read_weights(path, document.get("weights_crc32"))
    sites = model._sites_for(config)
    modules = _modules_from_tensors(model, config, sites, tensors, path)
    model._install(name, config, sites, modules)
    return name


def _read_weights(path: Path, expected_crc32: int | None) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterFileError(f"{path} holds no {WEIGHTS_FILE}")
    with open(weights_path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise AdapterFileError(f"{weights_path} is corrupt: the file is empty")
        # A private mapping: the tensors view the file's pages without a copy, and writes to
        # them (training a loaded adapter) never reach the file.
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    if expected_crc32 is not None and zlib.crc32(data) != expected_crc32:
        raise AdapterFileError(f"{weights_path} is corrupt: its checksum does not match the one in {CONFIG_FILE}")
    return parse_safetensors(data, weights_path)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def parse_safetensors(data: bytearray | mmap.mmap, source: Path) -> dict[str, torch.Tensor]:
    """Tensors viewing ``data`` in place (no copy), after checking every header entry.

    The format: an 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and [start, end) byte range, then the packed tensor bytes."""

    def corrupt(why: str) -> AdapterFileError:
        return AdapterFileError(f"{source} is corrupt: {why}")

    if len(data) < 8:
        raise corrupt("too short to hold a safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise corrupt(f"header length {header_len} runs past the end of the file")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise corrupt("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    header.pop("__metadata__", None)
    start_of_data, size = 8 + header_len, len(data) - 8 - header_len
    view = memoryview(data)
    tensors = {}
    for key, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            start, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"the header entry for {key!r} is malformed") from None
        numel = math.prod(shape)
        if not 0 <= start <= end <= size or end - start != numel * dtype.itemsize:
            raise corrupt(f"tensor {key!r} claims bytes {start}..{end}, which do not fit its shape {shape} or the file")
        flat = torch.frombuffer(view, dtype=dtype, count=numel, offset=start_of_data + start) if numel else torch.empty(0, dtype=dtype)
        tensors[key] = flat.view(shape)
    return tensors


def _modules_from_tensors(model, config, sites, tensors: dict[str, torch.Tensor], path: Path) -> nn.ModuleDict:
    """Build the adapter's modules without initialising them, then take the saved tensors."""
    from .model import _key

    built = {site.module_name: config.build(site, device="meta") for site in sites}
    expected = {f"{module_name}.adapter.{param}": (module_name, param, t.shape) for module_name, m in built.items() for param, t in m.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ShapeMismatchError(
            f"{path / WEIGHTS_FILE} does not fit this config on this base: "
            f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}"
        )
    per_module: dict[str, dict[str, torch.Tensor]] = {m: {} for m in built}
    for key, (module_name, param, shape) in expected.items():
        tensor = tensors[key]
        if tensor.shape != shape:
            raise ShapeMismatchError(f"tensor {key} in {path / WEIGHTS_FILE} has shape {tuple(tensor.shape)}; this config on this base needs {tuple(shape)}")
        weight = model._base_weight(module_name)
        per_module[module_name][param] = tensor.to(device=weight.device, dtype=weight.dtype)
    modules = nn.ModuleDict()
    for site in sites:
        module = built[site.module_name]
        _assign(module, per_module[site.module_name])
        modules[_key(site)] = module
    return modules


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors in place of a module's meta parameters and buffers (frozen)."""
    for key, tensor in tensors.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


# ---- peft's format -------------------------------------------------------------------------------
# peft's ``save_pretrained`` writes adapter_config.json (the LoraConfig/AdaLoraConfig fields plus
# "peft_type") and adapter_model.safetensors keyed "base_model.model.<module>.lora_A.weight" (LoRA)
# or "base_model.model.<module>.lora_A" / lora_E / lora_B (AdaLoRA, only the kept triplets of each
# module, as rank_pattern {"<module>.lora_E": [bool] * init_r} says). A peft folder has no base
# fingerprint, so the base is checked through the tensor names and shapes alone.
PEFT_PREFIX = "base_model.model."
_PEFT_FIELDS = {  # peft field -> our field, per method
    "lora": {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
             "use_rslora": "use_rslora", "layers_to_transform": "layers"},
    "adalora": {"init_r": "init_r", "target_r": "target_r", "beta1": "beta1", "beta2": "beta2", "tinit": "tinit",
                "tfinal": "tfinal", "deltaT": "deltaT", "target_modules": "target_modules", "lora_alpha": "alpha",
                "lora_dropout": "dropout", "orth_reg_weight": "orth_reg_weight", "total_step": "total_step",
                "layers_to_transform": "layers", "rank_pattern": "rank_pattern"},
}
_PEFT_TYPES = {"LORA": "lora", "ADALORA": "adalora"}
# Fields that say nothing about the adapter's maths (bookkeeping, or how fresh weights were drawn).
_PEFT_HARMLESS = {
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "fan_in_fan_out", "layers_pattern", "init_lora_weights", "megatron_core", "qalora_group_size", "r",
}
_PEFT_FRESH_INITS = (True, False, "gaussian")  # other inits (pissa, olora, loftq, ...) also change the base weights


def is_peft_config(document: dict[str, Any]) -> bool:
    return "peft_type" in document and "format" not in document


def config_from_peft(document: dict[str, Any], source: Path):
    """Our config for a peft adapter_config.json; any field that would change the maths and that we
    do not reproduce is named in the error."""
    peft_type = document.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        raise AdapterFileError(f"{source} is a peft {peft_type} adapter; adapterkit reads peft's LORA and ADALORA adapters")
    method = _PEFT_TYPES[peft_type]
    fields = _PEFT_FIELDS[method]
    unsupported = sorted(
        key for key, value in document.items()
        if key not in fields and key not in _PEFT_HARMLESS and value not in (None, False, {}, [], "none")
    )
    if document.get("init_lora_weights", True) not in _PEFT_FRESH_INITS:
        unsupported.append("init_lora_weights")
    if unsupported:
        details = ", ".join(f"{key}={document[key]!r}" for key in unsupported)
        raise AdapterFileError(f"{source} uses peft features adapterkit does not reproduce: {details}")
    values = {ours: document[theirs] for theirs, ours in fields.items() if document.get(theirs) not in (None, {})}
    if isinstance(values.get("layers"), int):
        values["layers"] = [values["layers"]]
    if "rank_pattern" in values:
        values["rank_pattern"] = {key.removesuffix(".lora_E"): keep for key, keep in values["rank_pattern"].items()}
    try:
        return config_class(method)(**values)
    except (ConfigError, TypeError) as error:
        raise AdapterFileError(f"{source} holds a peft config adapterkit cannot use: {error}") from None


def load_peft_adapter(model: "AdapterModel", path: Path, document: dict[str, Any], name: str | None) -> str:
    from .model import _VALID_NAME

    config = config_from_peft(document, path / CONFIG_FILE)
    if name is None and not _VALID_NAME.fullmatch(path.name):
        raise AdapterNameError(f"a peft folder carries no adapter name and its folder name {path.name!r} is not a valid one; pass name=")
    name = name or path.name
    model._check_new_name(name)
    if not (path / WEIGHTS_FILE).is_file() and (path / "adapter_model.bin").is_file():
        raise AdapterFileError(
            f"{path} holds its weights as a pickle (adapter_model.bin), which can run code when loaded; "
            "re-save it with peft's save_pretrained(safe_serialization=True)"
        )
    tensors = {_key_from_peft(key, config.method, path): tensor for key, tensor in _read_weights(path, None).items()}
    sites = model._sites_for(config)
    modules = _modules_from_tensors(model, config, sites, tensors, path)
    model._install(name, config, sites, modules)
    return name


def _key_from_peft(key: str, method: str, path: Path) -> str:
    module, _, param = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
    if not key.startswith(PEFT_PREFIX) or param not in ("lora_A", "lora_B", "lora_E"):
        raise AdapterFileError(f"{path / WEIGHTS_FILE} holds {key!r}, which is not a {method} tensor of peft's format")
    return f"{module}.adapter.{param}"


def peft_adapter_files(model: "AdapterModel", name: str) -> dict[str, bytes]:
    """The bytes of a peft folder for a LoRA or AdaLoRA adapter (config last)."""
    config = model.adapters[name]
    if config.method not in _PEFT_FIELDS:
        raise ConfigError(f"adapter {name!r} is a {config.method} adapter; peft's format holds LoRA and AdaLoRA adapters only")
    suffix = ".weight" if config.method == "lora" else ""
    tensors = {}
    for key, tensor in saved_tensors(model, name).items():
        module, _, param = key.partition(".adapter.")
        tensors[f"{PEFT_PREFIX}{module}.{param}{suffix}"] = tensor.detach().to("cpu").contiguous()
    ours = config.to_dict()
    document = {theirs: ours[mine] for theirs, mine in _PEFT_FIELDS[config.method].items()}
    if config.method == "adalora" and config.rank_pattern is not None:
        document["rank_pattern"] = {f"{module}.lora_E": keep for module, keep in config.rank_pattern.items()}
    conv1d = any(not isinstance(model._base_modules[site.module_name], nn.Linear) for site in model._sites[name])
    document.update(
        peft_type=_peft_type(config.method), bias="none", fan_in_fan_out=conv1d, inference_mode=True, task_type=None,
        base_model_name_or_path=getattr(getattr(model.base, "config", None), "_name_or_path", None) or None,
    )
    weights = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    return {WEIGHTS_FILE: weights, CONFIG_FILE: (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()}


def saved_tensors(model: "AdapterModel", name: str) -> dict[str, torch.Tensor]:
    """An adapter's tensors as a saved folder holds them: an AdaLoRA adapter whose final ranks are
    fixed (config.rank_pattern) keeps only its kept triplets, as peft saves them."""
    tensors = model.adapter_state_dict(name)
    pattern = getattr(model.adapters[name], "rank_pattern", None)
    if not pattern:
        return tensors
    kept = {}
    for key, tensor in tensors.items():
        module, _, param = key.partition(".adapter.")
        keep = pattern.get(module)
        rank_dim = 1 if param == "lora_B" else 0
        if keep is not None and tensor.shape[rank_dim] == len(keep):  # not yet cut down (a loaded one is)
            mask = torch.tensor(keep, dtype=torch.bool, device=tensor.device)
            tensor = tensor[:, mask] if rank_dim else tensor[mask]
        kept[key] = tensor
    return kept


def _peft_type(method: str) -> str:
    return next(peft_type for peft_type, ours in _PEFT_TYPES.items() if ours == method)
