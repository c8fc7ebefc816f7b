"""The generation engine on its own: penalties as HF and OpenAI define them, chunked prefill,
rows joining and leaving, admission by prompt length, prompt log-probabilities, and a failing row
that fails alone."""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

import adapterkit as ak
from adapterkit.generation import Engine, Generation, Sampling, generate
from conftest import tiny_llama, tiny_tokenizer

PROMPTS = ["hello there", "a", "The quick brown fox", "xyz: 12"]
TOKENS = 10


def hf_greedy(model, tokenizer, prompt: str, **options) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                         pad_token_id=0, **options)
    return out[0, ids.shape[1]:].tolist()  # with the end-of-text token, when one stopped it (as the engine's tokens)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's definition: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, over the
    tokens generated so far."""

    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.prompt_length:],
                            torch.ones_like(input_ids[:, self.prompt_length:], dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class Scripted(nn.Module):
    """A stand-in language model that writes ``answer`` after any prompt of ``prompt_length``
    tokens: the logits at position p are 10 at answer[p + 1 - prompt_length], 0 elsewhere."""

    def __init__(self, prompt_length: int, answer: list[int], vocab: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # the engine finds the device from a parameter
        self.sequence, self.vocab = torch.tensor([0] * prompt_length + answer), vocab

    def forward(self, input_ids, position_ids, cache=None, logits_to_keep=1, **_):
        positions = (position_ids[:, -logits_to_keep:] + 1).clamp(max=len(self.sequence) - 1)
        logits = 10.0 * nn.functional.one_hot(self.sequence[positions], self.vocab).float()
        return SimpleNamespace(logits=logits, cache=cache)


class CountingDecodes:
    """A tokenizer that counts the work asked of its ``decode``: one per id decoded, at least one a call."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.work = tokenizer, 0

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def decode(self, ids, **options) -> str:
        self.work += max(1, len(ids))
        return self.tokenizer.decode(ids, **options)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: every byte of the text is a token, so a character
    of several bytes is split over several tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{char: 3 + i for i, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def scripted_run(tokenizer, answer: list[int], **sampling) -> tuple[Generation, list[str], list[int]]:
    """The generation of ``answer`` by a scripted model, the pieces of text it released token by
    token, and the decoding work done by the time each token was taken (from the engine's start)."""
    counting = CountingDecodes(tokenizer)
    engine = Engine(Scripted(2, answer, len(tokenizer)), counting)
    start, pieces, work = counting.work, [], []

    def taken(_, piece, __) -> None:
        pieces.append(piece)
        work.append(counting.work - start)

    generation = Generation([5, 6], Sampling(**{"max_tokens": len(answer), **sampling}), on_token=taken)
    engine.run([generation])
    return generation, pieces, work


@pytest.mark.parametrize("kind", ["a special token", "a lone first byte of a character"])
def test_decoding_work_per_token_stays_flat_when_tokens_make_no_text(kind):
    """2,000 tokens that decode to nothing (a special token skipped) or to a half character each:
    the last 500 cost no more than twice the first 500 to decode (it was quadratic)."""
    tokenizer = tiny_tokenizer() if kind == "a special token" else byte_tokenizer()
    lead_byte = tokenizer("€", add_special_tokens=False)["input_ids"][0]
    token = tokenizer.bos_token_id if kind == "a special token" else lead_byte
    generation, _, work = scripted_run(tokenizer, [token] * 2000)
    assert generation.tokens == [token] * 2000 and generation.finish_reason == "length"
    assert work[1999] - work[1499] <= 2 * work[499]
    if kind == "a special token":
        assert generation.text == ""
    else:
        assert set(generation.text) == {"\ufffd"} and len(generation.text) >= 1990


def test_a_character_split_over_tokens_comes_out_whole():
    """Byte tokens of "€" come out as one piece, also with a skipped special token between its
    bytes and after a long run of broken characters; the text is what decoding it all at once gives."""
    tokenizer = byte_tokenizer()
    ids = tokenizer("a€b€x", add_special_tokens=False)["input_ids"]
    lead = ids[1]
    answer = ids[:2] + [tokenizer.bos_token_id] + ids[2:5] + [lead] * 30 + ids[5:]
    generation, pieces, _ = scripted_run(tokenizer, answer)
    assert generation.text == tokenizer.decode(answer, skip_special_tokens=True) == "a€b" + "\ufffd" * 30 + "€x"
    assert "".join(pieces) == generation.text and "€" in pieces and pieces[-2].endswith("€") and pieces[-1] == "x"


def test_a_stop_string_over_a_split_character_is_held_back_and_cut():
    tokenizer = byte_tokenizer()
    answer = tokenizer("ab€cd", add_special_tokens=False)["input_ids"]
    generation, pieces, _ = scripted_run(tokenizer, answer, stop=["€c"])
    assert generation.text == "ab" and generation.finish_reason == "stop"
    assert pieces == ["a", "b", "", "", "", ""] and generation.tokens == answer[:6]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(), tiny_tokenizer()


def run(model, tokenizer, sampling: Sampling, prompts=PROMPTS, **engine_options) -> list[Generation]:
    engine = Engine(model, tokenizer, **engine_options)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return engine.run([Generation(ids, sampling) for ids in encoded])


def test_repetition_penalty_matches_hf(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    done = run(model, tokenizer, Sampling(max_tokens=TOKENS, repetition_penalty=1.8))
    expected = [hf_greedy(model, tokenizer, p, repetition_penalty=1.8) for p in PROMPTS]
    assert [g.tokens for g in done] == expected
    assert expected != [hf_greedy(model, tokenizer, p) for p in PROMPTS]  # the penalty changed answers


def test_frequency_and_presence_penalties_match_openai_definition(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    done = run(model, tokenizer, Sampling(max_tokens=TOKENS, frequency_penalty=1.5, presence_penalty=0.7))
    expected = []
    for prompt in PROMPTS:
        length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        expected.append(hf_greedy(model, tokenizer, prompt,
                                  logits_processor=LogitsProcessorList([OpenAIPenalties(length, 1.5, 0.7)])))
    assert [g.tokens for g in done] == expected
    assert expected != [hf_greedy(model, tokenizer, p) for p in PROMPTS]


def test_chunked_prefill_gives_the_same_greedy_answers(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    whole = run(model, tokenizer, Sampling(max_tokens=TOKENS))
    chunked = run(model, tokenizer, Sampling(max_tokens=TOKENS), max_prefill_tokens=3)  # 19-token prompt: 7 chunks
    assert ([g.tokens for g in chunked] == [g.tokens for g in whole]
            == [hf_greedy(model, tokenizer, p) for p in PROMPTS])


def test_rows_joining_and_leaving_mid_decode_keep_their_solo_answers(model_and_tokenizer):
    """Newcomers wider and narrower than the running rows are spliced in; rows with smaller
    budgets leave early; every answer is still the one HF gives the prompt alone."""
    model, tokenizer = model_and_tokenizer
    waves = [[("a", 3), ("The quick brown fox", 10)], [("xyz: 12 and then some more words", 8), ("b c", 10)],
             [("hello there", 6)]]
    engine = Engine(model, tokenizer, max_batch_size=4)
    submitted = []
    for wave in waves:
        for prompt, tokens in wave:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            submitted.append((engine.submit(Generation(ids, Sampling(max_tokens=tokens))), prompt, tokens))
        engine.step()
        engine.step()
    while not all(g.done for g, _, _ in submitted):
        engine.step()
    assert [g.tokens for g, _, _ in submitted] == [hf_greedy(model, tokenizer, p)[:k] for _, p, k in submitted]


def test_a_decode_step_writes_the_cache_in_place(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    for prompt in PROMPTS:
        engine.submit(Generation(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                 Sampling(max_tokens=TOKENS)))
    engine.step()
    layer = engine.running.cache.layers[0]
    before = (layer.keys.data_ptr(), layer.keys.shape[-2])
    engine.step()
    assert (layer.keys.data_ptr(), layer.keys.shape[-2]) == (before[0], before[1] + 1)


def test_admission_does_not_pad_a_short_prompt_to_a_long_one(model_and_tokenizer):
    """The oldest goes first with prompts of about its length; a much shorter one, which would
    be padded to the long length, waits for the next prefill (and is answered the same)."""
    model, tokenizer = model_and_tokenizer
    prompts = ["x" * 48, "ab", "y" * 46]
    engine = Engine(model, tokenizer, max_prefill_tokens=1000)
    done = [engine.submit(Generation(tokenizer(p, add_special_tokens=False)["input_ids"], Sampling(max_tokens=4)))
            for p in prompts]
    engine.step()
    assert done[0].started is not None and done[2].started == done[0].started and done[1].started is None
    while not all(g.done for g in done):
        engine.step()
    assert [g.tokens for g in done] == [hf_greedy(model, tokenizer, p)[:4] for p in prompts]


def test_a_short_prompt_is_answered_while_a_long_one_is_still_being_prefilled(model_and_tokenizer):
    """Batches being prefilled take a chunk each in turn, and a new batch joins the end of the
    turn. With a short prompt arriving at every step, the first is answered at the second step
    (after one of the long prompt's 11 chunks, not all of them), and the long prompt still goes
    on: its t-th remaining chunk waits for the t - 1 short prompts that joined ahead of it."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_prefill_tokens=4)
    long_prompt = "The quick brown fox jumps over the lazy dog"  # 43 characters: 11 chunks of 4 tokens
    long = engine.submit(Generation(tokenizer(long_prompt, add_special_tokens=False)["input_ids"],
                                    Sampling(max_tokens=4)))
    engine.step()
    shorts, first_answered = [], None
    while long.first_token is None:
        shorts.append(engine.submit(Generation(tokenizer("ab", add_special_tokens=False)["input_ids"],
                                               Sampling(max_tokens=4))))
        engine.step()
        if first_answered is None and shorts[0].first_token is not None:
            first_answered = len(shorts)
    assert first_answered == 2 and len(shorts) == sum(range(1, 11))
    while not all(g.done for g in [long, *shorts]):
        engine.step()
    assert long.tokens == hf_greedy(model, tokenizer, long_prompt)[:4]
    assert all(g.tokens == hf_greedy(model, tokenizer, "ab")[:4] for g in shorts)


def test_rows_that_end_while_waiting_for_their_prefill_turn_take_no_more_turns(model_and_tokenizer):
    """A cancelled row (its client left) is dropped at its batch's next turn: a long prompt takes
    no more chunks, and a row admitted beside another is dropped before its first chunk while the
    other answers as alone. Batches being prefilled count as in flight throughout."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_prefill_tokens=8)

    def submit(prompt: str) -> Generation:
        return engine.submit(Generation(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                        Sampling(max_tokens=4)))

    in_flight = []
    hook = model.register_forward_pre_hook(lambda module, args: in_flight.append(engine.in_flight))
    try:
        long = submit("The quick brown fox jumps over the lazy dog")  # 43 tokens: 6 chunks
        engine.step()
        left, stays = submit("ab"), submit("cd")
        engine.step()  # admits the short pair as one batch; the long prompt's second chunk
        left.cancel()
        engine.step()  # the pair's turn: the cancelled row leaves before its first chunk; then a decode
        assert left.finish_reason == "cancelled" and stays.first_token is not None and in_flight == [1, 3, 2, 2]
        long.cancel()
        engine.step()  # the long prompt's turn: dropped, no forward pass but the decoding row's
        assert long.finish_reason == "cancelled" and in_flight[4:] == [1]
        while not stays.done:
            engine.step()
        assert stays.tokens == hf_greedy(model, tokenizer, "cd")[:4] and not engine.has_work()
    finally:
        hook.remove()


def test_prompt_logprobs_equal_the_models_own_across_chunks(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sampling = Sampling(max_tokens=0, prompt_logprobs=True, logprobs=3)
    for budget in (4096, 5):
        done = run(model, tokenizer, sampling, max_prefill_tokens=budget)
        for prompt, generation in zip(PROMPTS, done):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                reference = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            scored = generation.prompt_logprobs
            assert [s.token for s in scored] == ids and scored[0].logprob is None
            for position, entry in enumerate(scored[1:]):
                assert entry.logprob == pytest.approx(reference[position, ids[position + 1]].item(), abs=1e-5)
                assert [t for t, _ in entry.top] == reference[position].topk(3).indices.tolist()
            assert generation.tokens == [] and generation.finish_reason == "length"


def test_a_row_with_non_finite_logits_fails_alone(model_and_tokenizer):
    """An adapter that overflows to NaN ends its own row with an error; the rows beside it in the
    same steps finish with the answers they give alone."""
    base, tokenizer = model_and_tokenizer
    model = ak.AdapterModel(base)
    model.add_adapter("nan", ak.BottleneckConfig(bottleneck_size=4))
    with torch.no_grad():
        for parameter in model.adapter_layers["nan"].parameters():
            parameter.fill_(1e30)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    names = [None, "nan", None, None]
    engine = Engine(model, tokenizer)
    done = engine.run([Generation(ids, Sampling(max_tokens=TOKENS), name) for ids, name in zip(encoded, names)])
    assert done[1].finish_reason == "error" and "non-finite" in done[1].error
    assert [g.tokens for i, g in enumerate(done) if i != 1] == [hf_greedy(base, tokenizer, p)
                                                                for i, p in enumerate(PROMPTS) if i != 1]
    with pytest.raises(ak.GenerationError, match="non-finite"):
        generate(model, tokenizer, encoded, Sampling(max_tokens=TOKENS), adapters=names)


@pytest.mark.parametrize("field, value", [("temperature", 1e-300), ("seed", 2**70), ("seed", -1), ("top_p", 0.0),
                                          ("repetition_penalty", 0.0), ("stop", ["q" * 200_000]), ("max_tokens", 0)])
def test_bad_sampling_values_are_refused_before_running(model_and_tokenizer, field, value):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    with pytest.raises(ak.ConfigError, match=field):
        engine.submit(Generation([5, 6], Sampling(**{"max_tokens": 4, field: value})))
    assert not engine.has_work()


def test_a_tiny_top_p_keeps_the_likeliest_token(model_and_tokenizer):
    """1e-300 rounds to 0 in float32; top-p still keeps the likeliest token, so sampling is greedy."""
    model, tokenizer = model_and_tokenizer
    done = run(model, tokenizer, Sampling(max_tokens=TOKENS, temperature=2.0, top_p=1e-300, seed=3))
    assert [g.tokens for g in done] == [hf_greedy(model, tokenizer, p) for p in PROMPTS]


def test_a_seed_fixes_a_sampled_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answers = [run(model, tokenizer, Sampling(max_tokens=TOKENS, temperature=1.3, top_p=0.9, seed=seed),
                   prompts=PROMPTS[:1])[0].tokens
               for seed in (3, 3, 4)]
    assert answers[0] == answers[1] and len(answers[0]) > 0


def test_the_end_of_text_token_that_stops_a_row_is_counted_and_scored_but_not_written():
    """The greedy next token made the end-of-text token: the answer is that one token, with the
    log-probability a plain forward pass gives it (clients scoring with max_tokens=1 drop the
    last entry), and no text, as HF's generate ends its sequence with it."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    ids = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    eos = int(reference.argmax())
    model.generation_config.eos_token_id = eos
    calls = []

    def record(_, text, logprob) -> None:
        calls.append((text, logprob))

    generation = Generation(ids, Sampling(max_tokens=5, logprobs=1), on_token=record)
    Engine(model, tokenizer).run([generation])
    assert generation.tokens == [eos] == hf_greedy(model, tokenizer, "hello there")
    assert generation.finish_reason == "stop" and generation.text == "" and tokenizer.decode([eos]) != ""
    [entry] = generation.logprobs
    assert entry.token == eos and entry.logprob == pytest.approx(reference[eos].item(), abs=1e-5)
    assert entry.top == [(eos, pytest.approx(reference[eos].item(), abs=1e-5))]
    assert calls == [("", entry)]


def test_the_token_that_completes_a_stop_string_is_counted_and_scored():
    tokenizer = tiny_tokenizer()
    answer = tokenizer("ab\ncd", add_special_tokens=False)["input_ids"]
    generation, pieces, _ = scripted_run(tokenizer, answer, stop=["\n"], logprobs=0)
    assert generation.text == "ab" and generation.finish_reason == "stop" and pieces == ["a", "b", ""]
    assert generation.tokens == answer[:3] and [entry.token for entry in generation.logprobs] == answer[:3]
    chosen = 10 - torch.logsumexp(torch.tensor([10.0] + [0.0] * (len(tokenizer) - 1)), 0).item()
    assert [entry.logprob for entry in generation.logprobs] == pytest.approx([chosen] * 3, abs=1e-5)


def nested(block, levels: int):
    for _ in range(levels):
        block = ak.Stack(block)
    return block


def test_a_row_whose_adapter_the_model_refuses_is_refused_at_submit_and_the_others_run():
    """A fusion's children in another order, an unknown name, a fusion by its own name or 300
    levels of nesting fail the batched forward; submit refuses such a row alone, and the rows
    submitted around it give the answers they give alone."""
    model = ak.AdapterModel(tiny_llama()).eval()
    for seed, name in enumerate("ab"):
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=4))
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in model.adapter_layers[name].parameters():
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.add_fusion(ak.Fuse("a", "b", name="ab"))
    tokenizer = tiny_tokenizer()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    good = ["a", None, ak.Stack(ak.Fuse("a", "b", name="ab"), "b"), "b"]
    bad = [(ak.Fuse("b", "a", name="ab"), ak.ConfigError, "was made for"),
           ("zz", ak.AdapterNameError, "no adapter named"),
           ("ab", ak.AdapterNameError, "is a fusion"),
           (nested("a", 300), ak.ConfigError, "nest at most 32 levels")]
    engine = Engine(model, tokenizer)
    submitted = []
    for ids, adapter, (wrong, error, message) in zip(encoded, good, bad):
        submitted.append(engine.submit(Generation(ids, Sampling(max_tokens=TOKENS), adapter)))
        with pytest.raises(error, match=message):
            engine.submit(Generation(ids, Sampling(max_tokens=TOKENS), wrong))
    assert list(engine.waiting) == submitted
    while engine.has_work():
        engine.step()
    alone = [Engine(model, tokenizer).run([Generation(ids, Sampling(max_tokens=TOKENS), adapter)])[0]
             for ids, adapter in zip(encoded, good)]
    assert [g.error for g in submitted] == [None] * 4 and [g.tokens for g in submitted] == [g.tokens for g in alone]
    assert alone[0].tokens != hf_greedy(tiny_llama(), tokenizer, PROMPTS[0])  # the adapters change answers


def test_a_row_naming_an_adapter_on_a_plain_model_is_refused_at_submit(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    with pytest.raises(ak.ConfigError, match="need an AdapterModel, not a LlamaForCausalLM"):
        engine.submit(Generation([5, 6], Sampling(max_tokens=4), "a"))
    assert not engine.has_work()
