"""Beam search in the generation engine: HF's ``generate(num_beams=k)`` token for token, beam rows
beside greedy rows of other adapters in one batch, stop strings, cancelling, and the settings
beam search refuses."""

import pytest
import torch

import adapterkit as ak
from adapterkit.generation import ACTIVE, Engine, Generation, Sampling
from conftest import randomise, tiny_llama, tiny_tokenizer

PROMPTS = ["hello there", "a", "The quick brown fox", "xyz: 12"]
TOKENS = 10
EARLY_EOS = 90  # an end-of-text token that the beams of "xyz: 12" meet after 3 tokens


def encode(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def hf_beams(model, tokenizer, prompt: str, num_beams: int, length_penalty: float = 1.0) -> list[int]:
    ids = torch.tensor([encode(tokenizer, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                         num_beams=num_beams, length_penalty=length_penalty, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def alone(model, tokenizer, prompt: str, sampling: Sampling, adapter=ACTIVE) -> Generation:
    return Engine(model, tokenizer).run([Generation(encode(tokenizer, prompt), sampling, adapter)])[0]


@pytest.mark.parametrize("length_penalty, ends_early", [(1.0, True), (2.0, False), (-0.5, True)])
def test_a_beam_search_row_gives_the_tokens_hf_generate_gives(length_penalty, ends_early):
    """Each prompt alone, 4 beams: the same tokens as HF's beam search, end-of-text included when
    it ended the best hypothesis. With the early end-of-text token, the length penalty decides
    whether "xyz: 12" ends after 3 tokens or runs to the budget."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.generation_config.eos_token_id = [2, EARLY_EOS]
    sampling = Sampling(max_tokens=TOKENS, num_beams=4, length_penalty=length_penalty)
    expected = [hf_beams(model, tokenizer, p, 4, length_penalty) for p in PROMPTS]
    done = [alone(model, tokenizer, p, sampling) for p in PROMPTS]
    assert [g.tokens for g in done] == expected
    assert [g.finish_reason for g in done] == ["stop" if e[-1] in (2, EARLY_EOS) else "length" for e in expected]
    assert (expected[3] == [28, 15, EARLY_EOS]) == ends_early
    assert [g.text for g in done] == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]


@pytest.mark.parametrize("length_penalty, forwards_hf_runs", [(1.0, [10, 10, 10, 5]), (-0.5, [10, 10, 10, 3])])
def test_a_beam_search_row_stops_at_the_step_hf_generate_stops(length_penalty, forwards_hf_runs):
    """With end-of-text tokens that the hypotheses often meet, 4 of them finish before the budget
    and HF's heuristic (``early_stopping=False``) ends the search once the best running hypothesis,
    penalised at its current length, cannot beat the worst finished one: the engine runs as many
    forward passes as HF and gives the same tokens."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.generation_config.eos_token_id = [2, 3, 62, 61, 82, 90]
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    sampling = Sampling(max_tokens=TOKENS, num_beams=4, length_penalty=length_penalty)
    ours, theirs = [], []
    for prompt in PROMPTS:
        forwards.clear()
        theirs.append((hf_beams(model, tokenizer, prompt, 4, length_penalty), len(forwards)))
        forwards.clear()
        ours.append((alone(model, tokenizer, prompt, sampling).tokens, len(forwards)))
    assert ours == theirs and [count for _, count in theirs] == forwards_hf_runs


@pytest.fixture(scope="module")
def adapted():
    """A tiny Llama with two adapters of different kinds that answer differently, and its tokenizer."""
    model = ak.AdapterModel(tiny_llama()).eval()
    model.add_adapter("a", ak.BottleneckConfig(bottleneck_size=4))
    model.add_adapter("b", ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise(model, "a", 1)
    randomise(model, "b", 2)
    return model, tiny_tokenizer()


MIXED = [("hello there", "a", 4, 1.0), ("a", "b", 1, 1.0), ("The quick brown fox", None, 3, 2.0),
         ("xyz: 12", "b", 2, 1.0), ("hello there", "b", 4, 0.5), ("xyz: 12", "a", 1, 1.0)]


def test_beam_rows_and_greedy_rows_of_different_adapters_decode_together_as_they_do_alone(adapted):
    """Six rows, four adapters' worth of routing (a, b, the bare base), beams of 4, 3, 2 and greedy
    rows, 15 batch rows decoding in the same steps: each row gives the tokens it gives alone, and
    alone a beam row gives what HF's beam search gives with its adapter active."""
    model, tokenizer = adapted
    engine = Engine(model, tokenizer)
    rows = [engine.submit(Generation(encode(tokenizer, p), Sampling(max_tokens=TOKENS, num_beams=k, length_penalty=lp),
                                     name))
            for p, name, k, lp in MIXED]
    in_flight = []
    while engine.has_work():
        engine.step()
        in_flight.append(engine.in_flight)
    assert in_flight[0] == sum(k for *_, k, _ in MIXED) == 15
    solo = [alone(model, tokenizer, p, Sampling(max_tokens=TOKENS, num_beams=k, length_penalty=lp), name)
            for p, name, k, lp in MIXED]
    assert [g.tokens for g in rows] == [g.tokens for g in solo] and all(len(g.tokens) > 0 for g in rows)
    for (prompt, name, beams, length_penalty), generation in zip(MIXED, solo):
        if beams > 1:
            model.set_active(name)
            assert generation.tokens == hf_beams(model, tokenizer, prompt, beams, length_penalty)
    model.set_active(None)
    assert rows[0].tokens != alone(model, tokenizer, "hello there", Sampling(max_tokens=TOKENS, num_beams=4),
                                   "b").tokens  # the adapters change the answers


@pytest.mark.parametrize("max_prefill_tokens, most_rows", [(4096, 7), (3, 5)])
def test_beam_rows_joining_and_leaving_mid_decode_keep_their_solo_answers(max_prefill_tokens, most_rows):
    """Three waves of beam and greedy rows, 15 batch rows' worth under a cap of 7: a beam row waits
    until all its beams fit, newcomers (prefilled whole or 3 tokens a step) are spliced beside
    running beams, and every answer is HF's for its prompt alone."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    waves = [[("a", 3, 4), ("The quick brown fox", 10, 1)],
             [("xyz: 12 and then some more words", 8, 3), ("b c", 10, 2)],
             [("hello there", 6, 4), ("qq", 7, 1)]]
    engine = Engine(model, tokenizer, max_batch_size=7, max_prefill_tokens=max_prefill_tokens)
    submitted, in_flight = [], []
    for wave in waves:
        for prompt, tokens, beams in wave:
            generation = Generation(encode(tokenizer, prompt), Sampling(max_tokens=tokens, num_beams=beams))
            submitted.append((engine.submit(generation), prompt, tokens, beams))
        for _ in range(2):
            engine.step()
            in_flight.append(engine.in_flight)
    while engine.has_work():
        engine.step()
        in_flight.append(engine.in_flight)
    expected = []
    for _, prompt, tokens, beams in submitted:
        ids = torch.tensor([encode(tokenizer, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, num_beams=beams, pad_token_id=0)
        expected.append(out[0, ids.shape[1]:].tolist())
    assert [g.tokens for g, *_ in submitted] == expected and max(in_flight) == most_rows


def test_a_stop_string_cuts_the_best_hypothesis_as_it_cuts_a_greedy_answer():
    """The search runs to its end as HF's does; then the best hypothesis is taken token by token,
    so the text ends before the stop string, the token that completed it is the last one counted,
    and ``on_token`` sees each piece."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    best = hf_beams(model, tokenizer, "hello there", 4)
    stop = tokenizer.decode(best[2:3])
    pieces = []
    generation = Generation(encode(tokenizer, "hello there"), Sampling(max_tokens=TOKENS, num_beams=4, stop=[stop]),
                            on_token=lambda _, piece, logprob: pieces.append((piece, logprob)))
    Engine(model, tokenizer).run([generation])
    cut = best.index(best[2]) + 1
    assert generation.tokens == best[:cut] and generation.finish_reason == "stop"
    assert generation.text == tokenizer.decode(best[: cut - 1]) and stop not in generation.text
    assert pieces == [(tokenizer.decode(best[i : i + 1]), None) for i in range(cut - 1)] + [("", None)]


def test_cancelling_a_beam_row_drops_all_its_beams(adapted):
    model, tokenizer = adapted
    engine = Engine(model, tokenizer)
    beams = engine.submit(Generation(encode(tokenizer, "hello there"), Sampling(max_tokens=TOKENS, num_beams=4), "a"))
    greedy = engine.submit(Generation(encode(tokenizer, "xyz: 12"), Sampling(max_tokens=TOKENS), "b"))
    engine.step()
    engine.step()
    assert engine.running.size == 5
    beams.cancel()
    engine.step()
    assert beams.finish_reason == "cancelled" and beams.tokens == [] and engine.running.size == 1
    while engine.has_work():
        engine.step()
    assert greedy.tokens == alone(model, tokenizer, "xyz: 12", Sampling(max_tokens=TOKENS), "b").tokens


def test_a_beam_row_with_non_finite_logits_fails_alone():
    model, tokenizer = ak.AdapterModel(tiny_llama()), tiny_tokenizer()
    model.add_adapter("nan", ak.BottleneckConfig(bottleneck_size=4))
    with torch.no_grad():
        for parameter in model.adapter_layers["nan"].parameters():
            parameter.fill_(1e30)
    rows = Engine(model, tokenizer).run([
        Generation(encode(tokenizer, "hello there"), Sampling(max_tokens=TOKENS, num_beams=3), "nan"),
        Generation(encode(tokenizer, "a"), Sampling(max_tokens=TOKENS, num_beams=2), None)])
    assert rows[0].finish_reason == "error" and "non-finite" in rows[0].error
    assert rows[1].tokens == hf_beams(tiny_llama(), tokenizer, "a", 2)


@pytest.mark.parametrize("settings, message", [
    ({"num_beams": 0}, "num_beams must be an integer from 1"),
    ({"num_beams": 17}, "num_beams must be an integer from 1 .greedy. to 16, got 17"),
    ({"num_beams": 2.0}, "num_beams must be an integer"),
    ({"num_beams": True}, "num_beams must be an integer"),
    ({"num_beams": 4, "length_penalty": float("nan")}, "length_penalty must be a number from -10.0 to 10.0"),
    ({"num_beams": 4, "length_penalty": 11.0}, "length_penalty must be a number"),
    ({"length_penalty": 2.0}, "length_penalty ranks beam-search hypotheses: it needs num_beams > 1"),
    ({"num_beams": 4, "temperature": 0.7}, "not implemented with temperature"),
    ({"num_beams": 4, "top_p": 0.9}, "not implemented with top_p"),
    ({"num_beams": 4, "repetition_penalty": 1.2, "presence_penalty": 0.5},
     "not implemented with presence_penalty, repetition_penalty"),
    ({"num_beams": 4, "frequency_penalty": 0.5}, "not implemented with frequency_penalty"),
    ({"num_beams": 4, "logprobs": 0}, "not implemented with logprobs"),
    ({"num_beams": 4, "prompt_logprobs": True}, "not implemented with prompt_logprobs"),
    ({"num_beams": 8}, "num_beams = 8 needs as many rows of the batch; this engine's max_batch_size is 4"),
])
def test_beam_settings_the_engine_cannot_honour_are_config_errors_at_submit(settings, message):
    engine = Engine(tiny_llama(), tiny_tokenizer(), max_batch_size=4)
    with pytest.raises(ak.ConfigError, match=message):
        engine.submit(Generation([5, 6], Sampling(max_tokens=4, **settings)))
    assert not engine.has_work()
