"""No composition, adapter file or client can wedge the server: adapters are acquired together or
not at all, a failed load holds nothing, a bad composition fails its own request, a client that
leaves stops waiting, and a large scoring answer is built off the event loop. Every wait is bounded
by a timeout, and the other clients' answers are checked to be unaffected."""

import concurrent.futures
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import adapterkit as ak
from adapterkit.compose import adapter_names, fusions
from adapterkit.serve import create_app
from test_serve import KEY, PROMPTS, complete, make_server, world  # noqa: F401
from test_serve_isolation import serving

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub" / "llama" / "fusion"
AUTH = {"Authorization": f"Bearer {KEY}"}


def answer_of(world, block, prompt: str) -> str:
    """What ``block`` answers alone, greedily, without the server."""
    base, tokenizer = ak.load_base(world["base_dir"])
    model = ak.AdapterModel(base)
    for name in adapter_names(block) if not isinstance(block, str) else [block]:
        model.load_adapter(world["adapters_dir"] / name)
    for fuse in reversed(fusions(block)) if not isinstance(block, str) else []:
        model.load_adapter(world["adapters_dir"] / fuse.name)
    model.set_active(block)
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def fused(world, tmp_path_factory):  # noqa: F811
    """The world's adapters plus 'fz', a fusion of houlsby and parallel."""
    folder = tmp_path_factory.mktemp("fused") / "adapters"
    shutil.copytree(world["adapters_dir"], folder, symlinks=True)
    model = ak.AdapterModel(ak.load_base(world["base_dir"])[0])
    for name in ("houlsby", "parallel"):
        model.load_adapter(folder / name)
    fuse = ak.Fuse("houlsby", "parallel", name="fz")
    model.add_fusion(fuse)
    with torch.no_grad():
        for parameter in model.adapter_layers["fz"].parameters():
            parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    model.save_adapter(fuse, folder / "fz")
    return world | {"adapters_dir": folder}


def live(world, **options):
    return serving(make_server(world, **options))


def ask(url, name, prompt, timeout=30, **fields):
    body = {"model": name, "prompt": prompt, "temperature": 0, "max_tokens": 8} | fields
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def test_a_composition_larger_than_the_cache_or_named_like_an_adapter_is_refused_at_start(world):  # noqa: F811
    with pytest.raises(ak.ConfigError, match=r"'three' uses 3 adapters, more than --max-loaded-adapters \(2\)"):
        make_server(world, max_loaded_adapters=2, compositions={"three": ak.Stack("houlsby", "parallel", "pfeiffer")})
    with pytest.raises(ak.ConfigError, match="composition 'lora' has the name of an adapter in the adapters folder"):
        make_server(world, compositions={"lora": ak.Stack("houlsby", "parallel")})


def test_a_composition_nested_too_deep_is_refused_at_start(world):  # noqa: F811
    deep = "lora"
    for _ in range(300):
        deep = ak.Stack(deep)
    with pytest.raises(ak.ConfigError, match="blocks nest at most 32 levels deep"):
        make_server(world, compositions={"deep": deep})


def test_compositions_requested_together_under_a_small_cache_all_answer(world):  # noqa: F811
    compositions = {"hp": ak.Stack("houlsby", "parallel"), "fl": ak.Stack("pfeiffer", "lora")}
    expected = {name: answer_of(world, block, PROMPTS[0]) for name, block in compositions.items()}
    with live(world, max_loaded_adapters=2, compositions=compositions) as url:
        names = ["hp", "fl"] * 3
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda name: ask(url, name, PROMPTS[0]), names))
        assert [a.json()["choices"][0]["text"] for a in answers] == [expected[n] for n in names]
        health = httpx.get(f"{url}/health").json()
        assert health["queued"] == 0 and len(health["loaded_adapters"]) <= 2


def test_a_member_that_fails_to_load_leaves_nothing_held(world):  # noqa: F811
    with TestClient(create_app(make_server(world, compositions={"half": ak.Stack("lora", "broken")}))) as client:
        for _ in range(3):
            failed = complete(client, "half", PROMPTS[0])
            assert failed.status_code == 400 and failed.json()["error"]["code"] == "adapter_load_failed"
        assert client.get("/health").json()["queued"] == 0
        assert client.delete("/v1/adapters/lora", headers=AUTH).json() == {"name": "lora", "loaded": False}
        assert (complete(client, "lora", PROMPTS[0]).json()["choices"][0]["text"]
                == world["answers"]["lora", PROMPTS[0]])


