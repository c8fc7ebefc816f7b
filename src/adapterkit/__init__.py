"""adapterkit: bottleneck adapters, LoRA, AdaLoRA and more over one frozen Hugging Face base model.

The exports load on first use (PEP 562), so that ``import adapterkit`` and ``adapterkit --help``
do not wait for torch: ``ak.AdapterModel``, ``ak.load_base``, every registered method's config class
(``ak.LoraConfig``, ...) and the errors work as plain attributes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "AdapterModel": "model",
    "Stack": "compose",
    "Fuse": "compose",
    "Average": "compose",
    "load_base": "bases",
    **dict.fromkeys([
        "AdapterkitError", "AdapterFileError", "AdapterInUseError", "AdapterLoadError", "AdapterNameError",
        "AdapterNotFoundError", "BaseMismatchError", "BaseModelError", "ConfigError", "GenerationError",
        "InjectionError", "MergeError", "ShapeMismatchError",
    ], "errors"),
}


def _config_classes() -> dict[str, type]:
    """Every registered method's config class, by name: BottleneckConfig, LoraConfig, ..."""
    return importlib.import_module(".methods", __name__).CONFIG_CLASSES


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name == "__all__":
        value = ["AdapterModel", *_config_classes(), *(n for n in _EXPORTS if n != "AdapterModel")]
    elif name.endswith("Config") and name in _config_classes():
        value = _config_classes()[name]
    else:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))
