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
    MergeError,
    ShapeMismatchError,
)
from .methods.adalora import AdaLoraConfig
from .methods.bottleneck import BottleneckConfig
from .methods.lora import LoraConfig
from .model import AdapterModel

__all__ = [
    "AdapterModel",
    "BottleneckConfig",
    "LoraConfig",
    "AdaLoraConfig",
    "load_base",
    "AdapterkitError",
    "AdapterFileError",
    "AdapterNameError",
    "BaseMismatchError",
    "BaseModelError",
    "ConfigError",
    "InjectionError",
    "MergeError",
    "ShapeMismatchError",
]

__version__ = "0.1.0"