def test_a_composition_whose_member_is_missing_is_a_400_naming_the_member(world):  # noqa: F811
    with TestClient(create_app(make_server(world, compositions={"ghost": ak.Stack("lora", "nowhere")}))) as client:
        failed = complete(client, "ghost", PROMPTS[0])
        assert failed.status_code == 400 and failed.json()["error"]["code"] == "adapter_load_failed"
        assert failed.json()["error"]["message"] == (
            "composition 'ghost' cannot be loaded: the model 'nowhere' does not exist: no adapter folder of that name")
        assert complete(client, "nowhere", PROMPTS[0]).status_code == 404


def test_a_fusions_children_cannot_be_unloaded_or_reloaded_under_it(fused):
    compositions = {"fused": ak.Fuse("houlsby", "parallel", name="fz")}
    expected = answer_of(fused, compositions["fused"], PROMPTS[1])
    with TestClient(create_app(make_server(fused, compositions=compositions))) as client:
        assert complete(client, "fused", PROMPTS[1]).json()["choices"][0]["text"] == expected
        for refused in (client.delete("/v1/adapters/houlsby", headers=AUTH),
                        client.post("/v1/adapters", json={"name": "parallel"}, headers=AUTH)):
            assert refused.status_code == 409, refused.text
            assert "child of the loaded fusion(s) ['fz']; unload those first" in refused.json()["error"]["message"]
        assert client.delete("/v1/adapters/fz", headers=AUTH).status_code == 200
        assert client.delete("/v1/adapters/houlsby", headers=AUTH).status_code == 200


@pytest.fixture
def hub_fusion_without_width(world, tmp_path):  # noqa: F811
    folder = tmp_path / "adapters"
    shutil.copytree(world["adapters_dir"], folder, symlinks=True)
    shutil.copytree(FIXTURES / "fusion", folder / "hubfusion")
    config = folder / "hubfusion" / "adapter_fusion_config.json"
    document = json.loads(config.read_text())
    del document["hidden_size"]
    config.write_text(json.dumps(document))
    return world | {"adapters_dir": folder}


def test_an_adapter_that_cannot_be_read_fails_its_request_and_frees_its_load(hub_fusion_without_width):
    with live(hub_fusion_without_width) as url:
        failed = ask(url, "hubfusion", PROMPTS[0], timeout=20)
        assert failed.status_code == 400 and failed.json()["error"]["code"] == "adapter_load_failed"
        loaded = httpx.post(f"{url}/v1/adapters", json={"name": "hubfusion"}, headers=AUTH, timeout=20)
        assert loaded.status_code == 400 and "hubfusion" in loaded.json()["error"]["message"]
        assert (ask(url, "lora", PROMPTS[0]).json()["choices"][0]["text"]
                == hub_fusion_without_width["answers"]["lora", PROMPTS[0]])
        assert httpx.get(f"{url}/health").json()["queued"] == 0


@pytest.mark.parametrize("field, value", [
    ("lora_dropout", "x"), ("r", [1]), ("peft_type", ["LORA"]), ("target_modules", "(["),
])
def test_a_malformed_peft_config_is_a_400_for_its_request_alone(world, tmp_path, field, value):  # noqa: F811
    folder = tmp_path / "adapters"
    shutil.copytree(world["adapters_dir"], folder, symlinks=True)
    model = ak.AdapterModel(ak.load_base(world["base_dir"])[0])
    model.load_adapter(folder / "lora")
    model.save_adapter("lora", folder / "odd", format="peft")
    config = folder / "odd" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {field: value}))
    with TestClient(create_app(make_server(world | {"adapters_dir": folder}))) as client:
        failed = complete(client, "odd", PROMPTS[0])
        assert failed.status_code == 400, failed.text
        assert failed.json()["error"]["code"] == "adapter_load_failed" and str(folder) not in failed.text
        assert (complete(client, "lora", PROMPTS[0]).json()["choices"][0]["text"]
                == world["answers"]["lora", PROMPTS[0]])


