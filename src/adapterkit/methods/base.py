"""What every adapter method supplies, and the registry that holds the methods.

A method is one file in ``methods/``: a config dataclass (where its modules go, how to build one),
an ``AdapterModule`` subclass (what it computes at a site, how it merges, how it stacks for mixed
batches), optionally a ``MethodTraining`` (state it carries between optimizer steps) and a
``PeftFormat`` (its peft checkpoint mapping), all named in one ``register_method(Method(...))``
call at the end of the file. A method whose modules read common tensors (VeRA's random projections)
makes them once per adapter in ``AdapterConfig.shared_tensors``. Everything else (the hook layer,
``AdapterModel``, the file formats, the CLI) reads the registry and never names a method.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import Site


# ---- configs -------------------------------------------------------------------------------------
class ConfigType(type):
    """The type of the config classes: a config takes peft's spelling of its fields as keywords
    (``LoraConfig(lora_alpha=16)``), from its method's one peft field map (``PeftFormat.fields``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **cls.in_our_names(kwargs))


@dataclasses.dataclass
class AdapterConfig(metaclass=ConfigType):
    """Base of every method's config: a dataclass whose fields are plain JSON values."""

    method: ClassVar[str]
    set_by_training: ClassVar[frozenset[str]] = frozenset()  # fields a training run sets itself
    # fields a training run fills with its planned number of optimizer steps when they are not given
    # (AdaLoRA's total_step: its rank schedule needs the run's length)
    run_length_fields: ClassVar[frozenset[str]] = frozenset()
    # an adapter of this method runs only inside the composition block that names it (a fusion,
    # inside its Fuse block): it is never set active or trained on its own
    runs_inside_composition: ClassVar[bool] = False

    def sites(self, model: nn.Module) -> list[Site]:
        """Where this adapter attaches in ``model``, found from its structure."""
        raise NotImplementedError

    def build(self, site: Site, device: torch.device | str | None = None) -> AdapterModule:
        """A new module for ``site``; on the "meta" device it is only a shape, filled in by loading."""
        raise NotImplementedError

    def shared_tensors(self, sites: list[Site], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Frozen tensors that every module of one adapter reads and none owns (VeRA's projections),
        by name (no dots): made once per adapter from this config and its sites, handed to each
        module through ``AdapterModule.use_shared``, and saved once, keyed ``shared_key(name)``.
        They must follow from the config alone (a seed in it), so that ``tensors_to_save`` may
        leave them out and loading makes them again. On "meta", only shapes. None by default."""
        return {}

    def depends_on(self) -> list[str]:
        """Adapters that must be loaded before this one (a fusion's children)."""
        return []

    def tensors_to_save(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a saved folder holds (AdaLoRA keeps only its kept ranks; shared tensors may be
        left out, to be made again when loading); all of them by default."""
        return tensors

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        if isinstance(data, dict):
            data = cls.in_our_names(data)
        return dataclass_from_dict(cls, data, f"{cls.__name__} field", "fields")

    @classmethod
    def peft_names(cls) -> dict[str, str]:
        """peft's spelling -> ours, where they differ: the method's ``PeftFormat.fields``."""
        method = _METHODS.get(getattr(cls, "method", None))
        if method is None or method.peft is None:
            return {}
        return {theirs: ours for theirs, ours in method.peft.fields.items() if theirs != ours}

    @classmethod
    def in_our_names(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with fields given in peft's spelling (``lora_alpha=16``) under ours, so that
        peft users' configs work as written; None in peft's spelling means not given."""
        names = cls.peft_names()
        ours = {key: value for key, value in values.items() if key not in names}
        for theirs, value in values.items():
            mine = names.get(theirs)
            if mine is None or value is None:
                continue
            if mine in ours and ours[mine] != value:
                raise ConfigError(f"{theirs} is peft's name for {mine}: give one of them, not both "
                                  f"({mine}={ours[mine]!r}, {theirs}={value!r})")
            ours[mine] = value
        return ours


def dataclass_from_dict(cls: type, data: Any, unknown_label: str, known_label: str):
    """``cls(**data)``, refusing keys the dataclass does not have by name (files from newer versions)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table of {known_label}, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {unknown_label}(s) {unknown}; known {known_label} are {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {error}") from None


SHARED_PREFIX = "adapter."  # method-level tensors: "adapter.<name>"; a module's are "<module>.adapter.<name>"


def shared_key(name: str) -> str:
    """The state-dict key of an adapter's shared tensor ``name``."""
    return SHARED_PREFIX + name


def shared_name(key: str) -> str | None:
    """The shared tensor a state-dict key names, or None for a module's tensor."""
    return key.removeprefix(SHARED_PREFIX) if key.startswith(SHARED_PREFIX) and ".adapter." not in key else None


# ---- checks shared by the configs ------------------------------------------------------------------
def check_int(field: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{field} must be {wanted}, got {value!r}")
    return value


def check_number(field: str, value: Any, low: float | None = None, high: float | None = None,
                 positive: bool = False) -> float:
    """A finite int or float: > 0 with ``positive``, >= ``low``, < ``high``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (not positive or value > 0) and (low is None or value >= low) and (high is None or value < high)
    if not ok:
        if high is not None:
            wanted = f"in [{low:g}, {high:g})"
        elif positive:
            wanted = "a positive number"
        elif low == 0:
            wanted = "a non-negative number"
        elif low is not None:
            wanted = f"a number of at least {low:g}"
        else:
            wanted = "a finite number"
        raise ConfigError(f"{field} must be {wanted}, got {value!r}")
    return value


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    return value


def check_choice(field: str, value: Any, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{field} {value!r} is not one of {sorted(choices)}")
    return value


def check_layers(layers: Any) -> list[int] | None:
    """Block indices as a list; one index alone is taken as peft takes ``layers_to_transform``."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ConfigError(f"layers must be non-negative layer indices, got {layers!r}")
    return list(layers)


def check_target_modules(target_modules: Any, required: bool) -> list[str] | str | None:
    """Module names (a list, peft's rule: the name or its last dotted parts) or a regular expression."""
    if target_modules is None and not required:
        return None
    if isinstance(target_modules, str) and target_modules:
        return check_pattern("target_modules", target_modules)
    if (isinstance(target_modules, (list, tuple)) and target_modules
            and all(isinstance(t, str) and t for t in target_modules)):
        return list(target_modules)
    raise ConfigError(
        f"target_modules must name the linear layers to adapt (a list such as ['q_proj', 'v_proj'] "
        f"or a regular expression), got {target_modules!r}"
    )


def check_pattern(field: str, pattern: str) -> str:
    """A regular expression that compiles: a bad one would otherwise fail only when the adapter is attached."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise ConfigError(f"{field} {pattern!r} is not a valid regular expression ({error})") from None
    return pattern


# ---- modules -------------------------------------------------------------------------------------
def is_meta(device: torch.device | str | None) -> bool:
    """Whether ``device`` is "meta": a module built there only has shapes, which loading fills,
    so it draws no initial values."""
    return device is not None and torch.device(device).type == "meta"


class AdapterModule(nn.Module):
    """One adapter at one site. The hook layer calls it in one of two places:

    - ``hook = "output"``: after the hooked layer, as ``module(x, y) -> new y``, where ``y`` is the
      layer's output and ``x`` what the site reads (the layer's input, or the sub-layer input that
      ``Site.reads_from`` names). Modules with ``changes_layer`` (LoRA: a delta of the layer's own
      map) run before the other output modules, whatever the order of the active adapters.
    - ``hook = "input"``: before the hooked layer, as ``module.transform_input(x) -> new x``.

    Merging: a module that is a change of the layer's weight gives ``weight_update(site)``
    (additive: W += update) or ``weight_scale()`` (multiplicative: W scaled along ``scale_dim``).

    Mixed batches: ``mixed_kind()`` says which modules of a site compute together (same maths, same
    input); ``mixed = "delta"`` modules supply ``stack``/``grouped_delta`` (a delta added to the
    output, computed with batched products over stacked weights for short rows; long rows run
    ``forward`` on each adapter's rows), ``mixed = "scale"`` modules
    supply ``scale_vector()`` (each row's input or output multiplied by its adapter's vector).
    """

    hook: str = "output"
    reads: str = "input"  # mixed deltas read x ("input"), y ("output") or both side by side ("input+output")
    changes_layer: ClassVar[bool] = False
    mixed: ClassVar[str | None] = None
    scale_dim: ClassVar[str] = "out"  # for weight_scale: "out" scales outputs (rows of W), "in" inputs

    def bind(self, layer: nn.Module) -> None:
        """Called when the module is hooked onto ``layer``, its site's base module (DoRA reads
        the layer's weight); nothing by default."""

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def use_shared(self, shared: nn.Module) -> None:
        """Take the adapter's shared tensors (``AdapterConfig.shared_tensors``), the buffers of
        ``shared``, read as ``self.shared.<name>``. Not a submodule: they are the adapter's, saved
        once, and ``shared`` moves with the adapter's modules."""
        self.__dict__["shared"] = shared

    def mixed_kind(self) -> tuple:
        return (type(self),)

    @classmethod
    def stack(cls, modules: list[AdapterModule]) -> dict[str, torch.Tensor]:
        """Several adapters' weights at one site as [adapters, ...] tensors. The default serves
        ``mixed = "scale"``: the vectors as one tensor."""
        return {"scale": torch.stack([module.scale_vector().detach().reshape(-1) for module in modules])}

    @staticmethod
    def grouped_delta(kind: tuple, h: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def scale_vector(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_update(self, site: Site) -> torch.Tensor | None:
        """The additive change of the hooked layer's weight, in its layout; None: not additive."""
        return None

    def weight_scale(self) -> torch.Tensor | None:
        """The per-channel factor of the hooked layer's weight; None: not multiplicative."""
        return None


# ---- training ------------------------------------------------------------------------------------
class MethodTraining:
    """What a method carries between optimizer steps of one adapter (AdaLoRA's rank allocation).

    ``AdapterModel`` calls these while the adapter trains; the defaults do nothing."""

    def before_forward(self) -> None:
        """Called on each training forward (AdaLoRA warns when its step() was forgotten)."""

    def regularization(self) -> torch.Tensor | None:
        """Added to the task loss while training."""
        return None

    def after_step(self, global_step: int) -> AdapterConfig | None:
        """Called after each optimizer step; returns a new config when training changed it."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a training checkpoint needs to resume exactly."""
        return {}

    def load_state_dict(
        self, state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], AdapterConfig | None]:
        """Take back ``state_dict()``; returns the adapter tensors to restore (``saved``, possibly
        completed from the state) and a new config, if the state fixes one."""
        return saved, None


# ---- peft -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How a method maps to peft's adapter_config.json and tensor names.

    fields: peft field -> our field, the one place a method spells peft's names: the peft reader
    and writer both derive from it, and the config takes peft's spelling wherever it takes ours.
    fresh_init: peft fields that only say how new weights were drawn (LoRA's init_lora_weights),
    with the values that do only that: read and ignored; any other value is refused by name.
    Tensors are "base_model.model.<module>.<parameter><suffix>" in peft, "<module>.adapter.<parameter>"
    in ours: the parameter names are peft's own. ``from_peft(values)`` adjusts our field values
    read from peft's file; ``to_peft(config, sites, document)`` adds what peft's file needs beyond
    the mapped fields."""

    peft_type: str
    fields: dict[str, str]
    tensor_suffix: str = ""
    unsuffixed: frozenset[str] = frozenset()  # parameters peft names without the suffix (DoRA's lora_magnitude_vector)
    fresh_init: dict[str, tuple] = dataclasses.field(default_factory=dict)
    from_peft: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    to_peft: Callable[[AdapterConfig, list[Site], dict[str, Any]], None] | None = None


# ---- weighted combinations -------------------------------------------------------------------------
def weighted_sum(tensors: list[torch.Tensor], weights: list[float] | torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i (task arithmetic)."""
    return sum(w * t for w, t in zip(weights, tensors))


def average_parameters(
    configs: list[AdapterConfig], states: list[dict[str, torch.Tensor]], weights: list[float], how: str
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The weighted sum of the parameters of adapters that share one config ("linear" only)."""
    if how != "linear":
        raise ConfigError(f"{configs[0].method} adapters combine by 'linear' (a weighted sum of parameters), "
                          f"not {how!r}")
    if any(config.to_dict() != configs[0].to_dict() for config in configs):
        raise ConfigError(f"{configs[0].method} adapters combine only when they share one config; theirs differ")
    return configs[0], {key: weighted_sum([state[key] for state in states], weights).detach().clone()
                        for key in states[0]}


# ---- the registry --------------------------------------------------------------------------------
Combiner = Callable[..., tuple[AdapterConfig, dict[str, torch.Tensor]]]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method. ``combine(configs, states, weights, how, **options)`` makes one adapter
    (config, state dict) from several of this method, for ``AdapterModel.merge_adapters``.
    ``trains_alone``: whether an adapter of it can be made from its config alone (a fusion needs
    its children, so ``adapterkit train --method`` does not offer it)."""

    name: str
    config_class: type[AdapterConfig]
    training: Callable[[str, AdapterConfig, dict[str, AdapterModule]], MethodTraining] | None = None
    peft: PeftFormat | None = None
    combine: Combiner | None = None
    trains_alone: bool = True


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make a method known to every part of adapterkit (one call per method file)."""
    if method.name in _METHODS:
        raise ConfigError(f"an adapter method named {method.name!r} is already registered")
    if method.config_class.method != method.name:
        raise ConfigError(f"{method.config_class.__name__}.method is {method.config_class.method!r}, "
                          f"not {method.name!r}")
    _METHODS[method.name] = method
    return method


def get_method(name: Any) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ConfigError(f"unknown adapter method {name!r}; known methods are {sorted(_METHODS)}")
    return _METHODS[name]


def registered_methods() -> list[Method]:
    return list(_METHODS.values())


def config_class(method: Any) -> type[AdapterConfig]:
    return get_method(method).config_class
