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
    """Greedy answers to ``prompts``, in order. Prompts are grouped by length and left-padded; an
    answer ends at end-of-text or at ``stop``."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    stop_ids = set(_stop_token_ids(tokenizer, stop))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        continuations = greedy_continuations(model, [encoded[i] for i in rows], max_new_tokens, stop_ids, _pad_id(tokenizer))
        for i, tokens in zip(rows, continuations):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[i] = (text.split(stop, 1)[0] if stop else text).strip()
    return answers


def greedy_continuations(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), without the stop token that ended it.

    A row leaves the batch, KV cache included, at its stop token, so the others go on in a smaller
    batch. Short answers in a batch with one long or runaway answer would otherwise be computed
    until that one ends: with HF's ``generate`` that made scoring the demo's held-out strings
    several times slower."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    continuations: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))  # the prompt each batch row belongs to
    cache = None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        cache, tokens = out.cache, out.logits[:, -1].argmax(-1)
        going = [row for row, token in enumerate(tokens.tolist()) if token not in stop_ids]
        for row in going:
            continuations[alive[row]].append(int(tokens[row]))
        if not going:
            break
        if len(going) < len(alive):
            keep = torch.tensor(going)
            cache.batch_select_indices(keep)
            tokens, mask, positions = tokens[keep], mask[keep], positions[keep]
            alive = [alive[row] for row in going]
        ids = tokens.unsqueeze(1)
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    return continuations


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
