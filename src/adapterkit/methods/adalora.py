"""AdaLoRA (Zhang et al. 2023): a LoRA update in SVD shape, P Λ Q, whose rank budget is spent where
it matters.

Each linear layer gets y = W x + s * B (A * E) dropout(x): A [r, in] (Q, right singular vectors),
E [r, 1] (Λ, singular values, zero at start: a new adapter is an exact identity), B [out, r] (P).
s = alpha / (init_r + 1e-5), peft's scale, fixed for the adapter's life so that pruning changes no
kept triplet's contribution.

During training, ``RankAllocator.step`` (called through ``AdapterModel.step`` after each optimizer
step) scores every triplet (row of A, value of E, column of B) by its sensitivity |w * grad w|
smoothed with beta1 times its uncertainty smoothed with beta2, and zeroes the values E of the least
important triplets so that the total rank follows a cubic schedule from init_r per module (until
step tinit) to target_r per module (at step total_step - tfinal), every deltaT steps. The final
mask is then held fixed, and the final ranks are logged (logger "adapterkit.methods.adalora", level
INFO). An orthogonality penalty, orth_reg_weight times the mean of ||A Aᵀ - I|| and ||Bᵀ B - I||,
keeps A and B close to singular vectors.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..inject import Site, find_sites
from .base import (
    AdapterConfig,
    Method,
    MethodTraining,
    PeftFormat,
    check_int,
    check_layers,
    check_number,
    check_target_modules,
    is_meta,
    register_method,
)
from .lora import FRESH_INITS, LowRankAdapter, default_targets

RANKNUM_EPSILON = 1e-5  # peft divides by (ranknum + 1e-5); kept so that peft checkpoints give peft's outputs
FACTORS = {"lora_A": 0, "lora_E": 0, "lora_B": 1}  # each factor and its rank dimension

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AdaLoraConfig(AdapterConfig):
    """init_r / target_r: rank per module at the start / on average at the end of the schedule.
    beta1 / beta2: EMA factors of sensitivity / uncertainty. tinit: steps before pruning starts;
    tfinal: steps at the end with the final ranks fixed; deltaT: steps between maskings;
    total_step: the number of optimizer steps of the training run (required).
    alpha: scale numerator; dropout: on the layer input; orth_reg_weight: weight of the
    orthogonality penalty; target_modules / layers: as LoraConfig.
    rank_pattern: which triplets each module keeps ({module: [bool] * init_r}), set when the rank
    allocation fixes the final ranks; a saved adapter then holds only those. Before that, a saved
    adapter holds all init_r triplets (the pruned ones with E = 0) and can go on training."""

    method = "adalora"
    set_by_training = frozenset({"rank_pattern"})
    run_length_fields = frozenset({"total_step"})

    init_r: int = 12
    target_r: int = 8
    beta1: float = 0.85
    beta2: float = 0.85
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    target_modules: list[str] | str | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    layers: list[int] | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        for field in ("init_r", "target_r", "deltaT"):
            check_int(field, getattr(self, field))
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): "
                              "AdaLoRA only prunes ranks")
        for field in ("beta1", "beta2"):
            check_number(field, getattr(self, field), 0.0, 1.0)
        for field in ("tinit", "tfinal"):
            check_int(field, getattr(self, field), minimum=0)
        if self.total_step is None:
            raise ConfigError("AdaLoRA needs total_step, the number of optimizer steps of the training run, "
                              "to schedule its rank budget")
        check_int("total_step", self.total_step)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"the schedule leaves no steps to prune ranks: tinit ({self.tinit}) must be below "
                f"total_step - tfinal ({self.total_step} - {self.tfinal} = {self.total_step - self.tfinal}); "
                "lower tinit or tfinal, or raise total_step"
            )
        check_number("alpha", self.alpha, positive=True)
        check_number("dropout", self.dropout, 0.0, 1.0)
        check_number("orth_reg_weight", self.orth_reg_weight, low=0.0)
        self.target_modules = check_target_modules(self.target_modules, required=False)
        self.layers = check_layers(self.layers)
        if self.rank_pattern is not None:
            self._check_rank_pattern()

    def _check_rank_pattern(self) -> None:
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must map module names to lists of booleans, "
                              f"got {type(self.rank_pattern).__name__}")
        for module, keep in self.rank_pattern.items():
            if not isinstance(keep, list) or len(keep) != self.init_r or not all(isinstance(k, bool) for k in keep):
                raise ConfigError(f"rank_pattern[{module!r}] must be a list of {self.init_r} booleans "
                                  "(one per initial rank)")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_r + RANKNUM_EPSILON)

    def rank_of(self, module_name: str) -> int:
        if self.rank_pattern is None or module_name not in self.rank_pattern:
            return self.init_r
        return sum(self.rank_pattern[module_name])

    def sites(self, model: nn.Module) -> list[Site]:
        return find_sites(model, "linear", self.layers, self.target_modules or default_targets(model, self.method))

    def tensors_to_save(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Once the final ranks are fixed, only the kept triplets, as peft saves them."""
        if not self.rank_pattern:
            return tensors
        kept = {}
        for key, tensor in tensors.items():
            module, _, param = key.partition(".adapter.")
            keep = self.rank_pattern.get(module)
            dim = FACTORS[param]
            if keep is not None and tensor.shape[dim] == len(keep):  # not yet cut down (a loaded one is)
                tensor = _select(tensor, torch.tensor(keep, dtype=torch.bool, device=tensor.device), dim)
            kept[key] = tensor
        return kept

    def build(self, site: Site, device: torch.device | str | None = None) -> AdaLoraAdapter:
        r = self.rank_of(site.module_name)
        return AdaLoraAdapter(site.in_features, site.out_features, r, self.scale, self.dropout, device)


