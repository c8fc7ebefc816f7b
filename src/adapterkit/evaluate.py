"""Scoring a model (with or without adapters) on JSONL examples: loss on the completions, and chrF
or exact match of batched greedy (or beam-search) generations."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX, collate, prompt_and_completion, tokenize_all
from .errors import ConfigError
from .generation import Sampling, generate, pad_token_id

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
def completion_loss(model: nn.Module, tokenizer, examples: list[dict], batch_size: int = 16,
                    max_length: int = 256) -> float:
    """Mean cross-entropy per completion token (every token weighs the same, whatever its batch)."""
    tokenized = sorted(tokenize_all(examples, tokenizer, max_length), key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        logits, targets = completion_logits(model, collate(tokenized[start : start + batch_size],
                                                           pad_token_id(tokenizer)))
        total += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total / max(1, count)


def generate_batched(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    stop: str | None = "\n",
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    progress: Callable[[], Any] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[str]:
    """Greedy answers to ``prompts`` (HF's beam search with ``num_beams`` > 1), in order, through
    the active adapters, at most ``batch_size`` of them in flight (the generation engine: finished
    rows leave, waiting prompts take their places; each prompt decodes ``num_beams`` rows). An
    answer ends at end-of-text or at ``stop``; penalties and beams as in ``Sampling``.
    ``progress`` is called once per finished answer."""
    sampling = Sampling(max_tokens=max_new_tokens, stop=[stop] if stop else [], repetition_penalty=repetition_penalty,
                        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, num_beams=num_beams,
                        length_penalty=length_penalty).check()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths prefill together
    done = generate(model, tokenizer, [encoded[i] for i in order], sampling, max_batch_size=batch_size * num_beams,
                    on_done=(lambda _: progress()) if progress else None)
    answers: list[str] = [""] * len(prompts)
    for i, generation in zip(order, done):
        answers[i] = generation.text.strip()
    return answers


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: list[dict],
    metric: str = "chrf",
    batch_size: int = 32,
    max_new_tokens: int = 48,
    max_length: int = 256,
    progress: Callable[[], Any] | None = None,
    num_beams: int = 1,
) -> dict:
    """{"examples", "loss", "perplexity", metric, "predictions", "seconds"}; the model is left in
    the mode it was in. ``progress`` is called once per example answered; answers are greedy, or
    beam-searched with ``num_beams`` > 1."""
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not one of {list(METRICS)}")
    if metric != "none":  # bad generation settings fail before the loss pass, not after it
        Sampling(max_tokens=max_new_tokens, num_beams=num_beams).check()
    started = time.perf_counter()
    with _eval_mode(model):
        loss = completion_loss(model, tokenizer, examples, batch_size, max_length)
    result: dict = {"examples": len(examples), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if metric != "none":
        result[metric], result["predictions"] = score_generations(model, tokenizer, examples, metric, batch_size,
                                                                  max_new_tokens, progress, num_beams)
    result["seconds"] = time.perf_counter() - started
    return result


def score_generations(
    model: nn.Module, tokenizer, examples: list[dict], metric: str = "chrf", batch_size: int = 32,
    max_new_tokens: int = 48, progress: Callable[[], Any] | None = None, num_beams: int = 1,
) -> tuple[float, list[str]]:
    """(chrF or exact match, predictions) of greedy (``num_beams`` > 1: beam-search) answers to the
    examples' prompts. Without the loss pass of ``evaluate``, which costs as much as a third of
    the scoring on CPU."""
    if metric not in ("chrf", "exact"):
        raise ConfigError(f"metric {metric!r} is not one of ['chrf', 'exact']")
    prompts = [prompt_and_completion(e, tokenizer)[0] for e in examples]
    references = [reference_of(e) for e in examples]
    stop = None if any("messages" in e for e in examples) else "\n"
    with _eval_mode(model):
        predictions = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, stop, progress=progress,
                                       num_beams=num_beams)
    return (chrf if metric == "chrf" else exact_match)(predictions, references), predictions


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