def test_a_client_that_leaves_while_its_adapter_loads_stops_waiting(world, monkeypatch):  # noqa: F811
    import adapterkit.serve.pool as pool_module

    slow_read = pool_module.read_adapter

    def read_slowly(*args, **kwargs):
        time.sleep(2.0)
        return slow_read(*args, **kwargs)

    monkeypatch.setattr(pool_module, "read_adapter", read_slowly)
    with live(world) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            patient = pool.submit(ask, url, "houlsby", PROMPTS[0])
            time.sleep(0.1)
            with pytest.raises(httpx.ReadTimeout):
                ask(url, "houlsby", PROMPTS[1], timeout=0.5)  # gives up and closes its connection
            time.sleep(0.5)
            assert httpx.get(f"{url}/health").json()["queued"] == 1  # only the patient client still waits
            assert patient.result().json()["choices"][0]["text"] == world["answers"]["houlsby", PROMPTS[0]]


def test_scoring_answers_are_bounded_per_request(world):  # noqa: F811
    with TestClient(create_app(make_server(world, max_scored_tokens=200))) as client:
        prompts = [PROMPTS[2]] * 4  # 5 tokens each, scored with echo, plus 8 generated: 13 x 4 x (1 + 3) = 208
        refused = complete(client, "lora", prompts, echo=True, logprobs=3)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_logprobs"
        assert "208 log-probabilities" in refused.json()["error"]["message"]
        allowed = complete(client, "lora", prompts[:3], echo=True, logprobs=3)
        assert allowed.status_code == 200 and len(allowed.json()["choices"][2]["logprobs"]["tokens"]) >= 6


def test_a_scoring_answer_is_built_off_the_event_loop(world, monkeypatch):  # noqa: F811
    import adapterkit.serve.app as app_module

    built = app_module.logprobs_block

    def build_slowly(*args):
        time.sleep(1.5)
        return built(*args)

    monkeypatch.setattr(app_module, "logprobs_block", build_slowly)
    with live(world) as url:
        scoring = threading.Thread(target=ask, args=(url, "lora", PROMPTS[0]), kwargs={"echo": True, "logprobs": 2})
        scoring.start()
        time.sleep(0.6)  # the answer is being built now
        started = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 0.5
        scoring.join(10)


def test_the_pool_never_holds_some_adapters_while_waiting_for_others(world):  # noqa: F811
    """Two requests whose members overlap under a cache of two: both complete, in either order."""
    import asyncio

    pool = make_server(world, max_loaded_adapters=2).pool

    async def scenario():
        await asyncio.wait_for(asyncio.gather(pool.acquire(["houlsby", "lora"]), pool.acquire(["lora", "parallel"])),
                               10)
        assert pool.holds == {"houlsby": 1, "lora": 2, "parallel": 1}
        await pool.release(["houlsby", "lora"])
        await pool.release(["lora", "parallel"])
        assert len(pool.resident) == 2 and not pool.holds

    asyncio.run(scenario())


def test_a_composition_the_model_refuses_fails_its_own_request_and_no_other(fused):
    compositions = {"swapped": ak.Fuse("parallel", "houlsby", name="fz"),
                    "fused_in_stack": ak.Stack("lora", ak.Fuse("houlsby", "parallel", name="fz"))}
    expected = answer_of(fused, compositions["fused_in_stack"], PROMPTS[0])
    with live(fused, max_batch_size=32, compositions=compositions) as url:
        jobs = [(["houlsby", "lora", "parallel", "pfeiffer"][i % 4], PROMPTS[i % 4]) for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            swapped = pool.submit(ask, url, "swapped", PROMPTS[0])
            stacked = pool.submit(ask, url, "fused_in_stack", PROMPTS[0])
            good = list(pool.map(lambda job: ask(url, *job), jobs))
        assert swapped.result().status_code == 400
        assert "fusion 'fz' was made for" in swapped.result().json()["error"]["message"]
        assert stacked.result().json()["choices"][0]["text"] == expected
        assert [r.json()["choices"][0]["text"] for r in good] == [fused["answers"][job] for job in jobs]
        assert httpx.get(f"{url}/health").json()["queued"] == 0
        assert httpx.delete(f"{url}/v1/adapters/fz", headers=AUTH).status_code == 200  # nothing held it
