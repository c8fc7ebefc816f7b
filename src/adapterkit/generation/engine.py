"""The engine: rows admitted, prefilled in chunks, decoded together, and finished one by one
(see the package's docstring for the whole loop)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compose import Composition
from ..errors import ConfigError, GenerationError
from .beams import BeamSearch
from .detokenizer import Detokenizer, silent_ids
from .kv import RoomyLayer, pad_left, roomy_cache
from .sampling import Sampling, TokenLogprob, logprob_of, pick


class Active:
    """A row's adapter when it should run through whatever the model has active (``set_active``),
    as scoring does; rows that name adapters run through ``mixed_adapters``."""

    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = Active()

PADDING_WORTH_A_FORWARD = 40  # padding tokens that cost what a forward pass's fixed part does (CPU, 135M)


@dataclass(eq=False)
class Generation:
    """One prompt's way through the engine. ``on_token(generation, text, logprob)`` is called on
    the engine's thread for every generated token with the text it released (possibly ""), and
    ``on_done(generation)`` once at the end, whatever the outcome. The end-of-text token that
    stops a row is in ``tokens`` and ``logprobs`` (as OpenAI counts and scores it), not in ``text``.
    A beam-search row (``sampling.num_beams`` > 1) knows its answer only when the search ends: its
    tokens are then taken one by one, ``on_token`` called for each, as a greedy row's would be."""

    prompt: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    adapter: str | None | Active = ACTIVE
    on_token: Callable[[Generation, str, TokenLogprob | None], None] | None = None
    on_done: Callable[[Generation], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    submitted: float = 0.0
    started: float | None = None  # admitted into a batch
    first_token: float | None = None
    finished: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (safe from any thread)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class _Row:
    """A generation's per-row state inside the engine. A beam-search row holds one batch row per
    beam, all of them this same object."""

    def __init__(self, generation: Generation, tokenizer, device: torch.device, silent: frozenset[int],
                 eos_ids: set[int]) -> None:
        self.generation = generation
        sampling = generation.sampling
        self.text = Detokenizer(tokenizer, sampling.stop, silent)
        seed = sampling.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.beams = (BeamSearch(sampling.num_beams, sampling.length_penalty, sampling.max_tokens, eos_ids, device)
                      if sampling.num_beams > 1 else None)


class _Batch:
    """Rows decoding together: next inputs, attention mask, positions and KV cache. Padding is on
    the left, so every row's mask is zeros, then ones. A batch being prefilled also holds its whole
    prompt block and how many columns of it the cache has seen."""

    def __init__(self, rows: list[_Row], inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.rows, self.inputs, self.mask, self.positions = rows, inputs, mask, positions
        self.cache = None
        self.consumed = 0  # prefill: prompt columns already in the cache

    @classmethod
    def from_prompts(cls, rows: list[_Row], pad_id: int, device: torch.device) -> _Batch:
        prompts = [row.generation.prompt for row in rows]
        width = max(len(p) for p in prompts)
        inputs = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            inputs[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
            mask[i, width - len(prompt) :] = 1
        return cls(rows, inputs, mask, (mask.cumsum(-1) - 1).clamp(min=0))

    @property
    def size(self) -> int:
        return len(self.rows)

    def keep_rows(self, keep: list[int]) -> None:
        """Only the rows at ``keep`` are prefilled, before the first chunk (the cache is empty)."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.inputs, self.mask, self.positions = self.inputs[index], self.mask[index], self.positions[index]

    @property
    def prefilled(self) -> bool:
        return self.consumed >= self.inputs.shape[1]

    @property
    def joinable(self) -> bool:
        return cache_joinable(self.cache)

    def select(self, keep: list[int], tokens: list[int]) -> _Batch | None:
        """The rows at ``keep``, in that order, ready to decode ``tokens`` (one each) next; None
        when no row is left. A row may be kept twice: two beams that extend one hypothesis."""
        if not keep:
            return None
        device = self.mask.device
        if keep != list(range(self.size)):
            index = torch.tensor(keep, device=device)
            self.cache.batch_select_indices(index)
            self.rows = [self.rows[i] for i in keep]
            self.mask, self.positions = self.mask[index], self.positions[index]
        self.inputs = torch.tensor(tokens, device=device).unsqueeze(1)
        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        self._drop_empty_columns()
        return self

    def join(self, other: _Batch) -> _Batch:
        """These rows and ``other``'s in one batch, the shorter history padded on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.splice(theirs, width - 1)
        self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(other.mask, width, 1)])
        self.inputs = torch.cat([self.inputs, other.inputs])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows = self.rows + other.rows
        return self

    def _drop_empty_columns(self) -> None:
        """Cut the left columns that no row attends to any more (they were finished rows')."""
        empty = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if empty and self.joinable:
            self.mask = self.mask[:, empty:]
            for layer in self.cache.layers:
                layer.drop_left(empty)


def cache_joinable(cache) -> bool:
    """Whether other rows can be spliced into ``cache``: every layer one of ours, or made one of
    ours when the first forward pass makes it (a sliding-window layer, say, keeps only its last
    positions and cannot be)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return getattr(cache, "layer_class_to_replicate", None) is RoomyLayer
    return all(isinstance(layer, RoomyLayer) for layer in layers)


def _lanes(rows: list[_Row]) -> dict[_Row, list[int]]:
    """Each row's places in the batch, in order: one, or one per beam."""
    lanes: dict[_Row, list[int]] = {}
    for i, row in enumerate(rows):
        lanes.setdefault(row, []).append(i)
    return lanes


def pad_token_id(tokenizer) -> int:
    """The id that fills left padding: the tokenizer's pad, else its end-of-text, else 0."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


class Engine:
    """Continuous batching over one model. ``submit`` from any thread; ``step`` (one prefill chunk
    for newcomers, then one token for every running row) from one thread at a time; ``lock`` is
    held during each step, so whoever changes the model's adapters between steps takes it too.

    Newcomers are admitted at every step while rows are free, into a prefill batch of their own,
    and the batches being prefilled take one chunk each in turn: a short prompt that arrives while
    a long one is prefilled waits for one chunk of it per batch ahead, not for its whole prefill
    (a 7,000-token prompt held every later request for its 14 chunks), and a long prompt cannot
    be starved by short ones, since each new batch joins the end of the turn. A model whose cache
    cannot take rows spliced in (sliding-window layers) runs one batch at a time instead."""

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 32, max_prefill_tokens: int = 4096) -> None:
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ConfigError("max_batch_size and max_prefill_tokens must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.device = next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)
        self.silent = silent_ids(tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {i for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id]
                        if i is not None}
        self.lock = threading.RLock()
        self.waiting: collections.deque[Generation] = collections.deque()
        self.prefilling: collections.deque[_Batch] = collections.deque()  # in turn, one chunk a step
        self.running: _Batch | None = None
        self.splices = cache_joinable(roomy_cache(model))  # else one batch at a time
        self._work = threading.Condition()

    # ---- feeding and driving -------------------------------------------------------------------
    def submit(self, generation: Generation) -> Generation:
        """Queue ``generation``; a row the engine could not run (bad sampling, an empty prompt, an
        adapter the model refuses) raises here instead of failing the rows batched with it."""
        generation.sampling.check()
        if not generation.prompt:
            raise ConfigError("the prompt is empty")
        if generation.sampling.num_beams > self.max_batch_size:
            raise ConfigError(f"num_beams = {generation.sampling.num_beams} needs as many rows of the batch; "
                              f"this engine's max_batch_size is {self.max_batch_size}")
        self._check_adapter(generation.adapter)
        generation.submitted = time.perf_counter()
        with self._work:
            self.waiting.append(generation)
            self._work.notify()
        return generation

    def _check_adapter(self, adapter: str | Composition | None | Active) -> None:
        """What the batched forward would raise for this row's adapter, raised now: there it
        would fail every row of the batch."""
        if adapter is ACTIVE:
            return
        check = getattr(self.model, "check_adapter", None)
        if check is None:
            model = type(self.model).__name__
            raise ConfigError(f"rows that name adapters ({adapter!r}) need an AdapterModel, not a {model}")
        check(adapter)

    @property
    def in_flight(self) -> int:
        """Rows being prefilled or decoded (a beam-search row counts once per beam once decoding).
        Read without the lock (by /health): ``tuple`` copies the queue in one step."""
        return sum(batch.size for batch in (*tuple(self.prefilling), self.running) if batch is not None)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.prefilling) or self.running is not None

    def wait_for_work(self, timeout: float) -> bool:
        with self._work:
            return self._work.wait_for(self.has_work, timeout)

    def run(self, generations: Sequence[Generation]) -> list[Generation]:
        """Submit ``generations`` and step until all of them are done (on the caller's thread)."""
        for generation in generations:
            self.submit(generation)
        while not all(g.done for g in generations):
            self.step()
        return list(generations)

    @torch.inference_mode()
    def step(self) -> int:
        """One prefill chunk (when newcomers wait) and one decoded token for each running row;
        returns how many tokens the step generated."""
        with self.lock:
            self._drop_cancelled_waiting()
            self._admit()
            made = self._prefill_chunk() if self.prefilling else 0
            if self.running is not None:
                made += self._decode()
            return made

    # ---- the step's parts ----------------------------------------------------------------------
    def _drop_cancelled_waiting(self) -> None:
        for generation in [g for g in self.waiting if g.cancelled]:
            self.waiting.remove(generation)
            self._finish(generation, "cancelled")

    def _admit(self) -> None:
        """Newcomers into a new prefill batch: the oldest always (so none waits forever), then
        those whose prompt lengths are closest to it, while the left-padded block fits the prefill
        budget and each one adds fewer padding tokens than a forward pass of its own would cost.
        Padding is computed like real tokens, so mixing a 10-token prompt into a 250-token block
        wastes 240 tokens of work; a separate forward costs about ``PADDING_WORTH_A_FORWARD``.
        A beam-search row is prefilled once but decodes ``num_beams`` rows: it needs that much room."""
        if not self.splices and (self.prefilling or self.running is not None):
            return
        reserved = sum(row.generation.sampling.num_beams for batch in self.prefilling for row in batch.rows)
        room = self.max_batch_size - (self.running.size if self.running else 0) - reserved
        if not self.waiting or self.waiting[0].sampling.num_beams > room:
            return
        oldest = self.waiting[0]
        chosen, width, used = [oldest], len(oldest.prompt), oldest.sampling.num_beams
        for generation in sorted(list(self.waiting)[1:], key=lambda g: abs(len(g.prompt) - len(oldest.prompt))):
            if used >= room:
                break
            wider = max(width, len(generation.prompt))
            padding = (wider - width) * len(chosen) + wider - len(generation.prompt)
            if (used + generation.sampling.num_beams <= room and wider * (len(chosen) + 1) <= self.max_prefill_tokens
                    and padding <= PADDING_WORTH_A_FORWARD):
                chosen.append(generation)
                width, used = wider, used + generation.sampling.num_beams
        for generation in chosen:
            self.waiting.remove(generation)
        now = time.perf_counter()
        for generation in chosen:
            generation.started = now
        rows = [_Row(g, self.tokenizer, self.device, self.silent, self.eos_ids) for g in chosen]
        batch = _Batch.from_prompts(rows, self.pad_id, self.device)
        batch.cache = roomy_cache(self.model)
        self.prefilling.append(batch)

    def _prefill_chunk(self) -> int:
        """One chunk of the first batch in turn, which then goes to the end of the turn (or, once
        prefilled, samples its first tokens and joins the running rows). Rows that ended meanwhile
        (cancelled, or failed while their prompt was scored) leave first: a 7,000-token prompt
        whose client left would otherwise take its turns to the end."""
        batch = self.prefilling[0]
        if not self._drop_ended_rows(batch):
            self.prefilling.popleft()
            return 0
        start = batch.consumed
        end = min(batch.inputs.shape[1], start + max(1, self.max_prefill_tokens // batch.size))
        scoring = any(row.generation.sampling.prompt_logprobs for row in batch.rows)
        try:
            logits = self._forward(batch, batch.inputs[:, start:end], batch.mask[:, :end],
                                   batch.positions[:, start:end], keep=end - start if scoring else 1)
        except Exception as error:  # the model itself failed: every row of this forward fails
            self.prefilling.popleft()
            self._fail_all(batch.rows, error)
            return 0
        batch.consumed = end
        if scoring:
            self._score_prompt(batch, logits, start, end)
        self.prefilling.rotate(-1)  # to the end of the turn (kept in the queue, so in_flight counts it)
        if not batch.prefilled:
            return 0
        self.prefilling.pop()
        ended = {i for i, row in enumerate(batch.rows)
                 if row.generation.done or row.generation.sampling.max_tokens == 0}
        for i in ended:
            if not batch.rows[i].generation.done:
                self._finish(batch.rows[i].generation, "length")
        made = batch.size - len(ended)
        keep, tokens = self._advance(batch.rows, logits[:, -1], skip=ended)
        batch = batch.select(keep, tokens)
        if batch is not None:
            self.running = batch if self.running is None else self.running.join(batch)
        return made

    def _drop_ended_rows(self, batch: _Batch) -> bool:
        """Finish the batch's cancelled rows and drop the rows that ended; whether any is left.
        A batch of several rows fits one chunk (admission keeps its block within the budget), so
        a row leaves one before its first chunk; a single row's batch goes as a whole."""
        keep = []
        for i, row in enumerate(batch.rows):
            generation = row.generation
            if generation.cancelled and not generation.done:
                self._finish(generation, "cancelled")
            if not generation.done:
                keep.append(i)
        if keep and len(keep) < batch.size and batch.consumed == 0:
            batch.keep_rows(keep)
        return bool(keep)

    def _decode(self) -> int:
        batch = self.running
        try:
            logits = self._forward(batch, batch.inputs, batch.mask, batch.positions, keep=1)
        except Exception as error:
            self.running = None
            self._fail_all(batch.rows, error)
            return 0
        made = batch.size
        keep, tokens = self._advance(batch.rows, logits[:, -1])
        self.running = batch.select(keep, tokens)
        return made

    def _forward(self, batch: _Batch, inputs, mask, positions, keep: int) -> torch.Tensor:
        kwargs = dict(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=batch.cache, use_cache=True,
                      logits_to_keep=keep)
        names = [row.generation.adapter for row in batch.rows]
        if all(name is ACTIVE for name in names):
            out = self.model(**kwargs)
        else:
            if any(name is ACTIVE for name in names):
                raise ConfigError("rows that follow the active adapter cannot share a batch with rows that name one")
            with self.model.mixed_adapters(names):
                out = self.model(**kwargs)
        batch.cache = out.cache
        return out.logits

    # ---- per row -------------------------------------------------------------------------------
    def _advance(self, rows: list[_Row], logits: torch.Tensor,
                 skip: set[int] = frozenset()) -> tuple[list[int], list[int]]:
        """Pick each row's next token (each beam's, for a beam-search row) and apply it; (the batch
        rows that go on, one entry per beam that extends them, and the token each decodes next)."""
        best, tokens = logits.max(-1)  # NaN and +inf win the max, so checking the best logit finds them
        finite = torch.isfinite(best).tolist()
        greedy = tokens.tolist()
        keep, chosen = [], []
        for row, lanes in _lanes(rows).items():
            generation = row.generation
            if lanes[0] in skip:
                continue
            if generation.cancelled:
                self._finish(generation, "cancelled")
                continue
            try:
                if not all(finite[i] for i in lanes):
                    raise FloatingPointError("the model produced non-finite logits for this row")
                going_on = (self._search(row, lanes, logits) if row.beams is not None
                            else self._pick(row, lanes[0], logits[lanes[0]], greedy[lanes[0]]))
            except Exception as error:  # this row alone fails; the others go on
                generation.error = f"{type(error).__name__}: {error}"
                self._finish(generation, "error")
                continue
            for lane, token in going_on:
                keep.append(lane)
                chosen.append(token)
        return keep, chosen

    def _pick(self, row: _Row, lane: int, logits: torch.Tensor, greedy: int) -> list[tuple[int, int]]:
        """A sampled or greedy row's next token, taken: [(lane, token)] while the row goes on."""
        generation = row.generation
        sampling = generation.sampling
        token = greedy
        if sampling.temperature != 0 or sampling.penalised:
            token = pick(logits, sampling, generation.prompt, generation.tokens, row.generator)
        return [(lane, token)] if self._take(row, token, logits) else []

    def _search(self, row: _Row, lanes: list[int], logits: torch.Tensor) -> list[tuple[int, int]]:
        """One step of a beam-search row: the lane of the beam each new beam extends and its token
        (before the first step one lane stands for every beam). When the search ends, its best
        hypothesis is taken token by token, so that stop strings cut it as they cut a greedy answer."""
        beams = row.beams
        going_on = beams.step(logits[lanes])
        if beams.done:
            for token in beams.best:
                if not self._take(row, token, None):
                    break
        return [(lanes[beam] if len(lanes) > 1 else lanes[0], token) for beam, token in going_on]

    def _take(self, row: _Row, token: int, logits: torch.Tensor | None) -> bool:
        """Apply ``token`` to the row (``logits`` scored it, when the row asks for logprobs);
        whether the row goes on."""
        generation = row.generation
        if generation.first_token is None:
            generation.first_token = time.perf_counter()
        logprob = (logprob_of(token, logits, generation.sampling.logprobs)
                   if generation.sampling.logprobs is not None else None)
        generation.tokens.append(token)
        if logprob is not None:
            generation.logprobs.append(logprob)
        if token in self.eos_ids:  # counted and scored like any token (as OpenAI and HF do), but never text
            self._emit(generation, row.text.rest(), logprob)
            self._finish(generation, "stop")
            return False
        piece, stopped = row.text.add(token)
        if stopped:
            self._emit(generation, piece, logprob)
            self._finish(generation, "stop")
            return False
        if len(generation.tokens) >= generation.sampling.max_tokens:
            self._emit(generation, piece + row.text.rest(), logprob)
            self._finish(generation, "length")
            return False
        self._emit(generation, piece, logprob)
        return True

    def _score_prompt(self, batch: _Batch, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-probabilities of the prompt tokens in columns start..end (the logits at column c
        predict column c + 1; a prompt's first token has none)."""
        width = batch.inputs.shape[1]
        for i, row in enumerate(batch.rows):
            sampling = row.generation.sampling
            if not sampling.prompt_logprobs or row.generation.done:
                continue
            if not torch.isfinite(logits[i]).all():
                row.generation.error = "FloatingPointError: the model produced non-finite logits for this prompt"
                self._finish(row.generation, "error")
                continue
            first = width - len(row.generation.prompt)
            if start <= first < end:
                row.generation.prompt_logprobs.append(TokenLogprob(int(batch.inputs[i, first]), None))
            for column in range(max(start, first), min(end, width - 1)):
                token = int(batch.inputs[i, column + 1])
                row.generation.prompt_logprobs.append(
                    logprob_of(token, logits[i, column - start], sampling.logprobs or 0))

    def _emit(self, generation: Generation, piece: str, logprob: TokenLogprob | None) -> None:
        generation.text += piece
        if generation.on_token is not None:
            generation.on_token(generation, piece, logprob)

    def _finish(self, generation: Generation, reason: str) -> None:
        generation.finish_reason = reason
        generation.finished = time.perf_counter()
        if generation.on_done is not None:
            generation.on_done(generation)

    def _fail_all(self, rows: list[_Row], error: Exception) -> None:
        for row in rows:
            row.generation.error = f"{type(error).__name__}: {error}"
            self._finish(row.generation, "error")


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    adapters: Sequence[str | None] | None = None,
    max_batch_size: int = 32,
    on_done: Callable[[Generation], None] | None = None,
) -> list[Generation]:
    """Every prompt (token ids) through one engine, ``max_batch_size`` rows in flight: row i through
    ``adapters[i]`` when given, else through the model's active adapters; ``on_done`` is called as
    each row ends (a progress bar's tick). A row that fails raises GenerationError (the server,
    which must answer the other rows, drives ``Engine`` itself)."""
    engine = Engine(model, tokenizer, max_batch_size)
    names = list(adapters) if adapters is not None else [ACTIVE] * len(prompts)
    done = engine.run([Generation(list(p), sampling, name, on_done=on_done)
                       for p, name in zip(prompts, names, strict=True)])
    failed = next((g for g in done if g.error is not None), None)
    if failed is not None:
        raise GenerationError(f"generation failed for prompt {done.index(failed)}: {failed.error}")
    return done
