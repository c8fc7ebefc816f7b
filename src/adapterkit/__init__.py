"""adapterkit: bottleneck adapters, LoRA, AdaLoRA and more over one frozen Hugging Face base model."""

from .bases import load_base
from .compose import Average, Fuse, Stack
from .errors import (
    AdapterFileError,
    AdapterkitError,
    AdapterNameError,
    BaseMismatchError,
    BaseModelError,
    ConfigError,
    GenerationError,
    InjectionError,
    MergeError,
    ShapeMismatchError,
)
from .methods import CONFIG_CLASSES
from .model import AdapterModel

globals().update(CONFIG_CLASSES)  # every registered method's config: BottleneckConfig, LoraConfig, ...

__all__ = [
    "AdapterModel",
    *CONFIG_CLASSES,
    "Stack",
    "Fuse",
    "Average",
    "load_base",
    "AdapterkitError",
    "AdapterFileError",
    "AdapterNameError",
    "BaseMismatchError",
    "BaseModelError",
    "ConfigError",
    "GenerationError",
    "InjectionError",
    "MergeError",
    "ShapeMismatchError",
]

__version__ = "0.1.0"
