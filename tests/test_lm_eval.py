"""lm-evaluation-harness over adapterkit, offline: a tiny Llama saved to a folder, a character-level
tokenizer that adds BOS, and local task YAML files over JSONL data."""

import json
import sys

import pytest
import torch
from tokenizers import processors

import adapterkit as ak
from adapterkit.cli import main
from conftest import TOKENIZER_CHARS, randomise, tiny_llama, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from adapterkit.integrations.lm_eval import AdapterkitLM, evaluate_adapters, task_manager  # noqa: E402

ADAPTERS = {
    "lora": ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "houlsby": ak.BottleneckConfig(bottleneck_size=8),
}
WORDS = [("cat", "Katze"), ("dog", "Hund"), ("house", "Haus"), ("tree", "Baum"), ("sun", "Sonne"), ("moon", "Mond"),
         ("water", "Wasser"), ("bread", "Brot"), ("apple", "Apfel"), ("night", "Nacht"), ("day", "Tag"),
         ("city", "Stadt")]
PAIRS = [("English: cat\nGerman:", " Katze"), ("Hello ", "world"), ("", "abc"), ("x", " y z"), ("The end.", "\n")]
TEXTS = ["a short text", "A longer text, with punctuation; and digits 123 " * 3]
TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "English: {{{{source}}}}\\nGerman:"
"""
TASKS = {
    "tiny_choice": "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer\n"
                   "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    "tiny_answer": "output_type: generate_until\ndoc_to_target: target\n"
                   "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
}


def bos_tokenizer():
    """The tests' character-level tokenizer, made to start every encoding with <s> as Llama's do."""
    tokenizer = tiny_tokenizer()
    bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.backend_tokenizer.post_processor = bos
    return tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The saved base, each adapter saved, and a task folder: a 4-way multiple-choice task and a
    short-answer task over the same 12 words."""
    root = tmp_path_factory.mktemp("lm-eval")
    base_dir, tasks_dir = root / "tiny-base", root / "tasks"
    tiny_llama().save_pretrained(base_dir)
    bos_tokenizer().save_pretrained(base_dir)
    base, tokenizer = ak.load_base(base_dir)
    model = ak.AdapterModel(base)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model.add_adapter(name, config)
        randomise(model, name, seed)
        model.save_adapter(name, root / "adapters" / name)
    tasks_dir.mkdir()
    german = [g for _, g in WORDS]
    items = [{"source": e, "target": g, "answer": i % 4,
              "choices": [german[(i + k - i % 4) % len(german)] for k in range(4)]} for i, (e, g) in enumerate(WORDS)]
    (tasks_dir / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    for name, body in TASKS.items():
        (tasks_dir / f"{name}.yaml").write_text(TASK_TEMPLATE.format(name=name, data=tasks_dir / "items.jsonl") + body)
    return {"base_dir": base_dir, "tasks_dir": tasks_dir, "adapters_dir": root / "adapters", "model": model,
            "tokenizer": tokenizer, "manager": task_manager(list(TASKS), tasks_dir)}


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def greedy_pairs(model, tokenizer, contexts: list[str], tokens: int = 3) -> list[tuple[str, str]]:
    """(context, its greedy continuation) from HF's generate on the bare base, for the contexts
    whose greedy tokens are all characters (the tiny vocabulary has ids that decode to nothing)."""
    pairs = []
    for context in contexts:
        ids = torch.tensor([tokenizer.encode(context)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False)
        continuation = out[0, ids.shape[1] :].tolist()
        if len(continuation) == tokens and all(4 <= i < 4 + len(TOKENIZER_CHARS) for i in continuation):
            pairs.append((context, tokenizer.decode(continuation)))
    return pairs


def hflm(world, model=None) -> HFLM:
    if model is None:
        return HFLM(pretrained=str(world["base_dir"]), batch_size=4, device="cpu")
    return HFLM(pretrained=model, tokenizer=world["tokenizer"], batch_size=4, device="cpu")


def test_loglikelihoods_and_greedy_flags_equal_hflms_on_the_same_base(world):
    model, tokenizer = world["model"], world["tokenizer"]
    with model.disabled():
        greedy = greedy_pairs(model.base, tokenizer, [f"English: {e}\nGerman:" for e, _ in WORDS])
    assert len(greedy) >= 3
    pairs = PAIRS + greedy
    ours = AdapterkitLM(model, tokenizer, batch_size=3).loglikelihood(requests("loglikelihood", pairs))
    theirs = hflm(world).loglikelihood(requests("loglikelihood", pairs))
    assert [flag for _, flag in ours] == [flag for _, flag in theirs]
    assert [flag for _, flag in ours] == [False] * len(PAIRS) + [True] * len(greedy)
    assert [value for value, _ in ours] == pytest.approx([value for value, _ in theirs], abs=1e-4)


def test_an_adapters_loglikelihoods_equal_hflms_over_the_model_with_that_adapter_active(world):
    model, tokenizer = world["model"], world["tokenizer"]
    ours = AdapterkitLM(model, tokenizer, "lora", batch_size=3).loglikelihood(requests("loglikelihood", PAIRS))
    model.set_active("lora")
    try:
        theirs = hflm(world, model.base).loglikelihood(requests("loglikelihood", PAIRS))
    finally:
        model.set_active(None)
    bare = AdapterkitLM(model, tokenizer).loglikelihood(requests("loglikelihood", PAIRS))
    assert [value for value, _ in ours] == pytest.approx([value for value, _ in theirs], abs=1e-4)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(ours, bare, strict=True))


def test_rolling_loglikelihoods_equal_hflms_for_texts_that_fit_the_context(world):
    texts = requests("loglikelihood_rolling", [(text,) for text in TEXTS])
    ours = AdapterkitLM(world["model"], world["tokenizer"]).loglikelihood_rolling(texts)
    short = hflm(world).loglikelihood_rolling(texts[:1])
    assert ours[0] == pytest.approx(short[0], abs=1e-4)
    assert ours[1] < ours[0] < 0  # the long text spans several windows of the 64-token context


def test_generated_answers_equal_hflms_and_stop_at_the_until_strings(world):
    options = {"until": ["\n", "e"], "max_gen_toks": 8, "do_sample": False}
    asks = requests("generate_until", [(f"English: {e}\nGerman:", dict(options)) for e, _ in WORDS[:6]])
    ours = AdapterkitLM(world["model"], world["tokenizer"], batch_size=4).generate_until(asks)
    theirs = hflm(world).generate_until(asks)
    assert ours == theirs
    assert all("e" not in answer and "\n" not in answer and len(answer) <= 8 for answer in ours)


def samples(results: dict, task: str) -> list:
    """Each document's responses, in document order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def choice_scores(results: dict) -> tuple[list[float], list[bool]]:
    """Every per-choice loglikelihood of the multiple-choice task, and its greedy flag."""
    scored = [choice[0] for doc in samples(results, "tiny_choice") for choice in doc]
    return [value for value, _ in scored], [flag for _, flag in scored]


@pytest.fixture(scope="module")
def together(world):
    """evaluate_adapters over the bare base and both adapters on both tasks, and how many forward
    passes it made."""
    forwards = []
    counter = world["model"].base.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        results = evaluate_adapters(world["model"], world["tokenizer"], [None, *ADAPTERS], list(TASKS), batch_size=64,
                                    task_manager=world["manager"])
    finally:
        counter.remove()
    return results, len(forwards)


def test_several_adapters_in_one_pass_score_as_separate_runs_in_fewer_forward_passes(world, together):
    model, tokenizer = world["model"], world["tokenizer"]
    together, shared_forwards = together
    forwards = []
    counter = model.base.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        alone = {(name or "base"): lm_eval.simple_evaluate(model=AdapterkitLM(model, tokenizer, name, batch_size=64),
                                                          tasks=list(TASKS), task_manager=world["manager"])
                 for name in [None, *ADAPTERS]}
    finally:
        counter.remove()
    assert list(together) == ["base", *ADAPTERS]
    for label, results in together.items():
        assert results["results"] == alone[label]["results"]
        values, flags = choice_scores(results)
        assert flags == choice_scores(alone[label])[1]
        # rows batched with other adapters' rows are summed in another order: equal to float rounding
        assert values == pytest.approx(choice_scores(alone[label])[0], abs=1e-5)
        assert samples(results, "tiny_answer") == samples(alone[label], "tiny_answer")
    assert len({str(choice_scores(results)[0]) for results in together.values()}) == 3  # each scores its own way
    assert shared_forwards < len(forwards) / 2


def test_lm_eval_builds_the_model_from_its_string_arguments(world):
    adapters = world["adapters_dir"]
    loaded = f"base={world['base_dir']},adapters=lora:{adapters / 'lora'}|{adapters / 'houlsby'}"
    by_name = lm_eval.simple_evaluate(model="adapterkit", model_args=f"{loaded},adapter=houlsby,batch_size=8",
                                      tasks=["tiny_choice"], task_manager=world["manager"])
    direct = lm_eval.simple_evaluate(model=AdapterkitLM(world["model"], world["tokenizer"], "houlsby", batch_size=8),
                                     tasks=["tiny_choice"], task_manager=world["manager"])
    assert samples(by_name, "tiny_choice") == samples(direct, "tiny_choice")  # the same batches: the same floats
    assert by_name["config"]["adapter"] == "houlsby"
    with pytest.raises(ak.ConfigError, match=r"adapters= loaded lora, houlsby; say which one runs with adapter=NAME"):
        AdapterkitLM.create_from_arg_string(loaded)


def test_lm_evals_own_command_line_runs_the_model_through_our_module(world, together, tmp_path, monkeypatch):
    from adapterkit.integrations.lm_eval import main as lm_eval_main

    argv = ["lm-eval", "run", "--model", "adapterkit", "--model_args", f"base={world['base_dir']}",
            f"adapters={world['adapters_dir'] / 'lora'}", "--device", "cpu", "--batch_size", "64",
            "--tasks", "tiny_choice", "--include_path", str(world["tasks_dir"]),
            "--output_path", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)  # what `python -m adapterkit.integrations.lm_eval run ...` runs
    lm_eval_main()
    written = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert written["config"]["adapter"] == "lora"
    assert written["results"]["tiny_choice"]["acc,none"] == together[0]["lora"]["results"]["tiny_choice"]["acc,none"]


def test_unsupported_generation_options_and_unknown_tasks_are_refused_with_the_fix(world):
    lm = AdapterkitLM(world["model"], world["tokenizer"])
    with pytest.raises(ak.ConfigError, match=r"generation options \['top_k'\] are not supported"):
        lm.generate_until(requests("generate_until", [("x", {"until": ["\n"], "top_k": 5})]))
    with pytest.raises(ak.ConfigError, match="no lm-eval task named 'nope' in .* nor among lm-eval's own"):
        task_manager(["tiny_choice", "nope"], world["tasks_dir"])
    with pytest.raises(ak.ConfigError, match="batch_size must be a positive number of rows or 'auto', got 0"):
        AdapterkitLM(world["model"], world["tokenizer"], batch_size=0)
    with pytest.raises(ak.AdapterNameError, match="no adapter or composition named 'de'; this model has: lora, hou"):
        AdapterkitLM(world["model"], world["tokenizer"], "de")


def test_the_eval_command_runs_harness_tasks_over_the_base_and_each_adapter(world, together, tmp_path, capsys):
    out = tmp_path / "results.json"
    adapters = [a for name in ADAPTERS for a in ("--adapter", str(world["adapters_dir"] / name))]
    code = main(["eval", "--harness", "tiny_choice,tiny_answer", "--include-path", str(world["tasks_dir"]), *adapters,
                 "--base", str(world["base_dir"]), "--batch-size", "64", "-o", str(out)])
    assert code == 0
    table = capsys.readouterr().out.splitlines()
    written = json.loads(out.read_text())
    assert list(written) == ["base", *ADAPTERS]
    assert table[0].split() == ["task", "metric", "base", *ADAPTERS]
    for line, (task, metric) in zip(table[2:], [("tiny_choice", "acc"), ("tiny_answer", "exact_match")], strict=True):
        expected = [f"{together[0][label]['results'][task][metric + ',none']:.4f}" for label in written]
        assert line.split() == [task, metric, *expected]
    for label, results in written.items():
        assert results["results"] == together[0][label]["results"]
        assert "samples" not in results


def test_the_harness_option_without_lm_eval_names_the_pip_command(monkeypatch, world, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an import sees when the package is not installed
    assert main(["eval", "--harness", "tiny_choice", "--base", str(world["base_dir"])]) == 2
    err = capsys.readouterr().err
    assert err == "adapterkit: error: lm-eval tasks need the lm-eval package: pip install 'adapterkit[eval]'\n"


def test_eval_needs_a_jsonl_file_or_harness_tasks(capsys):
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert err == "adapterkit: error: give a JSONL file to score, or --harness TASKS to run lm-eval tasks\n"


def test_harness_tasks_refuse_num_beams_before_the_base_loads(tmp_path, capsys):
    command = ["eval", "--harness", "tiny_choice", "--num-beams", "2", "--base", str(tmp_path / "no-such-base")]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err == ("adapterkit: error: --num-beams applies to JSONL scoring; lm-eval's tasks set their own generation "
                   "options\n")
