"""Scoring a model (with or without adapters) on JSONL examples: loss on the completions, and chrF
or exact match of batched greedy generations."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Iterator, Sequence

import torch
from torch import nn

from .data import IGNORE_INDEX, collate, prompt_and_completion, tokenize_all
from .errors import ConfigError

METRICS = ("chrf", "exact", "none")


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2), 0-100."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(list(hypotheses), [list(references)]).score


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of hypotheses equal to their reference after trimming whitespace."""
    hits = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return 100.0 * hits / max(1, len(references))


def reference_of(example: dict) -> str:
    if "messages" in example:
        return example["messages"][-1]["content"].strip()
    return example["completion"].strip()


def completion_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions whose next token is a completion token, flattened.

    The LM head runs on those positions alone. Prompt and padding positions carry no loss, and with
    a large vocabulary (49k words for SmolLM2) the head and its softmax over every position are a
    fifth of a training step's compute and most of its activation memory."""
    device = next(model.parameters()).device
    batch = {key: tensor.to(device) for key, tensor in batch.items()}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = model.get_output_embeddings()
    if head is None:
        return model(**inputs).logits[:, :-1][keep], targets[keep]
    select = head.register_forward_pre_hook(lambda _, args: (args[0][:, :-1][keep], *args[1:]), prepend=True)
    try:
        logits = model(**inputs).logits
    finally:
        select.remove()
    return logits, targets[keep]


