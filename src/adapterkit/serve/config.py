"""How one server batches, queues, caches and bounds its work: each field is a ``serve`` flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError


def _flag(default: int, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits. ``adapterkit serve`` makes one flag per field (``--max-batch-size``);
    the defaults live here only."""

    max_batch_size: int = _flag(16, "most rows decoding together")
    max_loaded_adapters: int = _flag(
        8, "idle adapters kept loaded for later requests (least recently used are unloaded beyond this); "
           "adapters that requests are using always stay loaded, and a composition may name at most this many")
    max_queue: int = _flag(64, "most requests waiting for a place; beyond it, 429 with Retry-After")
    max_prefill_tokens: int = _flag(
        512, "most prompt tokens (rows x padded length) prefilled in one step; longer prompts prefill in chunks")
    max_scored_tokens: int = _flag(
        65536, "most log-probabilities one completions request may ask for: its scored tokens (prompts with "
               "echo, plus max_tokens) times (1 + logprobs alternatives)")

    def __post_init__(self) -> None:
        for name in self.names():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help_of(cls, name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)
