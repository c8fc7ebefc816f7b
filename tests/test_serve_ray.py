"""``adapterkit serve --ray``: two replicas over the tiny base and six adapters on a local Ray cluster
started here. The answers are the single server's, requests for an adapter stay on the replica that
loaded it, a killed replica loses no other replica's requests and comes back, and a bad request
fails alone."""

import asyncio
import concurrent.futures
import json
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import ray
import torch
from fastapi.testclient import TestClient
from ray import serve
from ray.exceptions import RayActorError
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.errors import ConfigError, ReplicaUnavailableError
from adapterkit.serve import ServeConfig, Server, create_app
from adapterkit.serve.app import MAX_BODY_BYTES
from adapterkit.serve.ray import APP_NAME, REPLICA_HEADER, application, build, relayed
from conftest import randomise
from test_serve import KEY, WORDS, sample, tiny_tokenizer

ADAPTERS = {
    "houlsby": ak.BottleneckConfig(bottleneck_size=8),
    "parallel": ak.BottleneckConfig(placement="parallel", bottleneck_size=6),
    "pfeiffer": ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=4, activation="relu"),
    "lora": ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora-small": ak.LoraConfig(r=2, target_modules=["q_proj"]),
    "houlsby-small": ak.BottleneckConfig(bottleneck_size=2),
}
COMPOSITIONS = {"stacked": ak.Stack("houlsby", "lora")}
PROMPT, OTHER = "w1 w2 w3", "w5 w6 w7 w8 w9"
CONTEXT = 4096  # room for a long answer, that a client can leave in the middle of
AUTH = {"Authorization": f"Bearer {KEY}"}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(WORDS), max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def cases() -> list[tuple[str, dict]]:
    """(route, body) of requests whose answers the single server gives too: each adapter, the base and
    a composition, completions with logprobs and echo, streamed completions and chat."""
    made = [("/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 8})
            for name in ["tiny-base", *ADAPTERS, "stacked"]]
    made += [
        ("/v1/completions", {"model": "lora", "prompt": [PROMPT, OTHER], "max_tokens": 6, "logprobs": 2,
                             "echo": True}),
        ("/v1/completions", {"model": "parallel", "prompt": OTHER, "max_tokens": 8, "stream": True, "logprobs": 1}),
        ("/v1/chat/completions", {"model": "pfeiffer", "messages": [{"role": "user", "content": "w3 w4"}],
                                  "max_tokens": 6, "stream": True}),
        ("/v1/chat/completions", {"model": "houlsby-small", "messages": [{"role": "user", "content": "w3 w4"}],
                                  "max_tokens": 6}),
    ]
    return [(route, body | {"temperature": 0}) for route, body in made]


def comparable(response) -> object:
    """An answer without what differs between any two answers (ids, times), streamed or not."""
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n\n") if line]
        return [comparable_event(event) for event in events]
    return comparable_event(response.text)


def comparable_event(text: str) -> object:
    if text == "[DONE]":
        return text
    document = json.loads(text)
    return {key: value for key, value in document.items() if key not in ("id", "created")}


def assert_same(got: object, expected: object, where: str) -> None:
    """Equal answers: texts, tokens and counts byte for byte; log-probabilities within 1e-5 (a replica
    runs torch on one thread, the single server here on two: float sums differ in order)."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where} {key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for item, wanted in zip(got, expected):
            assert_same(item, wanted, where)
    else:
        assert got == expected, where


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base, six adapters and a corrupt one in a folder, and the single server's answers."""
    root = tmp_path_factory.mktemp("serve-ray")
    base_dir, adapters_dir = root / "tiny-base", root / "adapters"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    base, tokenizer = ak.load_base(base_dir)
    model = ak.AdapterModel(base)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model.add_adapter(name, config)
        randomise(model, name, seed)
        model.save_adapter(name, adapters_dir / name)
    shutil.copytree(adapters_dir / "houlsby", adapters_dir / "broken")
    weights = adapters_dir / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    single = Server(ak.AdapterModel(ak.load_base(base_dir)[0]), tokenizer, adapters_dir, "tiny-base",
                    compositions=COMPOSITIONS)
    with TestClient(create_app(single)) as client:
        answers = [comparable(client.post(route, json=body)) for route, body in cases()]
        models = client.get("/v1/models").json()
    return {"base_dir": base_dir, "adapters_dir": adapters_dir, "answers": answers, "models": models}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(world):
    """The application, 2 replicas, on a local Ray cluster of 2 CPUs: its URL."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application(str(world["base_dir"]), world["adapters_dir"], replicas=2, api_key=KEY,
                          config=ServeConfig(max_batch_size=8, max_queue=32), compositions=COMPOSITIONS)
        serve.run(app, name=APP_NAME)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(url: str, model: str, prompt: str = PROMPT, **fields) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 8} | fields
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def homes(url: str, names: list[str]) -> dict[str, str]:
    """{adapter: the replica that answered its request}, one request each, in order."""
    found = {}
    for name in names:
        response = complete(url, name)
        assert response.status_code == 200, response.text
        found[name] = response.headers[REPLICA_HEADER]
    return found


def loaded_by_replica(url: str) -> dict[str, set[str]]:
    """{replica: the adapters it holds}, from /health asked until both replicas answered (a new
    replica takes a moment to reach the ingress's router)."""
    found: dict[str, set[str]] = {}
    deadline = time.monotonic() + 30
    while len(found) < 2 and time.monotonic() < deadline:
        response = httpx.get(f"{url}/health")
        found[response.headers[REPLICA_HEADER]] = set(response.json()["loaded_adapters"])
        time.sleep(0.05)
    assert len(found) == 2, f"only {sorted(found)} answered /health"
    return found


def by_replica(url: str, metric: str, **labels) -> dict[str, float]:
    """{replica: the value of one sample of its /metrics}."""
    found: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while len(found) < 2 and time.monotonic() < deadline:
        response = httpx.get(f"{url}/metrics")
        found[response.headers[REPLICA_HEADER]] = sample(response.text, metric, **labels)
    assert len(found) == 2, f"only {sorted(found)} answered /metrics"
    return found


def adapter_loads(url: str) -> dict[str, float]:
    """{replica: adapters it has read from the folder so far}."""
    return by_replica(url, "adapterkit_adapter_loads_total")


def replicas_running() -> int:
    return serve.status().applications[APP_NAME].deployments["Replica"].replica_states.get("RUNNING", 0)


def test_the_ray_options_are_checked_before_anything_starts(tmp_path, capsys, monkeypatch):
    """(First in the file: Ray is not started yet.)"""
    from adapterkit.cli import main

    assert main(["serve", "--adapters", str(tmp_path), "--replicas", "2"]) == 2
    assert capsys.readouterr().err == "adapterkit: error: --replicas applies to --ray: add --ray\n"
    assert main(["serve", "--adapters", str(tmp_path), "--ray", "--replicas", "0"]) == 2
    assert "--replicas must be a whole number of at least 1, got 0" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--adapters", str(tmp_path), "--ray", "--port", str(port)]) == 2
    assert "Address already in use" in capsys.readouterr().err and not ray.is_initialized()
    with pytest.raises(ConfigError, match="unknown argument.*replica\\b"):
        build({"adapters": str(tmp_path), "replica": 2})
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--adapters", str(tmp_path), "--ray"]) == 2
    assert capsys.readouterr().err == "adapterkit: error: --ray needs Ray Serve: pip install 'adapterkit[ray]'\n"


def replica_stopping_after(*messages: dict) -> AsyncIterator[dict]:
    """A replica's answer that stops (its actor dies) after sending ``messages``."""
    async def answer() -> AsyncIterator[dict]:
        for message in messages:
            yield message
        raise RayActorError()
    return answer()


def test_a_replica_stopping_between_its_headers_and_body_is_answered_with_a_whole_503():
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"365")]}
    with pytest.raises(ReplicaUnavailableError, match="retry it"):
        asyncio.run(relayed(replica_stopping_after(start)))


