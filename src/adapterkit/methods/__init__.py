"""Adapter methods: one file each, registered by the ``register_method`` call at its end.

Importing a method's module here is what makes it known (to ``AdapterModel``, the file formats, the
CLI's ``--method`` choices); ``adapterkit`` exports every registered config class.
"""

from .base import (
    AdapterConfig,
    AdapterModule,
    Method,
    MethodTraining,
    PeftFormat,
    config_class,
    dataclass_from_dict,
    get_method,
    register_method,
    registered_methods,
    shared_key,
    shared_name,
)

# isort: off
# registration order: the order of registered_methods(), hence of the CLI's --method choices and CONFIG_CLASSES
from .bottleneck import BottleneckConfig
from .lora import LoraConfig  # noqa: F401 (exported through CONFIG_CLASSES)
from .adalora import AdaLoraConfig  # noqa: F401 (exported through CONFIG_CLASSES)
from .ia3 import IA3Config  # noqa: F401 (exported through CONFIG_CLASSES)
from .vera import VeraConfig  # noqa: F401 (exported through CONFIG_CLASSES)
from .fusion import FusionConfig  # noqa: F401 (exported through CONFIG_CLASSES)
# isort: on

DEFAULT_METHOD = BottleneckConfig.method  # what ``adapterkit train`` trains without --method

CONFIG_CLASSES = {method.config_class.__name__: method.config_class for method in registered_methods()}

__all__ = [
    "AdapterConfig", "AdapterModule", "Method", "MethodTraining", "PeftFormat", "CONFIG_CLASSES", "DEFAULT_METHOD",
    "config_class", "dataclass_from_dict", "get_method", "register_method", "registered_methods", "shared_key",
    "shared_name", *CONFIG_CLASSES,
]
