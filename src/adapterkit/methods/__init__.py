"""Adapter methods. Each is a config dataclass that knows where its modules go and how to build one.

A built module is called as ``module(x, y)``: ``y`` is the output of the layer it is attached to and
``x`` what it reads (that layer's input, or the sub-layer input for parallel adapters); it returns
the new output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import Site


@dataclasses.dataclass
class AdapterConfig:
    method: ClassVar[str]

    def sites(self, model: nn.Module) -> list[Site]:
        raise NotImplementedError

    def build(self, site: Site, device: torch.device | str | None = None) -> nn.Module:
        """A new module for ``site``; on the "meta" device it is only a shape, filled in by loading."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return dataclass_from_dict(cls, data, f"{cls.__name__} field", "fields")


def dataclass_from_dict(cls: type, data: dict[str, Any], unknown_label: str, known_label: str):
    """``cls(**data)``, refusing keys the dataclass does not have by name (files from newer versions)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {unknown_label}(s) {unknown}; known {known_label} are {sorted(known)}")
    return cls(**data)


def config_class(method: str) -> type[AdapterConfig]:
    from .adalora import AdaLoraConfig
    from .bottleneck import BottleneckConfig
    from .lora import LoraConfig

    classes = {c.method: c for c in (BottleneckConfig, LoraConfig, AdaLoraConfig)}
    if method not in classes:
        raise ConfigError(f"unknown adapter method {method!r}; known methods are {sorted(classes)}")
    return classes[method]
