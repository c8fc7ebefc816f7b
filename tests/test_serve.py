"""The OpenAI-compatible server, on a tiny Llama with a word-level tokenizer built here."""

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import adapterkit as ak
from adapterkit.serve import ServeConfig, Server, create_app
from conftest import randomise

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "system", "user", "assistant"] + [f"w{i}" for i in range(57)]
CONTEXT = 48
KEY = "test-key-123"
ADAPTERS = {
    "houlsby": ak.BottleneckConfig(bottleneck_size=8),
    "parallel": ak.BottleneckConfig(placement="parallel", bottleneck_size=6),
    "pfeiffer": ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=4, activation="relu"),
    "lora": ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
}
PROMPTS = ["w1 w2 w3", "w10 w4", "w5 w6 w7 w8 w9", "w20"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    model = models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    wrapped.chat_template = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                             "{% if add_generation_prompt %}assistant{% endif %}")
    return wrapped


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(WORDS), max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved base, an adapters folder (4 good adapters, a corrupt one, one for another base, a
    link out of the folder) and the greedy answers of each adapter computed without the server."""
    root = tmp_path_factory.mktemp("serve")
    base_dir, adapters_dir = root / "tiny-base", root / "adapters"
    tiny_llama(0).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    base, tokenizer = ak.load_base(base_dir)
    reference = ak.AdapterModel(base)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        reference.add_adapter(name, config)
        randomise(reference, name, seed)
        reference.save_adapter(name, adapters_dir / name)
    reference.save_adapter("houlsby", adapters_dir / "broken")
    weights = adapters_dir / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    other = ak.AdapterModel(tiny_llama(1))
    other.add_adapter("foreign", ak.BottleneckConfig(bottleneck_size=4))
    other.save_adapter("foreign", adapters_dir / "foreign")
    outside = root / "outside"
    reference.save_adapter("houlsby", outside / "secret")
    (adapters_dir / "escape").symlink_to(outside / "secret")

    answers = {}
    for name in [None, *ADAPTERS]:
        reference.set_active(name)
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False)
            answers[name or "tiny-base", prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"base_dir": base_dir, "adapters_dir": adapters_dir, "answers": answers, "outside": outside}


def make_server(world, **options) -> Server:
    base, tokenizer = ak.load_base(world["base_dir"])
    limits = {name: options.pop(name) for name in ServeConfig.names() if name in options}
    settings = dict(api_key=KEY) | options
    return Server(ak.AdapterModel(base), tokenizer, world["adapters_dir"], "tiny-base", config=ServeConfig(**limits),
                  **settings)


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(make_server(world))) as test_client:
        yield test_client


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


def complete(client, model, prompt, **fields):
    return client.post("/v1/completions",
                       json={"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 8} | fields)


def test_answers_differ_between_adapters(world):
    assert len({world["answers"][name, PROMPTS[0]] for name in ["tiny-base", *ADAPTERS]}) >= 4


def test_models_health_and_each_adapter_answers_as_alone(client, world):
    listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert listed == ["tiny-base", "broken", "foreign", "houlsby", "lora", "parallel", "pfeiffer"]
    for name in ["tiny-base", *ADAPTERS]:
        response = complete(client, name, PROMPTS[2])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == world["answers"][name, PROMPTS[2]]
        assert body["usage"]["prompt_tokens"] == 5
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["loaded_adapters"]) == set(ADAPTERS)


def test_a_list_of_prompts_gives_one_choice_each(client, world):
    body = complete(client, "lora", PROMPTS).json()
    assert [c["text"] for c in body["choices"]] == [world["answers"]["lora", p] for p in PROMPTS]


def _sse_payloads(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streaming_completion_and_chat(client, world):
    response = complete(client, "parallel", PROMPTS[0], stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = _sse_payloads(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == world["answers"]["parallel", PROMPTS[0]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    messages = [{"role": "user", "content": "w3 w4"}]
    chat = {"model": "houlsby", "messages": messages, "temperature": 0, "max_tokens": 6}
    whole = client.post("/v1/chat/completions", json=chat).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    chunks = _sse_payloads(client.post("/v1/chat/completions", json=chat | {"stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ("".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            == whole["choices"][0]["message"]["content"])


def test_stop_strings_and_seeds(client, world):
    full = world["answers"]["houlsby", PROMPTS[1]].split(" ")
    stopped = complete(client, "houlsby", PROMPTS[1], stop=[full[2]]).json()["choices"][0]
    assert stopped["text"] == " ".join(full[: full.index(full[2])]) + " " and stopped["finish_reason"] == "stop"
    sampled = [complete(client, "lora", PROMPTS[0], temperature=1.5, top_p=0.9, seed=seed).json()["choices"][0]["text"]
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert complete(client, "lora", PROMPTS[0], max_tokens=3).json()["choices"][0]["finish_reason"] in ("length",
                                                                                                         "stop")


def test_null_fields_are_taken_as_not_given(client, world):
    """Those we do not implement too: clients send null for whatever they leave unset."""
    nulls = {"stream": None, "echo": None, "frequency_penalty": None, "presence_penalty": None,
             "repetition_penalty": None, "stop": None, "seed": None, "logit_bias": None, "stream_options": None}
    answer = complete(client, "houlsby", PROMPTS[1], **nulls, suffix=None).json()["choices"][0]["text"]
    assert answer == world["answers"]["houlsby", PROMPTS[1]]
    body = {"model": "houlsby", "messages": [{"role": "user", "content": "w1", "name": None}], "max_tokens": 2,
            **nulls, "logprobs": None, "top_logprobs": None, "tools": None, "tool_choice": None,
            "response_format": None, "parallel_tool_calls": None}
    chat = client.post("/v1/chat/completions", json=body)
    assert chat.status_code == 200, chat.text
    tokenized = client.post("/tokenize", json={"prompt": "w1 w2", "add_generation_prompt": None, "model": None})
    assert tokenized.status_code == 200 and tokenized.json()["count"] == 2
    refused = client.post("/v1/chat/completions", json=body | {"tools": [{"type": "function"}]})
    assert refused.status_code == 400 and "tools" in refused.json()["error"]["message"]
    required = client.post("/v1/completions", json={"model": None, "prompt": "w1"})  # sent, as the wrong type
    assert required.status_code == 400
    assert "model: Input should be a valid string" in required.json()["error"]["message"]


def test_chat_takes_text_parts_and_the_developer_role_as_plain_text_and_system(client, world):
    def chat(messages):
        return client.post("/v1/chat/completions", json={"model": "houlsby", "messages": messages, "max_tokens": 4,
                                                         "temperature": 0})

    plain = chat([{"role": "system", "content": "w2\nw3"}, {"role": "user", "content": "w1"}])
    parts = chat([{"role": "developer", "content": [{"type": "text", "text": "w2"}, {"type": "text", "text": "w3"}]},
                  {"role": "user", "content": [{"type": "text", "text": "w1"}]}])
    assert plain.status_code == parts.status_code == 200, parts.text
    assert parts.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    image = chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert image.status_code == 400 and "only text content parts" in image.json()["error"]["message"]
    for kind in (["text"], {"a": 1}, None):  # any JSON may stand where the type goes
        odd = chat([{"role": "user", "content": [{"type": kind, "text": "w1"}]}])
        assert odd.status_code == 400 and odd.json()["error"]["message"].endswith(
            f"only text content parts are served, not {kind!r}")


@pytest.mark.parametrize(
    "request_kwargs, status, code",
    [
        ({"json": {"model": "nobody", "prompt": "w1"}}, 404, "model_not_found"),
        ({"content": b'{"model": "houlsby", "prompt": ', "headers": {"content-type": "application/json"}}, 400,
         "invalid_request"),
        ({"json": {"model": "houlsby"}}, 400, "invalid_request"),
        ({"json": {"model": "houlsby", "prompt": "w1", "temperature": 5}}, 400, "invalid_request"),
        ({"json": {"model": "houlsby", "prompt": "w1", "max_tokens": 0}}, 400, "invalid_request"),
        ({"json": {"model": "houlsby", "prompt": " ".join(["w1"] * 45), "max_tokens": 8}}, 400,
         "context_length_exceeded"),
        ({"json": {"model": "houlsby", "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}}, 400, "invalid_stop"),
        ({"json": {"model": "../adapters/houlsby", "prompt": "w1"}}, 400, "invalid_model_name"),
        ({"json": {"model": "escape", "prompt": "w1"}}, 400, "invalid_model_name"),
    ],
)
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(client, world, request_kwargs, status, code):
    response = client.post("/v1/completions", **request_kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert (complete(client, "pfeiffer", PROMPTS[3]).json()["choices"][0]["text"]
            == world["answers"]["pfeiffer", PROMPTS[3]])


@pytest.mark.parametrize("route, fields, field", [
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"num_beams": 4}, "num_beams"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"length_penalty": 0.5, "stream": True}, "length_penalty"),
    ("/v1/chat/completions", {"num_beams": 4}, "num_beams"),
    ("/v1/chat/completions", {"use_beam_search": True, "logit_bias": {"5": 1}}, "use_beam_search"),
])
def test_beam_search_fields_are_refused_with_where_beam_search_runs(client, world, route, fields, field):
    """Answers stream token by token; a beam search knows its answer only at its end. The 400 names
    the field (also as OpenAI's ``param``) and the commands that do run beam search."""
    prompt = {"messages": [{"role": "user", "content": "w1"}]} if "chat" in route else {"prompt": PROMPTS[0]}
    response = client.post(route, json={"model": "houlsby", "max_tokens": 8, **prompt, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (field, "unsupported_field", "invalid_request_error")
    assert error["message"].startswith(field) and error["message"].endswith(
        "beam search is not served (answers stream token by token, and a beam search knows its answer only when it "
        "ends); use `adapterkit generate --num-beams N` or `adapterkit eval --num-beams N`")
    assert (complete(client, "houlsby", PROMPTS[0], best_of=1).json()["choices"][0]["text"]
            == world["answers"]["houlsby", PROMPTS[0]])


def test_corrupt_and_foreign_adapters_are_refused_with_the_reason(client, world):
    broken = complete(client, "broken", "w1")
    assert broken.status_code == 400 and "corrupt" in broken.json()["error"]["message"]
    foreign = complete(client, "foreign", "w1")
    assert foreign.status_code == 400 and "another base" in foreign.json()["error"]["message"]
    assert complete(client, "lora", PROMPTS[1]).json()["choices"][0]["text"] == world["answers"]["lora", PROMPTS[1]]


def test_adapter_management_needs_the_key(client, world):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert client.post("/v1/adapters", json={"name": "houlsby"}, headers=headers).status_code == 401
        assert client.delete("/v1/adapters/houlsby", headers=headers).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    loaded = client.post("/v1/adapters", json={"name": "houlsby"}, headers=auth)
    assert loaded.status_code == 200 and loaded.json()["method"] == "bottleneck"
    assert client.delete("/v1/adapters/houlsby", headers=auth).json() == {"name": "houlsby", "loaded": False}
    assert "houlsby" not in client.get("/health").json()["loaded_adapters"]
    assert client.delete("/v1/adapters/houlsby", headers=auth).status_code == 404
    for name in ("../outside/secret", "escape", ".."):
        assert client.post("/v1/adapters", json={"name": name}, headers=auth).status_code == 400
    for name in ("%00", "base", "-x"):
        refused = client.delete(f"/v1/adapters/{name}", headers=auth)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_model_name"
    assert client.post("/v1/adapters", json={"name": "broken"}, headers=auth).status_code == 400
    assert (complete(client, "houlsby", PROMPTS[0]).json()["choices"][0]["text"]
            == world["answers"]["houlsby", PROMPTS[0]])


def test_management_is_off_without_a_key(world):
    with TestClient(create_app(make_server(world, api_key=None))) as test_client:
        assert test_client.post("/v1/adapters", json={"name": "lora"},
                                headers={"Authorization": "Bearer x"}).status_code == 403


def test_least_recently_used_adapters_are_evicted_under_the_cap(world):
    with TestClient(create_app(make_server(world, max_loaded_adapters=2))) as test_client:
        for name in ["houlsby", "lora", "houlsby", "parallel", "pfeiffer"]:
            assert (complete(test_client, name, PROMPTS[0]).json()["choices"][0]["text"]
                    == world["answers"][name, PROMPTS[0]])
        assert test_client.get("/health").json()["loaded_adapters"] == ["parallel", "pfeiffer"]
        metrics = test_client.get("/metrics").text
        assert sample(metrics, "adapterkit_adapters_resident") == 2
        assert sample(metrics, "adapterkit_adapter_loads_total") == 4  # houlsby's second request found it loaded


def test_a_held_adapter_is_never_evicted_and_a_cold_one_never_waits_for_room(world):
    server = make_server(world, max_loaded_adapters=1)
    pool = server.pool

    async def scenario():
        await pool.acquire(["houlsby"])
        await pool.acquire(["lora"])
        await asyncio.wait_for(pool.acquire(["parallel"]), 5)  # every adapter is held: it loads all the same
        assert list(pool.resident) == ["houlsby", "lora", "parallel"]
        await pool.release(["lora"])
        await pool.release(["parallel"])
        assert list(pool.resident) == ["houlsby", "parallel"]  # the cap keeps one idle adapter: the latest
        with pytest.raises(ak.AdapterInUseError, match="serving 1 request"):
            await pool.unload("houlsby")

    asyncio.run(scenario())


def test_unloading_an_adapter_being_loaded_waits_for_its_load(world):
    pool = make_server(world).pool

    async def scenario():
        loading = asyncio.ensure_future(pool.reload("lora"))
        while "lora" not in pool.loading:
            await asyncio.sleep(0)
        await pool.unload("lora")
        assert (await loading)["loaded"] and "lora" not in pool.resident and "lora" not in pool.model.adapters

    asyncio.run(scenario())


def test_a_request_whose_client_leaves_while_its_adapter_loads_is_counted_as_cancelled(world):
    from adapterkit.generation import Sampling

    server = make_server(world)

    async def scenario():
        server.engine.lock.acquire()  # the load waits for the engine's lock to attach the adapter
        try:
            request = asyncio.ensure_future(server.submit("lora", [[5, 6], [7]], Sampling(max_tokens=2)))
            while "lora" not in server.pool.loading:
                await asyncio.sleep(0.01)
            request.cancel()  # as the route does when its client disconnects
        finally:
            server.engine.lock.release()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert server.queued == 0 and not server.pool.holds

    asyncio.run(scenario())
    metrics = server.metrics.render().decode()
    assert sample(metrics, "adapterkit_requests_total", adapter="lora", outcome="cancelled") == 2


def test_metrics_are_prometheus_text_per_adapter(client):
    complete(client, "lora", PROMPTS[0])
    text = client.get("/metrics").text
    assert '# TYPE adapterkit_requests_total counter' in text
    assert 'adapterkit_requests_total{adapter="lora",outcome="ok"}' in text
    assert 'adapterkit_completion_tokens_total{adapter="lora"}' in text
    assert 'adapterkit_request_latency_seconds_bucket{adapter="lora",le="+Inf"}' in text
    assert 'adapterkit_http_errors_total{status="404"}' in text


# ---- a real server on the loopback interface -----------------------------------------------------
@pytest.fixture(scope="module")
def live(world):
    server = make_server(world, max_batch_size=32)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(server), log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner.should_exit = True
    thread.join(10)
    sock.close()


def test_32_concurrent_requests_over_4_adapters_get_their_own_answers(live, world):
    jobs = [(list(ADAPTERS)[i % 4], PROMPTS[i * 7 % 4]) for i in range(32)]

    def ask(job):
        name, prompt = job
        response = httpx.post(f"{live}/v1/completions",
                              json={"model": name, "prompt": prompt, "temperature": 0, "max_tokens": 8}, timeout=60)
        return response.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [world["answers"][job] for job in jobs]
    metrics = httpx.get(f"{live}/metrics").text
    rows, steps = (sample(metrics, "adapterkit_engine_step_rows_sum"),
                   sample(metrics, "adapterkit_engine_step_rows_count"))
    assert rows / steps > 2  # requests shared forward passes


def test_the_openai_client_gets_the_right_adapter(live, world):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused")
    for name in ["lora", "tiny-base", "pfeiffer"]:
        completion = client.completions.create(model=name, prompt=PROMPTS[1], temperature=0, max_tokens=8)
        assert completion.choices[0].text == world["answers"][name, PROMPTS[1]]
    stream = client.chat.completions.create(model="parallel", messages=[{"role": "user", "content": "w5"}],
                                            temperature=0, max_tokens=5, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="w1")
    assert [client.models.retrieve(name).id for name in ["tiny-base", "lora"]] == ["tiny-base", "lora"]
    for name in ("missing", "no.such.model", "x" * 500):  # a name no adapter can have is not found either
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve(name)
        assert len(refused.value.message) < 200


def test_chat_logprobs_are_the_models_own_with_openais_client(live, world):
    """Streamed or whole, each token's log-probability and its top alternatives, as the model
    gives them alone; with stream_options.include_usage the usage comes in a chunk of its own."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused")
    messages = [{"role": "user", "content": "w3 w4"}]
    whole = client.chat.completions.create(model="lora", messages=messages, temperature=0, max_tokens=5,
                                           logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    tokenizer = tiny_tokenizer()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    base, _ = ak.load_base(world["base_dir"])
    model = ak.AdapterModel(base)
    model.load_adapter(world["adapters_dir"] / "lora")
    model.set_active("lora")
    ids = prompt + [tokenizer.convert_tokens_to_ids(entry.token) for entry in content]
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    assert len(content) == whole.usage.completion_tokens == 5
    for position, entry in enumerate(content):
        row = expected[len(prompt) + position - 1]
        assert entry.logprob == pytest.approx(row[ids[len(prompt) + position]].item(), abs=1e-5)
        assert [tokenizer.convert_tokens_to_ids(t.token) for t in entry.top_logprobs] == row.topk(3).indices.tolist()
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(model="lora", messages=messages, temperature=0, max_tokens=5,
                                                 logprobs=True, stream=True, stream_options={"include_usage": True}))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert all(e.top_logprobs == [] for e in streamed)
    assert [chunk.usage is not None for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model="lora", messages=messages, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be between 0 and 20, got 21"):
        client.chat.completions.create(model="lora", messages=messages, max_tokens=2, logprobs=True, top_logprobs=21)
    both = client.chat.completions.create(model="lora", messages=messages, temperature=0, max_tokens=5,
                                          max_completion_tokens=2)  # the newer name wins, as in vLLM
    assert both.usage.completion_tokens == 2 and both.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="stream_options applies to streamed answers only"):
        client.chat.completions.create(model="lora", messages=messages, max_tokens=2,
                                       stream_options={"include_usage": True})


def test_the_serve_command_runs_the_server(world):
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "adapterkit.cli", "serve", "--base", str(world["base_dir"]), "--adapters",
               str(world["adapters_dir"]), "--port", str(port), "--max-loaded-adapters", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, ADAPTERKIT_API_KEY=KEY))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        answer = httpx.post(f"{url}/v1/completions",
                            json={"model": "lora", "prompt": PROMPTS[0], "temperature": 0, "max_tokens": 8},
                            timeout=30)
        assert answer.json()["choices"][0]["text"] == world["answers"]["lora", PROMPTS[0]]
        assert httpx.post(f"{url}/v1/adapters", json={"name": "houlsby"},
                          headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-base"
    finally:
        process.terminate()
        process.wait(30)


def test_the_serve_command_checks_its_options(tmp_path, capsys):
    from adapterkit.cli import main

    assert main(["serve", "--adapters", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be a whole number of at least 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    assert "no adapters folder" in capsys.readouterr().err


def test_a_request_may_name_a_composition(world):
    """Compositions over the folder's adapters are served like adapters; their members load on
    demand and each answer is the composition's own, next to rows of single adapters."""
    compositions = {"stacked": ak.Stack("pfeiffer", "lora"),
                    "averaged": ak.Average("houlsby", "parallel", weights=[0.3, 0.7])}
    base, tokenizer = ak.load_base(world["base_dir"])
    reference = ak.AdapterModel(base)
    for name in ("pfeiffer", "lora", "houlsby", "parallel"):
        reference.load_adapter(world["adapters_dir"] / name)
    expected = {}
    for name, block in compositions.items():
        reference.set_active(block)
        ids = torch.tensor([tokenizer.encode(PROMPTS[1])])
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        expected[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected["stacked"] != world["answers"]["pfeiffer", PROMPTS[1]]
    with TestClient(create_app(make_server(world, compositions=compositions))) as client:
        assert {"stacked", "averaged"} <= {m["id"] for m in client.get("/v1/models").json()["data"]}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = {name: pool.submit(complete, client, name, PROMPTS[1])
                       for name in ["stacked", "averaged", "lora", "stacked"]}
        for name, future in futures.items():
            body = future.result().json()
            assert "choices" in body, body
            answer = body["choices"][0]["text"]
            assert answer == (expected[name] if name in expected else world["answers"][name, PROMPTS[1]])


def test_a_folder_named_like_the_base_or_a_composition_is_neither_listed_nor_loaded(world, tmp_path):
    """Requests for such a name get the base or the composition, so the folder is shadowed: listing
    it would name one model twice, and loading it would only take a resident slot."""
    folder = tmp_path / "adapters"
    shutil.copytree(world["adapters_dir"] / "lora", folder / "lora")
    base, tokenizer = ak.load_base(world["base_dir"])
    server = Server(ak.AdapterModel(base), tokenizer, folder, "tiny-base", api_key=KEY,
                    compositions={"stacked": ak.Stack("lora")})
    with TestClient(create_app(server)) as client:
        for name in ("tiny-base", "stacked"):  # appearing while the server runs
            shutil.copytree(world["adapters_dir"] / "houlsby", folder / name)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-base", "lora", "stacked"]
        for name in ("tiny-base", "stacked"):
            refused = client.post("/v1/adapters", json={"name": name}, headers={"Authorization": f"Bearer {KEY}"})
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "name_collision"
            assert "rename the folder" in refused.json()["error"]["message"]
        shutil.rmtree(folder / "stacked")
        refused = client.post("/v1/adapters", json={"name": "stacked"}, headers={"Authorization": f"Bearer {KEY}"})
        assert refused.json()["error"]["message"] == ("'stacked' is the name of a composition, which answers every "
                                                      "request for it: no adapter can be loaded under that name")
        assert client.get("/health").json()["loaded_adapters"] == []
        answer = complete(client, "tiny-base", PROMPTS[1]).json()["choices"][0]["text"]
    assert answer == world["answers"]["tiny-base", PROMPTS[1]]


def test_run_folders_are_served_and_chat_fills_the_adapters_template(world, tmp_path):
    from adapterkit import io

    base, tokenizer = ak.load_base(world["base_dir"])
    model = ak.AdapterModel(base)
    model.add_adapter("tiny", ADAPTERS["lora"])
    randomise(model, "tiny", 7)
    runs = tmp_path / "runs"
    io.write_folder_atomically(runs / "tiny" / "adapter",
                               io.with_prompt_template(model.adapter_files("tiny"), "w1 {prompt} w2"))
    (runs / "tiny" / "metrics.jsonl").write_text("")
    (runs / "empty-run").mkdir()
    server = Server(ak.AdapterModel(ak.load_base(world["base_dir"])[0]), tokenizer, runs, "tiny-base")
    with TestClient(create_app(server)) as test_client:
        assert [m["id"] for m in test_client.get("/v1/models").json()["data"]] == ["tiny-base", "tiny"]
        chat = test_client.post("/v1/chat/completions",
                                json={"model": "tiny", "messages": [{"role": "user", "content": "w5 w6"}],
                                      "temperature": 0, "max_tokens": 8})
        filled = complete(test_client, "tiny", "w1 w5 w6 w2", stop="\n")
        assert chat.status_code == filled.status_code == 200
        assert chat.json()["choices"][0]["message"]["content"] == filled.json()["choices"][0]["text"]
        assert chat.json()["usage"] == filled.json()["usage"]
        two = test_client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "system", "content": "w3"}, {"role": "user", "content": "w5"}]})
        assert two.status_code == 400 and two.json()["error"]["code"] == "invalid_messages"
        assert "'w1 {prompt} w2'" in two.json()["error"]["message"]


def test_serve_refuses_a_busy_port_before_loading_the_base_and_warns_of_an_empty_folder(tmp_path, capsys, caplog):
    from adapterkit.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--adapters", str(tmp_path), "--port", str(port),
                     "--base", str(tmp_path / "no-base")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"adapterkit: error: cannot listen on 127.0.0.1:{port}: Address already in use; another program "
        "(another adapterkit serve?) uses it: stop it or pick another --port")
    assert f"{tmp_path} holds no adapter yet" in caplog.text
