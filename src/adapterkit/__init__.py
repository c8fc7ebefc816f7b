"""adapterkit: bottleneck adapters, LoRA and AdaLoRA over one frozen Hugging Face base model."""

from .bases import load_base
from .errors import (
    AdapterFileError,
    AdapterkitError,
    AdapterNameError,
    BaseMismatchError,
    BaseModelError,
    ConfigError,
    InjectionError,
    ShapeMismatchError,
)
from .methods.bottleneck import BottleneckConfig
from .model import AdapterModel

__all__ = [
    "AdapterModel",
    "BottleneckConfig",
    "load_base",
    "AdapterkitError",
    "AdapterFileError",
    "AdapterNameError",
    "BaseMismatchError",
    "BaseModelError",
    "ConfigError",
    "InjectionError",
    "ShapeMismatchError",
]

__version__ = "0.1.0"