class AdaLoraAdapter(LowRankAdapter):
    """The SVD-shaped update of one linear layer. ``forward(x, y)`` returns y + delta(x)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, device=None):
        super().__init__()
        self.scale = scale
        self.dropout = dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_E = nn.Parameter(torch.empty(r, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device))
        self.keep: torch.Tensor | None = None  # the triplets the rank allocation keeps (bool [r]); None: all
        if not is_meta(device):
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        self.lora_E.zero_()
        self.lora_A.normal_(0.0, 0.02)
        self.lora_B.normal_(0.0, 0.02)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return F.linear(F.linear(x, self.lora_A * self.lora_E) * self.scale, self.lora_B)  # scaled at width r

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A * E [r, in], B [out, r], scale): pruned triplets have E = 0, so their rows are zero."""
        return self.lora_A * self.lora_E, self.lora_B, self.scale

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0] if self.keep is None else int(self.keep.sum())

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        self.keep = keep
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


class RankAllocator(MethodTraining):
    """AdaLoRA's budget schedule and importance scores for one adapter being trained.

    An adapter loaded with a rank_pattern has finished its schedule (its pruned triplets are gone):
    its allocator does nothing."""

    def __init__(self, name: str, config: AdaLoraConfig, modules: dict[str, AdaLoraAdapter]) -> None:
        self.name = name
        self.config = config
        self.modules = modules
        self.initial_budget = sum(m.lora_E.shape[0] for m in modules.values())
        self.target_budget = config.target_r * len(modules)
        self.finished = config.rank_pattern is not None
        self.final_pattern: dict[str, list[bool]] | None = None
        self.scores: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: tuple[int, int] | None = None  # (tensor id, version) of one parameter at the last step()
        self._warned_unstepped = self._warned_no_grad = False

    @property
    def end(self) -> int:
        """The step at which the final ranks are fixed."""
        return self.config.total_step - self.config.tfinal

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask) at ``step``: the cubic schedule of the paper."""
        config = self.config
        if step <= config.tinit:
            return self.initial_budget, False
        if step >= self.end:
            return self.target_budget, True
        remaining = 1 - (step - config.tinit) / (self.end - config.tinit)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % config.deltaT == 0

    def after_step(self, global_step: int) -> AdaLoraConfig | None:
        """Update importance and mask; on the step that fixes the final ranks, returns the config
        with them as its rank_pattern (saving then keeps only those)."""
        if self.finished:
            return None
        fixed = None
        if self.final_pattern is not None:
            self._apply(self.final_pattern)
        elif global_step >= self.end:
            self.final_pattern = self.mask_to_budget(self.target_budget)
            self.scores = {}
            logger.info(self.summary())
            fixed = dataclasses.replace(self.config, rank_pattern=self.final_pattern)
        else:
            self._update_importance()
            budget, mask = self.budget(global_step)
            if mask:
                self.mask_to_budget(budget)
        self._seen = self._version()
        return fixed

    def before_forward(self) -> None:
        self.check_stepped()

    def regularization(self) -> torch.Tensor:
        return self.orthogonality_penalty()

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        missing = False
        for module_name, module in self.modules.items():
            for param_name in FACTORS:
                param = getattr(module, param_name)
                if param.grad is None:
                    missing = True
                    continue
                sensitivity = (param * param.grad).abs()
                key = (module_name, param_name)
                if key not in self.scores:
                    self.scores[key] = (torch.zeros_like(param), torch.zeros_like(param))
                smoothed, uncertainty = self.scores[key]
                smoothed.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
                uncertainty.mul_(beta2).add_((sensitivity - smoothed).abs(), alpha=1 - beta2)
        if missing and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"AdaLoRA adapter {self.name!r}: model.step() found parameters without gradients, so their "
                "importance was not updated. Call model.step(global_step) after optimizer.step() and before "
                "optimizer.zero_grad().",
                stacklevel=3,
            )

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """Score per triplet: E's score plus the mean scores of its row of A and its column of B."""
        scores = {}
        for module_name, module in self.modules.items():
            r = module.lora_E.shape[0]
            zeros = torch.zeros(r, device=module.lora_E.device)
            parts = {}
            for param_name in FACTORS:
                entry = self.scores.get((module_name, param_name))
                parts[param_name] = None if entry is None else entry[0] * entry[1]
            score_E = zeros if parts["lora_E"] is None else parts["lora_E"].view(-1)
            score_A = zeros if parts["lora_A"] is None else parts["lora_A"].mean(dim=1)
            score_B = zeros if parts["lora_B"] is None else parts["lora_B"].mean(dim=0)
            scores[module_name] = score_E + score_A + score_B
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Keep the ``budget`` most important triplets over all modules (exactly that many, even
        when scores tie) and zero the values of the rest."""
        scores = self._triplet_scores()
        ranking = torch.argsort(torch.cat(list(scores.values())), descending=True, stable=True)
        keep = torch.zeros(self.initial_budget, dtype=torch.bool, device=ranking.device)
        keep[ranking[:budget]] = True
        pattern = {name: part.tolist() for name, part in zip(scores, keep.split([len(s) for s in scores.values()]))}
        self._apply(pattern)
        return pattern

    def _apply(self, pattern: dict[str, list[bool]]) -> None:
        for module_name, keep in pattern.items():
            module = self.modules[module_name]
            module.apply_mask(torch.tensor(keep, dtype=torch.bool, device=module.lora_E.device))

    # ---- training checkpoints --------------------------------------------------------------------
    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the allocation carries from step to step, for a training checkpoint: whether the final
        ranks are fixed ("final"), each module's mask, the importance averages and, once the final
        ranks are fixed, the pruned triplets. A saved adapter leaves those out, yet training still
        moves them (the orthogonality penalty spans all init_r rows), so an exact resume needs them."""
        if self.finished:
            return {}
        final = self.final_pattern is not None
        state = {"final": torch.tensor(final)}
        for module_name, module in self.modules.items():
            if module.keep is None:
                continue
            state[f"{module_name}.keep"] = module.keep.clone()
            if final:
                for param_name, dim in FACTORS.items():
                    state[f"{module_name}.{param_name}.pruned"] = _select(getattr(module, param_name), ~module.keep,
                                                                          dim)
        for (module_name, param_name), (smoothed, uncertainty) in self.scores.items():
            state[f"{module_name}.{param_name}.sensitivity"] = smoothed.clone()
            state[f"{module_name}.{param_name}.uncertainty"] = uncertainty.clone()
        return state

    @torch.no_grad()
    def load_state_dict(
        self, state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], AdaLoraConfig | None]:
        """Take back ``state_dict()``; returns the checkpoint's adapter tensors ``saved`` (keyed as
        ``AdapterModel.adapter_state_dict``) at full width, the pruned triplets back in their rows,
        and, once the final ranks were fixed, the config holding them.

        Masks are restored as they were, not re-applied: between maskings the optimizer may have
        moved a pruned value away from zero, and the run goes on from exactly that."""
        if self.finished:
            return saved, None
        if "final" not in state:
            raise AdapterFileError(
                f"the checkpoint of AdaLoRA adapter {self.name!r} holds no rank-allocation state (an older "
                "adapterkit wrote it), so training cannot resume exactly; train again into a new output folder"
            )
        final = bool(state["final"])
        full, pattern, self.scores = dict(saved), {}, {}
        for module_name, module in self.modules.items():
            keep = state.get(f"{module_name}.keep")
            module.keep = None if keep is None else keep.to(module.lora_E.device)
            if final:
                pattern[module_name] = keep.tolist()
            for param_name, dim in FACTORS.items():
                prefix, device = f"{module_name}.{param_name}", getattr(module, param_name).device
                if final:
                    key = f"{module_name}.adapter.{param_name}"
                    full[key] = _unselect(saved[key], state[f"{prefix}.pruned"], keep, dim)
                if f"{prefix}.sensitivity" in state:
                    smoothed, uncertainty = state[f"{prefix}.sensitivity"], state[f"{prefix}.uncertainty"]
                    self.scores[(module_name, param_name)] = (smoothed.to(device), uncertainty.to(device))
        self.final_pattern = pattern if final else None
        return full, (dataclasses.replace(self.config, rank_pattern=pattern) if final else None)

    def ranks(self) -> dict[str, int]:
        return {module_name: module.rank for module_name, module in self.modules.items()}

    def summary(self) -> str:
        ranks = self.ranks()
        lines = [f"AdaLoRA {self.name!r}: final ranks, {sum(ranks.values())} in all (target {self.target_budget} = "
                 f"{self.config.target_r} x {len(ranks)} modules, from {self.initial_budget})"]
        lines += [f"  {module_name}: {rank}" for module_name, rank in ranks.items()]
        return "\n".join(lines)

    def orthogonality_penalty(self) -> torch.Tensor:
        """orth_reg_weight * mean over A and B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F."""
        terms = []
        for module in self.modules.values():
            for gram in (module.lora_A @ module.lora_A.T, module.lora_B.T @ module.lora_B):
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def check_stepped(self) -> None:
        """Warn once when the adapter's parameters changed (an optimizer step) with no step() after it."""
        if self.finished or self._warned_unstepped:
            return
        seen = self._version()
        if self._seen is None:
            self._seen = seen
        elif seen != self._seen:
            self._warned_unstepped = True
            warnings.warn(
                f"AdaLoRA adapter {self.name!r} is being trained without rank allocation: call "
                "model.step(global_step) after each optimizer step (before optimizer.zero_grad()); "
                "without it AdaLoRA silently trains a fixed rank.",
                stacklevel=3,
            )

    def _version(self) -> tuple[int, int]:
        param = next(iter(self.modules.values())).lora_E
        return id(param), param._version


