from collections import Counter

import pytest
import torch

from adapterkit.errors import ConfigError
from adapterkit.evaluate import evaluate, generate_batched, score_generations
from conftest import TOKENIZER_CHARS, make_base, tiny_tokenizer

PROMPTS = ["a", "hello there", "xyz:", "The quick brown fox", "12", "Q?", "mmm", "Zebra crossing"]
NEW_TOKENS = 12


def one_at_a_time(model, tokenizer, prompt: str, stop_ids: list[int]) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, eos_token_id=stop_ids, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def stop_char_ending_rows_at_different_steps(free_runs: list[list[int]], tokenizer) -> str:
    """The character whose first appearance in the free continuations falls on the most distinct steps."""
    def first_steps(char_id: int) -> set[int]:
        return {run.index(char_id) for run in free_runs if char_id in run}

    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in TOKENIZER_CHARS if c != " "}
    return max(ids, key=lambda c: (len(first_steps(ids[c])), c))


@pytest.fixture(params=["llama", "gpt2"])
def case(request):
    """A tiny model, its tokenizer, a stop character that ends rows at different steps, and the
    answers of HF's ``generate`` run on one prompt at a time."""
    model, tokenizer = make_base(request.param), tiny_tokenizer()
    eos = tokenizer.eos_token_id
    free_runs = [one_at_a_time(model, tokenizer, p, [eos]) for p in PROMPTS]
    stop = stop_char_ending_rows_at_different_steps(free_runs, tokenizer)
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    runs = [one_at_a_time(model, tokenizer, p, [eos, stop_id]) for p in PROMPTS]
    expected = [tokenizer.decode(run, skip_special_tokens=True).split(stop, 1)[0].strip() for run in runs]
    return model, tokenizer, stop, expected, runs


def generate_counting_rows(model, tokenizer, stop, batch_size):
    rows_per_forward = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: rows_per_forward.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        return (generate_batched(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=batch_size, stop=stop),
                rows_per_forward)
    finally:
        hook.remove()


def test_batched_greedy_answers_equal_one_prompt_at_a_time_and_finished_rows_leave_the_batch(case):
    model, tokenizer, stop, expected, _ = case
    answers, rows_per_forward = generate_counting_rows(model, tokenizer, stop, batch_size=len(PROMPTS))
    assert answers == expected
    assert any(a for a in answers) and any(len(a) < NEW_TOKENS for a in answers)
    # rows that stopped were dropped: the batch shrinks step by step, never grows
    assert rows_per_forward[0] == len(PROMPTS)
    assert rows_per_forward == sorted(rows_per_forward, reverse=True)
    assert len(Counter(rows_per_forward)) >= 2


@pytest.mark.parametrize("case", ["llama"], indirect=True)  # tiny GPT-2's answers are all 1 or 12 tokens long
def test_waiting_prompts_take_the_places_of_finished_rows(case):
    model, tokenizer, stop, expected, runs = case
    answers, rows_per_forward = generate_counting_rows(model, tokenizer, stop, batch_size=3)
    assert answers == expected
    assert max(rows_per_forward) == 3
    # Batches of three run one after another until their longest answer ends would need this many
    # forwards (a row needs one forward per token, its stop token included); refilling needs fewer.
    forwards_needed = [len(run) for run in runs]
    by_length = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    fixed_batches = sum(max(forwards_needed[i] for i in by_length[k : k + 3]) for k in range(0, len(PROMPTS), 3))
    assert len(rows_per_forward) < fixed_batches


def hf_beam_answer(model, tokenizer, prompt: str, num_beams: int, length_penalty: float) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, num_beams=num_beams, length_penalty=length_penalty, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_beam_search_answers_equal_hf_beam_search_one_prompt_at_a_time():
    """Eight prompts, three in flight at a time (nine batch rows): each answer is HF's beam search
    answer to that prompt alone."""
    model, tokenizer = make_base("llama"), tiny_tokenizer()
    answers = generate_batched(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=3, stop=None, num_beams=3,
                               length_penalty=0.5)
    assert answers == [hf_beam_answer(model, tokenizer, p, 3, 0.5) for p in PROMPTS]
    assert answers != generate_batched(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=3, stop=None)


def test_scoring_answers_with_beams_and_refuses_bad_beams_before_the_loss_pass():
    model, tokenizer = make_base("llama"), tiny_tokenizer()
    examples = [{"prompt": p, "completion": " x"} for p in PROMPTS]
    beams = generate_batched(model, tokenizer, PROMPTS, 4, batch_size=4, stop="\n", num_beams=2)
    assert evaluate(model, tokenizer, examples, "exact", batch_size=4, max_new_tokens=4, num_beams=2)["predictions"] \
        == beams == score_generations(model, tokenizer, examples, "exact", 4, 4, num_beams=2)[1]
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(ConfigError, match="num_beams must be an integer from 1"):
        evaluate(model, tokenizer, examples, "exact", max_new_tokens=4, num_beams=40)
    assert forwards == []
