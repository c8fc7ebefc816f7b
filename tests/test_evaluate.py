from collections import Counter

import pytest
import torch
from conftest import TOKENIZER_CHARS, make_base, tiny_tokenizer

from adapterkit.evaluate import generate_batched

PROMPTS = ["a", "hello there", "xyz:", "The quick brown fox", "12", "Q?", "mmm", "Zebra crossing"]
NEW_TOKENS = 12


def one_at_a_time(model, tokenizer, prompt: str, stop_ids: list[int]) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def stop_char_ending_rows_at_different_steps(free_runs: list[list[int]], tokenizer) -> str:
    """The character whose first appearance in the free continuations falls on the most distinct steps."""
    def first_steps(char_id: int) -> set[int]:
        return {run.index(char_id) for run in free_runs if char_id in run}

    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in TOKENIZER_CHARS if c != " "}
    return max(ids, key=lambda c: (len(first_steps(ids[c])), c))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_answers_equal_one_prompt_at_a_time_and_finished_rows_leave_the_batch(arch):
    model, tokenizer = make_base(arch), tiny_tokenizer()
    eos = tokenizer.eos_token_id
    free_runs = [one_at_a_time(model, tokenizer, p, [eos]) for p in PROMPTS]
    stop = stop_char_ending_rows_at_different_steps(free_runs, tokenizer)
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    expected = [tokenizer.decode(one_at_a_time(model, tokenizer, p, [eos, stop_id]), skip_special_tokens=True) for p in PROMPTS]
    expected = [text.split(stop, 1)[0].strip() for text in expected]

    rows_per_forward = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows_per_forward.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        answers = generate_batched(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=len(PROMPTS), stop=stop)
    finally:
        hook.remove()

    assert answers == expected
    assert any(a for a in answers) and any(len(a) < NEW_TOKENS for a in answers)
    # rows that stopped were dropped: the batch shrinks step by step, never grows
    assert rows_per_forward[0] == len(PROMPTS)
    assert rows_per_forward == sorted(rows_per_forward, reverse=True)
    assert len(Counter(rows_per_forward)) >= 2