def _select(tensor: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The triplets ``rows`` (bool) of one factor: rows of A and E, columns of B."""
    return tensor.movedim(dim, 0)[rows].movedim(0, dim).contiguous()


def _unselect(kept: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """The full factor from its kept and pruned triplets (the inverse of two ``_select`` calls)."""
    shape = list(kept.shape)
    shape[dim] = len(keep)
    full = kept.new_empty(shape)
    keep = keep.to(kept.device)
    full.movedim(dim, 0)[keep] = kept.movedim(dim, 0)
    full.movedim(dim, 0)[~keep] = pruned.to(kept.device).movedim(dim, 0)
    return full


def _adalora_from_peft(values: dict) -> dict:
    """peft keys rank_pattern by "<module>.lora_E"."""
    if values.get("rank_pattern"):
        values["rank_pattern"] = {key.removesuffix(".lora_E"): keep for key, keep in values["rank_pattern"].items()}
    return values


def _adalora_to_peft(config: AdaLoraConfig, sites: list[Site], document: dict) -> None:
    if config.target_modules is None:
        document["target_modules"] = [site.module_name for site in sites]
    if config.rank_pattern is not None:
        document["rank_pattern"] = {f"{module}.lora_E": keep for module, keep in config.rank_pattern.items()}
    document["fan_in_fan_out"] = any(site.transposed for site in sites)
    document["bias"] = "none"


register_method(Method(
    "adalora", AdaLoraConfig,
    training=RankAllocator,
    peft=PeftFormat(
        "ADALORA",
        {"init_r": "init_r", "target_r": "target_r", "beta1": "beta1", "beta2": "beta2", "tinit": "tinit",
         "tfinal": "tfinal", "deltaT": "deltaT", "target_modules": "target_modules", "lora_alpha": "alpha",
         "lora_dropout": "dropout", "orth_reg_weight": "orth_reg_weight", "total_step": "total_step",
         "layers_to_transform": "layers", "rank_pattern": "rank_pattern"},
        fresh_init=FRESH_INITS, from_peft=_adalora_from_peft, to_peft=_adalora_to_peft,
    ),
))
