"""lm-evaluation-harness through the server, with its defaults: the `local-completions` backend sends
token-id prompts with `echo` and `logprobs`, reads the tokenizer from the server (no `tokenizer=`
argument, no hub) and drops the last returned token, taking it to be the generated one. Every
per-choice loglikelihood must equal the in-process class's, also when the token after a choice is
end-of-text (the base here is made to predict end-of-text often).

The tokenizer adds no BOS, as the default base's does not: lm-eval's `hf` backend lets a tokenizer
that adds one do so, while its API backends never add it unless given `add_bos_token=True`."""

import json

import httpx
import pytest
import torch

import adapterkit as ak
from adapterkit.serve import Server
from conftest import randomise
from test_lm_eval import ADAPTERS, TASK_TEMPLATE, TASKS, WORDS
from test_serve_isolation import serving
from test_serve_scoring import eos_leaning_llama

lm_eval = pytest.importorskip("lm_eval")
from adapterkit.integrations.lm_eval import AdapterkitLM, task_manager  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-lm-eval")
    model, tokenizer = eos_leaning_llama()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base, tokenizer = ak.load_base(root / "base")
    adapted = ak.AdapterModel(base)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        adapted.add_adapter(name, config)
        randomise(adapted, name, seed)
        with torch.no_grad():  # small changes: end-of-text stays likely after the choices
            for parameter in adapted.adapter_layers[name].parameters():
                parameter.mul_(0.2)
        adapted.save_adapter(name, root / "adapters" / name)
    german = [g for _, g in WORDS]
    items = [{"source": e, "target": g, "answer": i % 4,
              "choices": [german[(i + k - i % 4) % len(german)] for k in range(4)]} for i, (e, g) in enumerate(WORDS)]
    (root / "tasks").mkdir()
    (root / "tasks" / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (root / "tasks" / "tiny_choice.yaml").write_text(
        TASK_TEMPLATE.format(name="tiny_choice", data=root / "tasks" / "items.jsonl") + TASKS["tiny_choice"])
    server = Server(ak.AdapterModel(ak.load_base(root / "base")[0]), tokenizer, root / "adapters", "tiny-base")
    with serving(server) as url:
        yield {"url": url, "model": adapted, "tokenizer": tokenizer,
               "manager": task_manager(["tiny_choice"], root / "tasks"), "items": items}


def choice_scores(results: dict) -> list[float]:
    samples = sorted(results["samples"]["tiny_choice"], key=lambda sample: sample["doc_id"])
    return [float(response[0][0]) for sample in samples for response in sample["resps"]]


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_lm_evals_local_completions_scores_every_choice_as_the_in_process_class_does(served, adapter):
    through_server = lm_eval.simple_evaluate(
        model="local-completions", model_args=f"model={adapter},base_url={served['url']}/v1/completions",
        tasks=["tiny_choice"], task_manager=served["manager"], log_samples=True)
    in_process = lm_eval.simple_evaluate(model=AdapterkitLM(served["model"], served["tokenizer"], adapter),
                                         tasks=["tiny_choice"], task_manager=served["manager"], log_samples=True)
    assert choice_scores(through_server) == pytest.approx(choice_scores(in_process), abs=1e-4)
    assert through_server["results"]["tiny_choice"]["acc,none"] == in_process["results"]["tiny_choice"]["acc,none"]


def test_the_choices_are_often_followed_by_end_of_text_so_the_case_is_exercised(served):
    """lm-eval asks for one generated token after each choice; where it is end-of-text, the server
    must return it (before, the answer's last token was dropped instead)."""
    tokenizer, ended = served["tokenizer"], 0
    for item in served["items"]:
        for choice in item["choices"]:
            prompt = tokenizer.encode(f"English: {item['source']}\nGerman: {choice}")
            body = {"model": "lora", "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
            answer = httpx.post(f"{served['url']}/v1/completions", json=body, timeout=30).json()["choices"][0]
            assert len(answer["logprobs"]["tokens"]) == len(prompt) + 1  # the prompt's tokens, then the generated one
            ended += answer["finish_reason"] == "stop" and answer["logprobs"]["tokens"][-1] == "</s>"
    assert ended >= 8
