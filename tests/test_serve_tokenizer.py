"""The tokenizer endpoints as vLLM serves them, and lm-evaluation-harness's remote tokenizer on a
live `adapterkit serve`."""

import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

import adapterkit as ak
from adapterkit.io import with_prompt_template, write_folder_atomically
from adapterkit.serve import Server, create_app
from test_serve import CONTEXT, WORDS, tiny_llama, tiny_tokenizer

TEMPLATE = "Q: {prompt}\nA:"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def ids(text: str) -> list[int]:
    return [WORDS.index(word) for word in text.split()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny base and an adapters folder with one LoRA that records a text prompt template."""
    root = tmp_path_factory.mktemp("serve-tokenizer")
    tiny_llama(0).save_pretrained(root / "tiny-base")
    tiny_tokenizer().save_pretrained(root / "tiny-base")
    model = ak.AdapterModel(ak.load_base(root / "tiny-base")[0])
    model.add_adapter("qa", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    write_folder_atomically(root / "adapters" / "qa", with_prompt_template(model.adapter_files("qa"), TEMPLATE))
    return root


@pytest.fixture(scope="module")
def client(world):
    base, tokenizer = ak.load_base(world / "tiny-base")
    server = Server(ak.AdapterModel(base), tokenizer, world / "adapters", "tiny-base")
    with TestClient(create_app(server)) as test_client:
        yield test_client


def test_tokenizer_info_is_the_tokenizer_config_with_the_special_tokens_as_text(client):
    info = client.get("/tokenizer_info").json()
    assert info == {
        "tokenizer_class": "TokenizersBackend", "backend": "tokenizers",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "model_max_length": CONTEXT, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {"0": "<pad>", "1": "<s>", "2": "</s>", "3": "<unk>"},
    }


def test_tokenize_answers_a_prompt_as_vllm_does(client):
    answer = client.post("/tokenize", json={"model": "tiny-base", "prompt": "w1 w2 w3"})
    assert answer.status_code == 200
    assert answer.json() == {"count": 3, "max_model_len": CONTEXT, "tokens": ids("w1 w2 w3"), "token_strs": None}
    body = {"prompt": "w4 </s>", "add_special_tokens": False, "return_token_strs": True}
    assert client.post("/tokenize", json=body).json() == {
        "count": 2, "max_model_len": CONTEXT, "tokens": ids("w4 </s>"), "token_strs": ["w4", "</s>"]}


def test_tokenize_renders_messages_as_chat_completions_do(client):
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}]
    rendered = client.post("/tokenize", json={"model": "tiny-base", "messages": messages}).json()
    assert rendered["tokens"] == ids("system w1 user w2 assistant") and rendered["count"] == 5
    bare = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == ids("system w1 user w2")
    templated = client.post("/tokenize", json={"model": "qa", "messages": [{"role": "user", "content": "w7"}]}).json()
    assert templated["tokens"] == ids("<unk> w7 <unk>")  # "Q: w7\nA:": the template's words are not in this vocabulary


def test_detokenize_gives_the_text_of_the_ids(client):
    answer = client.post("/detokenize", json={"model": "qa", "tokens": ids("w5 w6 </s>")})
    assert answer.json() == {"prompt": "w5 w6 </s>"}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


LONG = "w1 " * (CONTEXT * 32 // 3 + 1)


@pytest.mark.parametrize("path, body, status, code, message", [
    ("/tokenize", {"model": "missing", "prompt": "w1"}, 404, "model_not_found",
     "the model 'missing' does not exist: no adapter folder of that name"),
    ("/tokenize", {"prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}, 400, "invalid_request",
     "give either 'prompt' (text) or 'messages' (a conversation) to tokenize"),
    ("/tokenize", {}, 400, "invalid_request",
     "give either 'prompt' (text) or 'messages' (a conversation) to tokenize"),
    ("/tokenize", {"prompt": "w1", "add_generation_prompt": True}, 400, "invalid_request",
     "add_generation_prompt applies to messages only"),
    ("/tokenize", {"prompt": LONG}, 400, "context_length_exceeded",
     f"the prompt has {len(LONG)} characters, more than this model's context of {CONTEXT} tokens can hold; "
     "shorten it"),
    ("/tokenize", {"model": "qa", "messages": [{"role": "system", "content": "w1"},
                                               {"role": "user", "content": "w2"}]},
     400, "invalid_messages",
     "this adapter answers single prompts in the format 'Q: {prompt}\\nA:': send one user message"),
    ("/tokenize", {"prompt": "w1", "add_special_tokens": 1}, 400, "invalid_request",
     "invalid request: add_special_tokens: Input should be a valid boolean"),
    ("/tokenize", {"prompt": "w1", "chat_template": "x"}, 400, "unsupported_field",
     "unsupported field(s): chat_template; adapterkit does not implement them"),
    ("/detokenize", {"tokens": [5, len(WORDS)]}, 400, "invalid_tokens",
     f"tokens holds token id {len(WORDS)}; this model's ids run from 0 to {len(WORDS) - 1}"),
    ("/detokenize", {"tokens": [-1]}, 400, "invalid_tokens",
     f"tokens holds token id -1; this model's ids run from 0 to {len(WORDS) - 1}"),
    ("/detokenize", {"tokens": [True]}, 400, "invalid_request",
     "invalid request: tokens.0: Input should be a valid integer"),
    ("/detokenize", {"model": "missing", "tokens": [5]}, 404, "model_not_found",
     "the model 'missing' does not exist: no adapter folder of that name"),
])
def test_bad_tokenizer_requests_get_our_openai_shaped_errors(client, path, body, status, code, message):
    answer = client.post(path, json=body)
    assert answer.status_code == status
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    assert answer.json() == {"error": error}


def test_a_lone_surrogate_is_refused_as_in_prompts(client):
    for body in (b'{"prompt": "w1 \\ud800"}', b'{"messages": [{"role": "user", "content": "\\udc00"}]}'):
        answer = client.post("/tokenize", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_text"
    assert client.post("/tokenize", json={"prompt": "w1"}).status_code == 200  # and the server goes on


def test_lm_evals_remote_tokenizer_round_trips_through_the_serve_command(world, tmp_path):
    utils = pytest.importorskip("lm_eval.utils")
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "adapterkit", "serve", "--base", str(world / "tiny-base"), "--adapters",
               str(world / "adapters"), "--port", "0"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ.copy())
    try:
        url = _served_at(log, process)
        assert utils.check_remote_tokenizer_support(f"{url}/v1/completions")
        tokenizer = utils.RemoteTokenizer(f"{url}/v1/completions")
        assert tokenizer.encode("w3 w2 w1") == ids("w3 w2 w1")
        assert tokenizer.decode(ids("w9 w8")) == "w9 w8"
        assert tokenizer.batch_decode([ids("w1"), ids("w2 w3")]) == ["w1", "w2 w3"]
        assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == ("</s>", 2, 1)
        assert tokenizer.apply_chat_template([{"role": "user", "content": "w4"}]) == "user w4 assistant"
    finally:
        process.terminate()
        process.wait(30)
    line = next(line for line in log.read_text().splitlines() if line.startswith("serving "))
    assert line == (f"serving tiny-base (base folder {(world / 'tiny-base').resolve()}) and the adapters in "
                    f"{world / 'adapters'} at {url}/v1")


def _served_at(log, process) -> str:
    """The server's address, read from its start-up line once it answers."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"^serving .* at (http://\S+)/v1$", log.read_text(), re.MULTILINE)
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health").status_code == 200:
                    return found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not start:\n{log.read_text()}")
