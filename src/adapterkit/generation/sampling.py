"""How a row picks its tokens: the sampling settings a request gives, their checks, and the
picking itself (penalties as HF and OpenAI define them, temperature, top-p) with the
log-probabilities reported for the chosen tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

MIN_TEMPERATURE = 1e-3  # below this, logits / temperature overflows: use 0 (greedy)
MIN_REPETITION_PENALTY = 1e-2  # dividing logits by less overflows them
MAX_STOPS, MAX_STOP_CHARS = 4, 128
MAX_LOGPROBS = 20
SEED_LIMIT = 2**63  # torch generators take seeds below this (and negative ones, which we refuse)
MAX_BEAMS = 16  # each beam is a row of the batch, with its own KV cache
MAX_LENGTH_PENALTY = 10.0  # length ** penalty stays a float for any answer length


@dataclass
class Sampling:
    """How one row picks its tokens. Temperature 0 is greedy. Penalties follow OpenAI
    (``frequency_penalty``, ``presence_penalty``: over the tokens generated so far) and HF
    (``repetition_penalty``: over prompt and generated tokens, dividing positive logits).
    ``num_beams`` > 1 is HF's beam search (``do_sample=False``, ``early_stopping=False``), its
    hypotheses ranked by summed log-probability / ``generated_length ** length_penalty``; stop
    strings then cut the best hypothesis, they do not steer the search."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # how many alternatives to report per token (0: the chosen one only)
    prompt_logprobs: bool = False  # also report the prompt tokens' log-probabilities
    num_beams: int = 1
    length_penalty: float = 1.0

    def check(self) -> Sampling:
        """Itself, or a ConfigError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < (0 if self.prompt_logprobs else 1):
            raise ConfigError(f"max_tokens must be a positive integer (0 only to score the prompt), "
                              f"got {self.max_tokens!r}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 100):
            raise ConfigError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and 100, "
                              f"got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise ConfigError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be between -2 and 2, got {getattr(self, name)!r}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            raise ConfigError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and 10 (1: none), "
                              f"got {self.repetition_penalty!r}")
        check_stops(self.stop)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        self._check_beams()
        return self

    def _check_beams(self) -> None:
        """Beam search here is HF's deterministic one: what it would have to combine with
        (sampling, penalties, per-token log-probabilities) is refused rather than ignored."""
        if type(self.num_beams) is not int or not 1 <= self.num_beams <= MAX_BEAMS:  # True is no count
            raise ConfigError(f"num_beams must be an integer from 1 (greedy) to {MAX_BEAMS}, got {self.num_beams!r}")
        if (type(self.length_penalty) not in (int, float)
                or not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY):
            raise ConfigError(f"length_penalty must be a number from {-MAX_LENGTH_PENALTY} to {MAX_LENGTH_PENALTY}, "
                              f"got {self.length_penalty!r}")
        if self.num_beams == 1:
            if self.length_penalty != 1.0:
                raise ConfigError("length_penalty ranks beam-search hypotheses: it needs num_beams > 1")
            return
        unsupported = [name for name, used in (
            ("temperature", self.temperature != 0), ("top_p", self.top_p != 1.0),
            ("frequency_penalty", self.frequency_penalty != 0), ("presence_penalty", self.presence_penalty != 0),
            ("repetition_penalty", self.repetition_penalty != 1.0), ("logprobs", self.logprobs is not None),
            ("prompt_logprobs", self.prompt_logprobs)) if used]
        if unsupported:
            raise ConfigError(f"beam search (num_beams = {self.num_beams}) is deterministic and scores whole "
                              f"hypotheses; it is not implemented with {', '.join(unsupported)}: use greedy or "
                              "sampled decoding (num_beams = 1) for those")

    @property
    def penalised(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def check_stops(stops: Sequence[str]) -> None:
    """Stop strings are few and short: the text is searched for each after every token."""
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ConfigError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model (before penalties and temperature) and the
    ``k`` most likely tokens at that position with theirs."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def logprob_of(token: int, logits: torch.Tensor, k: int) -> TokenLogprob:
    """``token`` scored under ``logits`` with the ``k`` likeliest tokens (-inf, never NaN, for one
    the model rules out: clients parse the number)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    value = float(logprobs[token])
    return TokenLogprob(token, value if math.isfinite(value) else -math.inf, top)


def pick(logits: torch.Tensor, sampling: Sampling, prompt: list[int], answer: list[int],
         generator: torch.Generator | None) -> int:
    """The next token after ``prompt`` and the ``answer`` so far: penalties, then temperature and
    top-p (a row's own ``generator``, so that a seed fixes its answer whatever it is batched with)."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(prompt + answer, device=logits.device).unique()
        scores = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(scores < 0, scores * sampling.repetition_penalty,
                                   scores / sampling.repetition_penalty)
    if (sampling.frequency_penalty or sampling.presence_penalty) and answer:
        ids, counts = torch.tensor(answer, device=logits.device).unique(return_counts=True)
        logits = logits.clone()
        logits[ids] -= counts.to(logits.dtype) * sampling.frequency_penalty + sampling.presence_penalty
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        kept = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
        kept[0] = True  # and never less than the likeliest token (a tiny top_p rounds to 0 in float32)
        probs = torch.zeros_like(probs).scatter_(0, order[kept], sorted_probs[kept])
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        raise FloatingPointError("sampling probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=generator))
