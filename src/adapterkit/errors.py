"""The exceptions adapterkit raises. Each message says what went wrong and what to do about it."""


class AdapterkitError(Exception):
    """Base class: catch this to handle any adapterkit failure."""


class ConfigError(AdapterkitError, ValueError):
    """An adapter config has an invalid, missing or unknown field."""


class AdapterNameError(AdapterkitError, KeyError):
    """An adapter name is unknown, already taken or not a valid name."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class InjectionError(AdapterkitError):
    """No place to attach an adapter was found, or a named module cannot take one."""


class BaseModelError(AdapterkitError):
    """A base model cannot be found or loaded."""


class AdapterFileError(AdapterkitError):
    """A saved adapter folder is missing, corrupt, or of an unknown format."""


class BaseMismatchError(AdapterFileError):
    """A saved adapter was made for a different base model."""


class ShapeMismatchError(AdapterFileError):
    """A saved tensor does not have the shape this base and config need."""


class DataError(AdapterkitError, ValueError):
    """A training or evaluation file is missing or malformed (the message names the line)."""


class TrainingError(AdapterkitError):
    """Training cannot go on, e.g. the loss became NaN or infinite."""


class MergeError(AdapterkitError):
    """An operation conflicts with an adapter merged into the base weights (unmerge it first)."""


class GenerationError(AdapterkitError):
    """A prompt could not be answered: the model produced non-finite values, say."""


class AdapterNotFoundError(AdapterNameError):
    """No adapter or composition of that name exists where it was looked for."""


class AdapterInUseError(AdapterkitError):
    """An adapter cannot be unloaded or replaced while requests or a loaded fusion use it."""


class AdapterLoadError(AdapterFileError):
    """A served adapter could not be loaded; the message names no server path."""


class ReplicaUnavailableError(AdapterkitError):
    """The replica answering a request stopped before it answered (``serve --ray``); others go on."""
