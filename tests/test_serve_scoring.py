"""Scoring through the `openai` client as OpenAI's API and vLLM answer it: the token that stops a row
(end-of-text) is in `logprobs`, streamed or not, and prompts may be token ids. The base here is
made to predict end-of-text often, as a trained adapter does at the end of its answers."""

import pytest
import torch
from openai import OpenAI

import adapterkit as ak
from adapterkit.serve import Server
from conftest import tiny_llama, tiny_tokenizer
from test_serve_isolation import serving

EOS = 2
TEXTS = [f"English: {word}\nGerman:" for word in ("cat", "dog", "house", "tree", "sun", "moon", "water", "bread")]


def eos_leaning_llama():
    """The tiny Llama with its end-of-text row turned toward the mean last hidden state, so that
    end-of-text is the likeliest next token at many positions."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    with torch.no_grad():
        hidden = torch.cat([model.model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
                            for text in TEXTS])
        direction = hidden.mean(0) / hidden.mean(0).norm()
        model.lm_head.weight[EOS] = direction * 3 * model.lm_head.weight.norm(dim=1).max()
    return model, tokenizer


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    model, tokenizer = eos_leaning_llama()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "adapters").mkdir()
    base, tokenizer = ak.load_base(root / "base")
    with serving(Server(ak.AdapterModel(base), tokenizer, root / "adapters", "tiny-base")) as url:
        yield {"client": OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), "base": base,
               "tokenizer": tokenizer}


def ending_prompts(scoring) -> list[list[int]]:
    """Prompts (token ids) whose greedy next token is end-of-text, from a plain forward pass."""
    tokenizer, found = scoring["tokenizer"], []
    for text in TEXTS:
        for cut in range(len(text) // 2, len(text) + 1):
            ids = tokenizer.encode(text[:cut])
            with torch.no_grad():
                if int(scoring["base"](input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == EOS:
                    found.append(ids)
    assert len(found) >= 4
    return found


def next_logprob(scoring, ids: list[int], token: int) -> float:
    with torch.no_grad():
        logits = scoring["base"](input_ids=torch.tensor([ids])).logits[0, -1]
    return float(torch.log_softmax(logits, -1)[token])


def test_the_end_of_text_that_stops_a_row_is_in_logprobs_with_echo_and_token_ids(scoring):
    for ids in ending_prompts(scoring)[:4]:
        answer = scoring["client"].completions.create(model="tiny-base", prompt=ids, max_tokens=1, echo=True,
                                                      logprobs=1, temperature=0).choices[0]
        assert answer.finish_reason == "stop"
        assert answer.text == scoring["tokenizer"].decode(ids)  # the echoed prompt; end-of-text is no text
        assert len(answer.logprobs.tokens) == len(ids) + 1 and answer.logprobs.tokens[-1] == "</s>"
        assert answer.logprobs.token_logprobs[-1] == pytest.approx(next_logprob(scoring, ids, EOS), abs=1e-5)
        assert answer.logprobs.top_logprobs[-1] == {"</s>": answer.logprobs.token_logprobs[-1]}


def test_a_streamed_answer_carries_the_same_logprobs_as_a_whole_one(scoring):
    ids = ending_prompts(scoring)[0][:-3]  # a few tokens before end-of-text
    whole = scoring["client"].completions.create(model="tiny-base", prompt=ids, max_tokens=12, logprobs=2,
                                                 temperature=0).choices[0]
    chunks = list(scoring["client"].completions.create(model="tiny-base", prompt=ids, max_tokens=12, logprobs=2,
                                                       temperature=0, stream=True))
    scored = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for block in scored for t in block.tokens] == whole.logprobs.tokens
    assert [v for block in scored for v in block.token_logprobs] == whole.logprobs.token_logprobs
    assert [o for block in scored for o in block.text_offset] == whole.logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_token_id_prompts_answer_as_their_text_does(scoring):
    texts = TEXTS[:3]
    ids = [scoring["tokenizer"].encode(text) for text in texts]
    by_ids = scoring["client"].completions.create(model="tiny-base", prompt=ids, max_tokens=6, temperature=0)
    by_text = scoring["client"].completions.create(model="tiny-base", prompt=texts, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage == by_text.usage


def byte_level_world(root):
    """A tiny Llama over a byte-level tokenizer with no merges: one token per UTF-8 byte, so "ö" is
    two tokens and "日" three. Saved as a base folder; its adapters folder is empty."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2} | {char: i + 3 for i, char in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocabulary, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(alphabet) + 3, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "adapters").mkdir()
    return ak.load_base(root / "base")


def test_text_offsets_point_into_the_text_where_characters_split_over_tokens(tmp_path):
    """Each token's offset is where its text starts in the answer: a character split over several
    tokens starts where its first token does (adding up each token's own decode, one U+FFFD per
    piece, ran past the text). The same offsets streamed and whole; token ids echo as they decode."""
    base, tokenizer = byte_level_world(tmp_path)
    prompt = "Größe: 日本 ok"
    data = prompt.encode()
    expected = [len(data[:j].decode(errors="ignore")) for j in range(len(data))]
    with serving(Server(ak.AdapterModel(base), tokenizer, tmp_path / "adapters", "tiny-bytes")) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for sent in (prompt, [1, *tokenizer.encode(prompt)]):
            scored = client.completions.create(model="tiny-bytes", prompt=sent, max_tokens=0, echo=True, logprobs=0,
                                               temperature=0).choices[0]
            bos = "" if isinstance(sent, str) else "<s>"
            assert scored.text == bos + prompt
            assert scored.logprobs.text_offset == [0] * len(bos[:1]) + [len(bos) + o for o in expected]
        whole = client.completions.create(model="tiny-bytes", prompt=prompt, max_tokens=24, logprobs=1,
                                          temperature=0).choices[0]
        offsets = whole.logprobs.text_offset
        assert offsets == sorted(offsets) and offsets[-1] <= len(whole.text)
        chunks = list(client.completions.create(model="tiny-bytes", prompt=prompt, max_tokens=24, logprobs=1,
                                                temperature=0, stream=True))
        assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == offsets