@torch.no_grad()
def completion_loss(model: nn.Module, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 256) -> float:
    """Mean cross-entropy per completion token (every token weighs the same, whatever its batch)."""
    tokenized = sorted(tokenize_all(examples, tokenizer, max_length), key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        logits, targets = completion_logits(model, collate(tokenized[start : start + batch_size], _pad_id(tokenizer)))
        total += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total / max(1, count)


@torch.no_grad()
def generate_batched(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32, stop: str | None = "\n"
) -> list[str]:
    """Greedy answers to ``prompts``, in order, at most ``batch_size`` of them in flight. An answer
    ends at end-of-text or at ``stop``."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths prefill together
    continuations = greedy_continuations(model, [encoded[i] for i in order], max_new_tokens, _stop_token_ids(tokenizer, stop),
                                         _pad_id(tokenizer), batch_size)
    answers: list[str] = [""] * len(prompts)
    for i, tokens in zip(order, continuations):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        answers[i] = (text.split(stop, 1)[0] if stop else text).strip()
    return answers


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, batch_size: int = 32
) -> list[list[int]]:
    """The greedy continuation (token ids) of each prompt, without the stop token that ended it.

    Up to ``batch_size`` rows decode together. A row leaves the batch, KV cache included, when it
    stops, and the next prompts, prefilled together, take the freed places. A batch is never held
    by its one long or runaway answer: with HF's ``generate``, which runs every row until the last
    one ends, answering the demo's German held-out prompts took 2.8 times as long (bench/generate.py)."""
    continuations: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return continuations
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: the caller's order
    running: _Rows | None = None
    while waiting or running is not None:
        room = batch_size - (running.size if running else 0)
        refill = running is None or (running.joinable and room >= min(len(waiting), max(1, batch_size // 2)))
        if waiting and refill:
            owners = [waiting.pop() for _ in range(min(room, len(waiting)))]
            rows = _Rows.from_prompts([prompts[i] for i in owners], owners, pad_id)
        else:
            rows, running = running, None
        tokens = rows.forward(model)
        going = []
        for row, token in enumerate(tokens.tolist()):
            answer = continuations[rows.owners[row]]
            if token not in stop_ids:
                answer.append(token)
                if len(answer) < max_new_tokens:
                    going.append(row)
        rows = rows.select(going, tokens)
        if rows is not None:
            running = rows if running is None else running.join(rows)
    return continuations


class _Rows:
    """Rows being decoded: their prompts' owners, next inputs, attention mask, positions and KV cache.
    Padding is on the left, so every row's mask is zeros, then ones."""

    def __init__(self, owners: list[int], inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache=None) -> None:
        self.owners, self.inputs, self.mask, self.positions, self.cache = owners, inputs, mask, positions, cache

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], owners: list[int], pad_id: int) -> "_Rows":
        width = max(len(p) for p in prompts)
        inputs = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            inputs[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return cls(owners, inputs, mask, (mask.cumsum(-1) - 1).clamp(min=0))

    @property
    def size(self) -> int:
        return len(self.owners)

    @property
    def joinable(self) -> bool:
        """Whether other rows can be spliced into this cache: plain per-position key/value layers
        (a sliding-window layer keeps only its last positions)."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(hasattr(layer, "keys") and not getattr(layer, "is_sliding", False) for layer in layers)

    def forward(self, model: nn.Module) -> torch.Tensor:
        """One forward over the pending inputs; the greedy next token of each row."""
        out = model(input_ids=self.inputs, attention_mask=self.mask, position_ids=self.positions, cache=self.cache,
                    use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1].argmax(-1)

    def select(self, rows: list[int], tokens: torch.Tensor) -> "_Rows | None":
        """The given rows, ready to decode ``tokens`` next; None when no row is left."""
        if not rows:
            return None
        if len(rows) < self.size:
            index = torch.tensor(rows)
            self.cache.batch_select_indices(index)
            self.owners = [self.owners[r] for r in rows]
            tokens, self.mask, self.positions = tokens[index], self.mask[index], self.positions[index]
        self.inputs = tokens.unsqueeze(1)
        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, torch.ones((self.size, 1), dtype=torch.long)], dim=1)
        self._drop_empty_columns()
        return self

    def join(self, other: "_Rows") -> "_Rows":
        """These rows and ``other``'s in one batch, the shorter history padded on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width - 1, -2), _pad_left(theirs.keys, width - 1, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width - 1, -2), _pad_left(theirs.values, width - 1, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.inputs = torch.cat([self.inputs, other.inputs])
        self.positions = torch.cat([self.positions, other.positions])
        self.owners = self.owners + other.owners
        return self

    def _drop_empty_columns(self) -> None:
        """Cut the left columns that no row attends to any more (they were its finished rows')."""
        empty = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if empty and self.joinable:
            self.mask = self.mask[:, empty:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., empty:, :], layer.values[..., empty:, :]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: list[dict],
    metric: str = "chrf",
    batch_size: int = 32,
    max_new_tokens: int = 48,
    max_length: int = 256,
) -> dict:
    """{"examples", "loss", "perplexity", metric, "predictions", "seconds"}; the model is left in
    the mode it was in."""
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not one of {list(METRICS)}")
    started = time.perf_counter()
    with _eval_mode(model):
        loss = completion_loss(model, tokenizer, examples, batch_size, max_length)
    result: dict = {"examples": len(examples), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if metric != "none":
        result[metric], result["predictions"] = score_generations(model, tokenizer, examples, metric, batch_size, max_new_tokens)
    result["seconds"] = time.perf_counter() - started
    return result


def score_generations(
    model: nn.Module, tokenizer, examples: list[dict], metric: str = "chrf", batch_size: int = 32, max_new_tokens: int = 48
) -> tuple[float, list[str]]:
    """(chrF or exact match, predictions) of greedy answers to the examples' prompts. Without the
    loss pass of ``evaluate``, which costs as much as a third of the scoring on CPU."""
    if metric not in ("chrf", "exact"):
        raise ConfigError(f"metric {metric!r} is not one of ['chrf', 'exact']")
    prompts = [prompt_and_completion(e, tokenizer)[0] for e in examples]
    references = [reference_of(e) for e in examples]
    stop = None if any("messages" in e for e in examples) else "\n"
    with _eval_mode(model):
        predictions = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, stop)
    return (chrf if metric == "chrf" else exact_match)(predictions, references), predictions


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _stop_token_ids(tokenizer, stop: str | None) -> list[int]:
    """End-of-text, plus the stop string's token when it is a single token (cheap early exit)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop:
        stop_ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(stop_ids) == 1 and stop_ids[0] not in ids:
            ids.append(stop_ids[0])
    return ids