def test_an_event_stream_whose_replica_stops_ends_with_an_error_event():
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    first = {"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True}
    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def send_all() -> None:
        answer = await relayed(replica_stopping_after(start, first))
        await answer({}, None, send)

    asyncio.run(send_all())
    assert sent[:2] == [start, first] and sent[2]["more_body"] is False
    events = sent[2]["body"].decode().split("\n\n")
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "replica_unavailable"
    assert events[1:] == ["data: [DONE]", ""]


def test_answers_equal_the_single_servers(cluster, world):
    for (route, body), expected in zip(cases(), world["answers"]):
        response = httpx.post(f"{cluster}{route}", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert_same(comparable(response), expected, f"{route} {body}")
    assert httpx.get(f"{cluster}/v1/models").json() == world["models"]


def test_requests_for_an_adapter_stay_on_the_replicas_that_hold_it(cluster):
    homes(cluster, list(ADAPTERS))
    time.sleep(1)  # Ray's routers learn which replica serves what within a fraction of a second
    held, loads = loaded_by_replica(cluster), adapter_loads(cluster)
    assert all(set(ADAPTERS) & loaded for loaded in held.values())  # a cold adapter goes to the replica serving fewest
    for _ in range(3):
        for name, replica in homes(cluster, list(ADAPTERS)).items():
            assert name in held[replica], (name, replica, held)
    assert adapter_loads(cluster) == loads  # no adapter was read again


def test_a_bad_request_for_one_replicas_adapter_fails_alone(cluster):
    homes(cluster, list(ADAPTERS))
    held = loaded_by_replica(cluster)
    bad = [{"model": "broken", "prompt": PROMPT}, {"model": "houlsby", "prompt": PROMPT, "temperature": "hot"},
           {"model": "nobody", "prompt": PROMPT}, {"model": "lora", "prompt": PROMPT, "max_tokens": CONTEXT}]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        refused = [pool.submit(httpx.post, f"{cluster}/v1/completions", json=body, timeout=60) for body in bad * 3]
        good = list(pool.map(lambda name: complete(cluster, name, OTHER), list(ADAPTERS) * 2))
    assert sorted({r.result().status_code for r in refused}) == [400, 404]
    assert {r.result().json()["error"]["code"] for r in refused} == {
        "adapter_load_failed", "invalid_request", "model_not_found", "context_length_exceeded"}
    huge = httpx.post(f"{cluster}/v1/completions", content=b"{" * (MAX_BODY_BYTES + 1), timeout=60)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"  # the ingress refuses it
    assert all(response.status_code == 200 for response in good)
    assert all(name in held[response.headers[REPLICA_HEADER]] for name, response in zip(list(ADAPTERS) * 2, good))
    alone = {name: complete(cluster, name, OTHER).json()["choices"] for name in ADAPTERS}
    assert [response.json()["choices"] for response in good] == [alone[name] for name in ADAPTERS] * 2


def test_a_killed_replica_loses_no_other_replicas_requests_and_comes_back(cluster):
    def answer(name: str, **fields) -> httpx.Response:
        return complete(cluster, name, OTHER, max_tokens=30, **fields)

    alone = {name: answer(name).json()["choices"] for name in ADAPTERS}
    held = loaded_by_replica(cluster)
    victim = min(held, key=lambda replica: len(held[replica] & set(ADAPTERS)))
    survivors = [name for name in ADAPTERS if name not in held[victim]]  # never placed on the victim
    assert survivors and len(survivors) < len(ADAPTERS)
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim))
    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        running = [pool.submit(answer, name) for name in list(ADAPTERS) * 2]
        streamed = pool.submit(answer, sorted(held[victim] & set(ADAPTERS))[0], stream=True)
        time.sleep(0.2)
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        answers = [future.result() for future in running]
    for name, response in zip(list(ADAPTERS) * 2, answers):
        if name in survivors or response.status_code == 200:
            assert response.status_code == 200 and response.json()["choices"] == alone[name], response.text
        else:
            assert response.status_code == 503 and response.json()["error"]["code"] == "replica_unavailable"
    stream = streamed.result()
    if stream.status_code == 200:  # cut mid-way, a stream ends with an error event, as the app's streams do
        events = [line[6:] for line in stream.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "choices" in last or last["error"]["code"] == "replica_unavailable"
    else:
        assert stream.status_code == 503
    deadline = time.monotonic() + 60
    while replicas_running() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replicas_running() == 2
    assert victim not in loaded_by_replica(cluster)
    assert {name: answer(name).json()["choices"] for name in ADAPTERS} == alone


def test_adapter_management_reaches_every_replica_that_holds_the_adapter(cluster):
    complete(cluster, "lora")
    holders = {replica for replica, loaded in loaded_by_replica(cluster).items() if "lora" in loaded}
    assert httpx.post(f"{cluster}/v1/adapters", json={"name": "lora"}).status_code == 401
    reloaded = httpx.post(f"{cluster}/v1/adapters", json={"name": "lora"}, headers=AUTH)
    assert reloaded.status_code == 200 and reloaded.json()["reloaded"] is True
    assert reloaded.headers[REPLICA_HEADER] in holders
    unloaded = httpx.delete(f"{cluster}/v1/adapters/lora", headers=AUTH)
    assert unloaded.json() == {"name": "lora", "loaded": False} and unloaded.headers[REPLICA_HEADER] in holders
    assert not any("lora" in loaded for loaded in loaded_by_replica(cluster).values())
    assert httpx.delete(f"{cluster}/v1/adapters/lora", headers=AUTH).status_code == 404
    assert httpx.post(f"{cluster}/v1/adapters", json={"name": "../lora"}, headers=AUTH).status_code == 400
    loaded = httpx.post(f"{cluster}/v1/adapters", json={"name": "lora"}, headers=AUTH)
    assert loaded.status_code == 200 and loaded.json()["reloaded"] is False
    assert [replica for replica, names in loaded_by_replica(cluster).items() if "lora" in names] == [
        loaded.headers[REPLICA_HEADER]]


def test_a_client_that_leaves_frees_its_row_on_the_replica(cluster):
    labels = {"adapter": "pfeiffer", "outcome": "cancelled"}
    before = by_replica(cluster, "adapterkit_requests_total", **labels)
    body = {"model": "pfeiffer", "prompt": PROMPT, "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{cluster}/v1/completions", json=body, timeout=60) as response:
        replica = response.headers[REPLICA_HEADER]
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while (cancelled := by_replica(cluster, "adapterkit_requests_total", **labels)) == before:
        assert time.monotonic() < deadline, "the row was not cancelled"
        time.sleep(0.1)
    assert cancelled[replica] == before[replica] + 1


def test_a_method_no_route_takes_is_refused_in_openais_shape(cluster):
    answer = httpx.request("TRACE", f"{cluster}/v1/models")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
