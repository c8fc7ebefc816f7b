"""One request cannot hurt another: bad values at the door, failing rows, disconnects, a full
queue, oversized bodies, a vanished adapters folder; and logprobs/echo through the openai client.
Each case checks that the other clients' answers are unaffected."""

import concurrent.futures
import contextlib
import json
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.serve import ServeConfig, Server, create_app
from test_serve import ADAPTERS, PROMPTS, WORDS, complete, make_server, sample, tiny_tokenizer, world  # noqa: F401


@pytest.fixture(scope="module")
def nan_world(world, tmp_path_factory):  # noqa: F811
    """The world's adapters plus 'nan', whose huge (finite) weights overflow to NaN."""
    folder = tmp_path_factory.mktemp("nan") / "adapters"
    shutil.copytree(world["adapters_dir"], folder, symlinks=True)
    base, _ = ak.load_base(world["base_dir"])
    model = ak.AdapterModel(base)
    model.add_adapter("nan", ak.BottleneckConfig(bottleneck_size=4))
    with torch.no_grad():
        for parameter in model.adapter_layers["nan"].parameters():
            parameter.fill_(1e30)
    model.save_adapter("nan", folder / "nan")
    return world | {"adapters_dir": folder}


def run_live(server: Server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return runner, thread, sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def serving(server: Server):
    """``server`` listening on a free port for the block (its address), stopped after it."""
    runner, thread, sock, url = run_live(server)
    try:
        yield url
    finally:
        runner.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def live_nan(nan_world):
    runner, thread, sock, url = run_live(make_server(nan_world, max_batch_size=32))
    yield url
    runner.should_exit = True
    thread.join(10)
    sock.close()


def ask(url, name, prompt, **fields):
    body = {"model": name, "prompt": prompt, "temperature": 0, "max_tokens": 8} | fields
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_a_failing_row_fails_its_request_alone(live_nan, nan_world):
    jobs = [(list(ADAPTERS)[i % 4], PROMPTS[i % 4]) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        bad = pool.submit(ask, live_nan, "nan", PROMPTS[0])
        good = list(pool.map(lambda job: ask(live_nan, *job), jobs))
    failed = bad.result()
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert "non-finite" in failed.json()["error"]["message"]
    assert [r.json()["choices"][0]["text"] for r in good] == [nan_world["answers"][job] for job in jobs]
    metrics = httpx.get(f"{live_nan}/metrics").text
    assert sample(metrics, "adapterkit_requests_total", adapter="nan", outcome="error") == 1
    assert sample(metrics, "adapterkit_requests_total", adapter="nan", outcome="ok") == 0


def test_the_openai_client_does_not_retry_a_failed_generation(live_nan):
    """It retries a 500 twice by default; the same prompt through the same adapter fails again,
    so the server says not to, and the failure costs one generation, not three."""
    openai = pytest.importorskip("openai")
    def errors() -> float:
        return sample(httpx.get(f"{live_nan}/metrics").text, "adapterkit_requests_total", adapter="nan",
                      outcome="error")

    before = errors()
    with pytest.raises(openai.InternalServerError, match="non-finite"):
        openai.OpenAI(base_url=f"{live_nan}/v1", api_key="unused").completions.create(
            model="nan", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert errors() == before + 1


@pytest.mark.parametrize(
    "fields, code, named",
    [
        ({"temperature": 1e-300}, "invalid_request", "temperature"),
        ({"temperature": 0.0005}, "invalid_request", "use 0 for greedy decoding or at least 0.001"),
        ({"seed": 2**70}, "invalid_request", "seed"),
        ({"seed": -3}, "invalid_request", "seed"),
        ({"stop": ["q" * 200_000] * 4}, "invalid_stop", "stop"),
        ({"logit_bias": {"5": 10}}, "unsupported_field", "logit_bias"),
        ({"suffix": "w1"}, "unsupported_field", "suffix"),
        ({"n": 2}, "unsupported_field", "n = 2"),
        ({"best_of": 3}, "unsupported_field", "best_of"),
        ({"prompt": "w1 " * 2000}, "context_length_exceeded", "characters"),
        ({"repetition_penalty": 1e-300}, "invalid_request", "repetition_penalty"),
        ({"max_tokens": "5"}, "invalid_request", "max_tokens"),
        ({"max_tokens": True}, "invalid_request", "max_tokens"),
        ({"prompt": ["w1"] * 65}, "too_many_prompts", "65 prompts"),
    ],
)
def test_bad_values_are_refused_at_the_door(nan_world, fields, code, named):
    with TestClient(create_app(make_server(nan_world))) as client:
        response = client.post("/v1/completions",
                               json={"model": "lora", "prompt": PROMPTS[0], "temperature": 0, "max_tokens": 8}
                               | fields)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == code and named in error["message"] and error["type"] == "invalid_request_error"
        assert (complete(client, "lora", PROMPTS[0]).json()["choices"][0]["text"]
                == nan_world["answers"]["lora", PROMPTS[0]])


def test_bodies_too_large_not_utf8_or_holding_lone_surrogates_get_openai_errors(nan_world):
    with TestClient(create_app(make_server(nan_world))) as client:
        huge = client.post("/v1/completions", content=json.dumps({"model": "lora", "prompt": "w1 " * 1_000_000}),
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        broken = client.post("/v1/completions", content=b'{"model": "lora", "prompt": "\xff\xfe"}',
                             headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["message"]
        # valid JSON, but not text: no tokenizer takes it
        lone = client.post("/v1/completions", content=b'{"model": "lora", "prompt": "w1 \\ud800", "max_tokens": 2}',
                           headers={"content-type": "application/json"})
        assert lone.status_code == 400 and lone.json()["error"]["code"] == "invalid_text"
        lone_stop = client.post("/v1/completions", content=b'{"model": "lora", "prompt": "w1", "stop": "\\ud800"}',
                                headers={"content-type": "application/json"})
        assert lone_stop.status_code == 400 and lone_stop.json()["error"]["code"] == "invalid_text"
        missing = client.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (complete(client, "lora", PROMPTS[1]).json()["choices"][0]["text"]
                == nan_world["answers"]["lora", PROMPTS[1]])


def test_a_body_that_stops_arriving_is_answered_408_while_others_are_served(nan_world, monkeypatch):
    """A Content-Length larger than the body sent would hold its connection for good."""
    import adapterkit.serve.app

    monkeypatch.setattr(adapterkit.serve.app, "BODY_IDLE_SECONDS", 1.0)
    with serving(make_server(nan_world)) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = socket.create_connection((host, int(port)))
        payload = json.dumps({"model": "lora", "prompt": PROMPTS[0]}).encode()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload) + 100}\r\n\r\n".encode() + payload)
        assert ask(url, "lora", PROMPTS[1]).json()["choices"][0]["text"] == nan_world["answers"]["lora", PROMPTS[1]]
        [(status, answer)] = read_responses(conn, 1, seconds=10)
        assert status == 408 and answer["error"]["code"] == "request_timeout"
        assert f"after {len(payload)} bytes" in answer["error"]["message"]
        assert conn.recv(1) == b""  # and the connection is closed: its unread rest is not a next request
        conn.close()


def test_chat_refuses_empty_message_floods_and_unknown_message_fields(nan_world):
    """Roles count toward the length bound and there are at most context-many messages, so a
    flood of empty messages is refused before the template is rendered or tokenised. A message's
    ``name`` is OpenAI's and is taken; a field OpenAI does not have is refused by name."""
    with TestClient(create_app(make_server(nan_world))) as client:
        flood = client.post("/v1/chat/completions",
                            json={"model": "tiny-base", "messages": [{"role": "system", "content": ""}] * 3000})
        assert flood.status_code == 400 and flood.json()["error"]["code"] == "context_length_exceeded"

        def chat(message: dict):
            return client.post("/v1/chat/completions", json={"model": "tiny-base", "messages": [message],
                                                             "temperature": 0, "max_tokens": 4})

        named, plain = chat({"role": "user", "content": "w1", "name": "bob"}), chat({"role": "user", "content": "w1"})
        assert named.status_code == 200 and named.json()["choices"] == plain.json()["choices"]
        moody = chat({"role": "user", "content": "w1", "mood": "cross"})
        assert (moody.status_code == 400 and moody.json()["error"]["code"] == "unsupported_field"
                and "mood" in moody.json()["error"]["message"])
        assert (complete(client, "lora", PROMPTS[0]).json()["choices"][0]["text"]
                == nan_world["answers"]["lora", PROMPTS[0]])


def read_responses(conn: socket.socket, count: int, seconds: float = 30) -> list[tuple[int, dict]]:
    """``count`` HTTP/1.1 responses with Content-Length bodies read from ``conn``: (status, JSON)."""
    conn.settimeout(seconds)
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            assert chunk, f"the server closed the connection after {len(answers)} answer(s)"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(data) < length:
            chunk = conn.recv(65536)
            assert chunk, "the server closed the connection mid-answer"
            data += chunk
        answers.append((int(head.split(b" ")[1]), json.loads(data[:length])))
        data = data[length:]
    return answers


def test_an_unexpected_error_is_a_500_and_the_connection_serves_on(nan_world):
    """Two requests pipelined on one connection: the first hits a bug (here, a planted one), the
    second is still answered on the same connection."""
    server = make_server(nan_world)
    check_model = server.check_model

    def buggy(name: str) -> None:
        if name == "boom":
            raise RuntimeError("a bug")
        check_model(name)

    server.check_model = buggy
    runner, thread, sock, url = run_live(server)
    try:
        host, port = url.removeprefix("http://").split(":")
        conn = socket.create_connection((host, int(port)))
        requests = b""
        for name in ("boom", "lora"):
            payload = json.dumps({"model": name, "prompt": PROMPTS[0], "temperature": 0, "max_tokens": 8}).encode()
            requests += (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        conn.sendall(requests)
        (status, failed), (ok_status, answer) = read_responses(conn, 2)
        conn.close()
        assert (status == 500 and failed["error"]["code"] == "internal_error"
                and "a bug" not in failed["error"]["message"])
        assert ok_status == 200 and answer["choices"][0]["text"] == nan_world["answers"]["lora", PROMPTS[0]]
    finally:
        runner.should_exit = True
        thread.join(10)
        sock.close()


def test_load_errors_hide_server_paths_and_a_vanished_folder_is_an_error(nan_world, tmp_path):
    folder = tmp_path / "adapters"
    shutil.copytree(nan_world["adapters_dir"], folder, symlinks=True)
    server = make_server(nan_world | {"adapters_dir": folder})
    with TestClient(create_app(server)) as client:
        broken = complete(client, "broken", PROMPTS[0]).json()["error"]
        assert "broken/adapter_model.safetensors is corrupt" in broken["message"] and "/tmp" not in broken["message"]
        assert complete(client, "houlsby", PROMPTS[0]).status_code == 200
        shutil.rmtree(folder)
        models = client.get("/v1/models")
        assert models.status_code == 503 and models.json()["error"]["code"] == "adapters_unavailable"
        gone = complete(client, "lora", PROMPTS[0])
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        for name in ("tiny-base", "houlsby"):  # the base and the adapter already loaded keep serving
            assert (complete(client, name, PROMPTS[2]).json()["choices"][0]["text"]
                    == nan_world["answers"][name, PROMPTS[2]])


# ---- slow rows: a base with a long context that never says end-of-text --------------------------------
@pytest.fixture(scope="module")
def long_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=4096, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # end-of-text scores 0, below the best of 63 random logits: answers run to max_tokens
        model.lm_head.weight[2] = 0.0
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "adapters").mkdir()
    return root


@pytest.fixture
def slow_server(long_base):
    base, tokenizer = ak.load_base(long_base / "base")
    server = Server(ak.AdapterModel(base), tokenizer, long_base / "adapters", "base0",
                    config=ServeConfig(max_batch_size=1, max_queue=1))
    runner, thread, sock, url = run_live(server)
    yield url
    runner.should_exit = True
    thread.join(10)
    sock.close()


def health(url):
    return httpx.get(f"{url}/health").json()


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def raw_post(url, body: dict) -> socket.socket:
    """Send a completion request on a raw socket (to close it without reading the answer)."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return conn


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_frees_its_row(slow_server, stream):
    conn = raw_post(slow_server, {"model": "base0", "prompt": "w1 w2", "max_tokens": 4000, "temperature": 0,
                                  "stream": stream})
    wait_until(lambda: health(slow_server)["rows_in_flight"] == 1)
    conn.close()
    wait_until(lambda: health(slow_server)["rows_in_flight"] == 0)
    metrics = httpx.get(f"{slow_server}/metrics").text
    wait_until(lambda: sample(httpx.get(f"{slow_server}/metrics").text, "adapterkit_requests_total", adapter="base0",
                              outcome="cancelled") == 1)
    assert sample(metrics, "adapterkit_requests_total", adapter="base0", outcome="ok") == 0
    assert sample(httpx.get(f"{slow_server}/metrics").text, "adapterkit_completion_tokens_total",
                  adapter="base0") < 4000
    answer = httpx.post(f"{slow_server}/v1/completions",
                        json={"model": "base0", "prompt": "w1 w2", "max_tokens": 5, "temperature": 0}, timeout=30)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5


def test_a_full_queue_answers_429_with_retry_after(slow_server):
    long = {"model": "base0", "prompt": "w1 w2", "max_tokens": 4000, "temperature": 0}
    running = raw_post(slow_server, long)
    wait_until(lambda: health(slow_server)["rows_in_flight"] == 1)
    queued = raw_post(slow_server, long)
    wait_until(lambda: health(slow_server)["queued"] == 1)
    refused = httpx.post(f"{slow_server}/v1/completions", json=long | {"max_tokens": 3}, timeout=30)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert sample(httpx.get(f"{slow_server}/metrics").text, "adapterkit_requests_total", adapter="base0",
                  outcome="rejected") == 1
    running.close()
    queued.close()
    wait_until(lambda: health(slow_server)["rows_in_flight"] == 0 and health(slow_server)["queued"] == 0)
    assert httpx.post(f"{slow_server}/v1/completions", json=long | {"max_tokens": 3}, timeout=30).status_code == 200


def test_health_answers_while_a_long_prompt_is_tokenised_and_refused(slow_server):
    prompt = "w1 " * 300_000  # 900 kB: under the body limit, over the context's character bound
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refused = pool.submit(httpx.post, f"{slow_server}/v1/completions", json={"model": "base0", "prompt": prompt},
                              timeout=30)
        assert health(slow_server)["status"] == "ok"
        assert refused.result().status_code == 400


def test_scoring_a_prompt_through_a_failing_adapter_is_an_error_not_ok(live_nan, nan_world):
    before = sample(httpx.get(f"{live_nan}/metrics").text, "adapterkit_requests_total", adapter="nan", outcome="error")
    scored = ask(live_nan, "nan", PROMPTS[0], max_tokens=0, echo=True, logprobs=2)
    assert scored.status_code == 500 and scored.json()["error"]["code"] == "generation_failed"
    assert scored.headers["x-should-retry"] == "false"
    metrics = httpx.get(f"{live_nan}/metrics").text
    assert sample(metrics, "adapterkit_requests_total", adapter="nan", outcome="error") == before + 1
    assert sample(metrics, "adapterkit_requests_total", adapter="nan", outcome="ok") == 0
    assert ask(live_nan, "lora", PROMPTS[2]).json()["choices"][0]["text"] == nan_world["answers"]["lora", PROMPTS[2]]


# ---- logprobs and echo through the official client ----------------------------------------------
def test_logprobs_and_echo_through_the_openai_client_match_the_models_logits(live_nan, nan_world):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_nan}/v1", api_key="unused")
    tokenizer = tiny_tokenizer()
    base, _ = ak.load_base(nan_world["base_dir"])
    reference = ak.AdapterModel(base)
    reference.load_adapter(nan_world["adapters_dir"] / "lora", name="lora")
    reference.set_active("lora")
    prompt = PROMPTS[2]
    completion = client.completions.create(model="lora", prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                           echo=True)
    choice = completion.choices[0]
    assert choice.text.startswith(prompt)
    tokens = [tokenizer.convert_tokens_to_ids(t) for t in choice.logprobs.tokens]
    prompt_ids = tokenizer.encode(prompt)
    assert tokens[: len(prompt_ids)] == prompt_ids and len(tokens) == len(prompt_ids) + 4
    with torch.no_grad():
        expected = torch.log_softmax(reference(input_ids=torch.tensor([tokens])).logits[0].float(), -1)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    for position in range(1, len(tokens)):
        row = expected[position - 1]
        assert choice.logprobs.token_logprobs[position] == pytest.approx(row[tokens[position]].item(), abs=1e-4)
        top = choice.logprobs.top_logprobs[position]
        assert [tokenizer.convert_tokens_to_ids(t) for t in top] == row.topk(3).indices.tolist()
        assert list(top.values()) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    scored = client.completions.create(model="lora", prompt=prompt, max_tokens=0, temperature=0, logprobs=0,
                                       echo=True).choices[0]
    assert scored.text == prompt and scored.logprobs.token_logprobs[1:] == pytest.approx(
        choice.logprobs.token_logprobs[1:len(prompt_ids)], abs=1e-6)
