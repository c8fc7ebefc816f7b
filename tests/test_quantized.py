"""Adapters over a base quantized by bitsandbytes (nf4, fp4, int8), as QLoRA trains them.

Every registered method (its first conformance row) trains over an nf4 and an int8 tiny base,
moves between quantized and float bases, and runs per row in a mixed batch. The tiny base is
wider than conftest's (64): bitsandbytes quantizes in blocks of 64 weights.
"""

from __future__ import annotations

import gc
import json
import warnings
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.errors import BaseMismatchError, ConfigError, MergeError
from adapterkit.io import base_fingerprint
from adapterkit.methods import registered_methods
from adapterkit.quantization import dense_weight, quantization_of
from conftest import VOCAB, batch, logits, randomise, rows_alone, tiny_tokenizer
from test_methods_conformance import add, first_row, one_thread  # noqa: F401  (one thread: the tiny tensors run faster)

pytest.importorskip("bitsandbytes")

QUANTIZED = ["nf4", "int8"]
METHODS = [pytest.param(method, id=method.name) for method in registered_methods() if first_row(method)]


def quantizable_llama(seed: int = 0) -> LlamaForCausalLM:
    """Two Llama blocks 64 wide with biases (non-zero, so a method that mishandles one shows it)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attention_bias=True, mlp_bias=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantizable-llama")
    quantizable_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def load(folder, quantize: str | None = None) -> torch.nn.Module:
    return ak.load_base(str(folder), quantize=quantize)[0]


def model_with(folder, method, quantize: str | None, seed: int = 0) -> tuple[ak.AdapterModel, object]:
    model = ak.AdapterModel(load(folder, quantize))
    return model, add(model, method, first_row(method), seed=seed)


def write_pairs(path, pairs: list[tuple[str, str]]):
    """A training JSONL of English -> German prompt/completion pairs; its path."""
    path.write_text("".join(json.dumps({"prompt": f"English: {e}\nGerman:", "completion": f" {g}"}) + "\n"
                            for e, g in pairs))
    return path


def training_loss(model: ak.AdapterModel, inputs: dict) -> torch.Tensor:
    return model(**inputs, labels=inputs["input_ids"]).loss


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_load_base_quantizes_the_block_layers_and_keeps_the_embeddings_and_head(base_folder, quantize):
    float_base, base = load(base_folder), load(base_folder, quantize)
    assert quantization_of(base) == quantize and quantization_of(float_base) is None
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear8bitLt" if quantize == "int8" else "Linear4bit")
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.get_memory_footprint() < float_base.get_memory_footprint()
    # the quantized layer computes with the weight dense_weight reads (int8: also rounds its input to 8 bits)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, dense_weight(q_proj), q_proj.bias)
        tolerance = 5e-2 if quantize == "int8" else 1e-5
        torch.testing.assert_close(q_proj(x), expected, rtol=0, atol=tolerance)
        dense = dense_weight(q_proj) - float_base.model.layers[0].self_attn.q_proj.weight
    assert 0 < dense.abs().max() < (0.02 if quantize == "int8" else 0.1)  # close to, not equal to, the float weight


def test_the_quantized_bases_footprint_falls_as_the_bits_do(base_folder):
    footprints = [load(base_folder, q).get_memory_footprint() for q in (None, "int8", "nf4")]
    assert footprints[0] > footprints[1] > footprints[2]


@pytest.mark.parametrize("quantize", QUANTIZED)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_over_a_quantized_base(base_folder, method, quantize):
    model, case = model_with(base_folder, method, quantize)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in case.layers.state_dict().items()}
    case.train()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = training_loss(model, batch(rows=2, length=8))
    loss.backward()
    grads = [p.grad for p in case.layers.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    after = case.layers.state_dict()
    assert any(not torch.equal(adapter_before[k], after[k]) for k in after)
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items())


@pytest.mark.parametrize("quantize", QUANTIZED)
@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_moves_between_a_quantized_and_the_float_base(base_folder, tmp_path, method, quantize):
    quantized, case = model_with(base_folder, method, quantize)
    for child in case.needs:
        quantized.save_adapter(child, tmp_path / child)
    quantized.save_adapter(case.run, tmp_path / "subject")
    float_model = ak.AdapterModel(load(base_folder))
    with pytest.warns(UserWarning, match=f"trained over an? {quantize} copy of this base and runs here over the "
                                         "full-precision one"):
        for child in case.needs:
            float_model.load_adapter(tmp_path / child)
        float_model.load_adapter(tmp_path / "subject")
    saved = case.layers.state_dict()
    loaded = float_model.adapter_layers[case.name].state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    float_model.save_adapter(case.run, tmp_path / "back")  # and back over another quantized copy
    other = ak.AdapterModel(load(base_folder, "nf4"))
    for child in case.needs:
        other.load_adapter(tmp_path / child)
    with pytest.warns(UserWarning, match="over the full-precision copy of this base and runs here over an nf4 one"):
        other.load_adapter(tmp_path / "back")


@pytest.mark.parametrize("quantize", QUANTIZED)
def test_mixed_batch_rows_equal_each_row_alone_over_a_quantized_base(base_folder, quantize):
    model = ak.AdapterModel(load(base_folder, quantize))
    names = []
    for seed, method in enumerate(m.values[0] for m in METHODS):
        case = add(model, method, first_row(method), name=method.name, seed=seed)
        names.append(case.run)
    names += [ak.Stack("lora", "bottleneck"), None]
    inputs = batch(seed=4, rows=len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, rows_alone(model, inputs, names), rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[-1])


def test_a_training_step_after_an_evaluation_gets_the_same_gradients(base_folder):
    """bitsandbytes' CPU inference kernel has no backward: evaluating must not switch the base to it."""
    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = ak.AdapterModel(load(base_folder, "nf4"))
        torch.manual_seed(1)
        model.add_adapter("bn", ak.BottleneckConfig(bottleneck_size=8, init="bert", dropout=0.0))
        model.train_adapter("bn")
        if evaluate_first:
            model.eval()
            logits(model)
        model.train()
        training_loss(model, batch(rows=2, length=8)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_evaluation = gradients(False), gradients(True)
    assert all(torch.equal(plain[k], after_evaluation[k]) for k in plain)


def test_an_int8_base_trains_with_bitsandbytes_numbers_but_keeps_no_layer_input_for_backward(base_folder):
    """bitsandbytes' int8 training forward keeps each layer's input for a backward pass that the
    frozen weight does not need; ours does the same arithmetic and keeps nothing."""
    def run(bitsandbytes_forward: bool) -> tuple[bool, dict[str, torch.Tensor]]:
        model = ak.AdapterModel(load(base_folder, "int8"))
        if bitsandbytes_forward:
            for module in model.modules():
                if "forward" in vars(module):
                    del module.forward
        torch.manual_seed(1)
        model.add_adapter("bn", ak.BottleneckConfig(bottleneck_size=8, init="bert", dropout=0.0))
        model.train_adapter("bn")
        model.train()
        down_proj = model.base.model.layers[-1].mlp.down_proj
        seen = []
        down_proj.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0])))
        loss = training_loss(model, batch(rows=2, length=8))
        gc.collect()
        kept = seen[0]() is not None
        loss.backward()
        return kept, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (ours_kept, ours), (theirs_kept, theirs) = run(False), run(True)
    assert theirs_kept and not ours_kept
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(gradient.abs().sum() > 0 for gradient in ours.values())


@pytest.mark.parametrize("quantize", QUANTIZED)
def test_gradient_checkpointing_gives_the_same_gradients_over_a_quantized_base(base_folder, quantize):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = ak.AdapterModel(load(base_folder, quantize))
        torch.manual_seed(1)
        model.add_adapter("lora", ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        model.add_adapter("bn", ak.BottleneckConfig(bottleneck_size=8, init="bert"))
        model.set_active(["lora", "bn"])
        model.train_adapter("lora")
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(2)
        training_loss(model, batch(rows=2, length=8)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert plain["adapter_layers.lora.model-layers-0-self_attn-q_proj.lora_B"].abs().sum() > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)


def test_merging_into_a_quantized_base_is_refused_and_changes_nothing(base_folder):
    model = ak.AdapterModel(load(base_folder, "nf4"))
    model.add_adapter("lora", ak.LoraConfig(r=4))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    with pytest.raises(MergeError, match=r"quantized \(nf4\).*Merge over the full-precision base"):
        model.merge("lora")
    with pytest.raises(MergeError, match="quantized"):
        model.merge_and_unload("lora")
    assert model.merged is None
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())


def test_an_adapter_for_another_base_is_refused_over_a_quantized_one(base_folder, tmp_path):
    other_folder = tmp_path / "other-base"
    quantizable_llama(seed=1).save_pretrained(other_folder)
    tiny_tokenizer().save_pretrained(other_folder)
    other = ak.AdapterModel(load(other_folder, "nf4"))
    other.add_adapter("lora", ak.LoraConfig(r=4))
    other.save_adapter("lora", tmp_path / "lora")
    for quantize in (None, "int8"):
        model = ak.AdapterModel(load(base_folder, quantize))
        with pytest.raises(BaseMismatchError, match="the weights differ; it was trained over a nf4-quantized base"):
            model.load_adapter(tmp_path / "lora")
        assert model.adapters == {}


def test_a_quantized_base_records_the_float_weights_it_was_made_from(base_folder):
    float_print = base_fingerprint(load(base_folder))
    for quantize in ("nf4", "fp4", "int8"):
        quantized_print = base_fingerprint(load(base_folder, quantize))
        assert quantized_print.pop("quantized") == quantize
        assert quantized_print == float_print
    assert "quantized" not in float_print


def test_the_same_kind_of_quantization_loads_without_a_warning(base_folder, tmp_path):
    model = ak.AdapterModel(load(base_folder, "nf4"))
    model.add_adapter("lora", ak.LoraConfig(r=4))
    model.save_adapter("lora", tmp_path / "lora")
    again = ak.AdapterModel(load(base_folder, "nf4"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again.load_adapter(tmp_path / "lora")


def test_bad_quantization_options_are_clear_errors(base_folder, monkeypatch):
    with pytest.raises(ConfigError, match="quantize must be one of nf4, fp4, int8"):
        ak.load_base(str(base_folder), quantize="int4")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'adapterkit\["):
        ak.load_base(str(base_folder), quantize="nf4")


@pytest.fixture(scope="module")
def peft_qlora(base_folder, tmp_path_factory):
    """A LoRA that peft trained over transformers' nf4 copy of the base (two AdamW steps from
    random B), saved as peft saves it, with peft's logits for one batch."""
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(base_folder, quantization_config=quantization, device_map="cpu")
    for module in base.modules():  # the same bitsandbytes kernel as ours (see below), on any CPU
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for seed in range(2):
        inputs = batch(seed=seed, rows=2, length=8)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("peft-qlora")
    model.save_pretrained(folder)
    inputs = batch(seed=9, rows=3, length=10)
    return folder, inputs, logits(model, inputs)


def test_a_peft_qlora_adapter_gives_peft_logits_over_our_nf4_base(base_folder, peft_qlora):
    """Both run bitsandbytes' dequantize-then-matmul on the same nf4 weights and add the same
    low-rank product: they differ only by the order of float32 additions (1e-5). peft's layers
    are kept off bitsandbytes' AVX512-bf16 inference kernel, which ours never uses (it has no
    backward, see adapterkit.quantization): that kernel rounds activations to bf16 (1e-2 apart)."""
    folder, inputs, expected = peft_qlora
    model = ak.AdapterModel(load(base_folder, "nf4"))
    name = model.load_adapter(folder, name="qlora")
    model.set_active(name)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-5)
    model.set_active(None)
    assert not torch.allclose(logits(model, inputs), expected, atol=1e-3)  # the adapter is what makes them equal


def test_the_cli_trains_evaluates_and_generates_over_a_quantized_base(base_folder, tmp_path, capsys):
    data = write_pairs(tmp_path / "de.jsonl", [("cat", "Katze"), ("dog", "Hund"), ("house", "Haus")])
    out = tmp_path / "run"
    assert main(["train", "--train", str(data), "-o", str(out), "--base", str(base_folder), "--quantize", "nf4",
                 "--method", "lora", "--r", "4", "--steps", "2", "--batch-size", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base"]["quantized"] == "nf4"
    assert main(["info", str(out / "adapter")]) == 0
    assert "(trained over its nf4 copy)" in capsys.readouterr().out
    for quantize in (["--quantize", "int8"], []):
        with pytest.warns(UserWarning, match="trained over an nf4 copy"):
            assert main(["eval", str(data), "--adapter", str(out / "adapter"), "--base", str(base_folder),
                         *quantize, "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", "cat", "--adapter", str(out / "adapter"), "--base", str(base_folder),
                 "--quantize", "nf4", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "> cat"


def test_the_cli_refuses_a_quantization_it_cannot_run_before_writing_anything(base_folder, tmp_path, capsys):
    data = write_pairs(tmp_path / "de.jsonl", [("cat", "Katze")])
    out = tmp_path / "run"
    common = ["train", "--train", str(data), "-o", str(out), "--base", str(base_folder)]
    assert main([*common, "--quantize", "nf4", "--fsdp"]) == 2
    assert "--fsdp cannot shard a --quantize nf4 base" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices
        main([*common, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert not out.exists()


def test_the_server_answers_over_a_quantized_base_as_the_model_does(base_folder, tmp_path):
    from fastapi.testclient import TestClient

    from adapterkit.serve import Server, create_app

    adapters = tmp_path / "adapters"
    trained = ak.AdapterModel(load(base_folder, "nf4"))
    torch.manual_seed(0)
    trained.add_adapter("de", ak.LoraConfig(r=4))
    randomise(trained, "de", seed=1)
    trained.save_adapter("de", adapters / "de")
    model = ak.AdapterModel(load(base_folder, "nf4"))
    server = Server(model, tiny_tokenizer(), adapters, "tiny-nf4")
    with TestClient(create_app(server)) as client:
        answer = client.post("/v1/completions", json={"model": "de", "prompt": "cat", "max_tokens": 6,
                                                      "temperature": 0})
    assert answer.status_code == 200, answer.text
    trained.set_active("de")
    tokenizer = tiny_tokenizer()
    prompt = tokenizer("cat", return_tensors="pt")
    with torch.no_grad():
        ids = trained.generate(**prompt, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected and answer.json()["choices"][0]["text"] == expected


def test_two_ranks_over_an_nf4_base_train_the_adapter_one_process_trains(base_folder, tmp_path):
    """DDP all-reduces the adapter's gradients only; the frozen nf4 weights are never synchronised.
    The two ranks' halves of the batch sum in another order than one process's batch: 1e-6."""
    from test_distributed import torchrun

    data = write_pairs(tmp_path / "de.jsonl", [("cat", "Katze"), ("dog", "Hund"), ("house", "Haus"), ("tree", "Baum")])
    argv = ["train", "--train", str(data), "--base", str(base_folder), "--quantize", "nf4", "--method", "lora",
            "--steps", "3", "--batch-size", "4", "--no-progress", "--set", "dropout=0.0", "--set", "r=4"]
    assert main([*argv, "-o", str(tmp_path / "one")]) == 0
    process = torchrun(["-m", "adapterkit", *argv, "-o", str(tmp_path / "two")], cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-2000:]
    one, two = (ak.AdapterModel(load(base_folder, "nf4")) for _ in range(2))
    one.load_adapter(tmp_path / "one" / "adapter", name="de")
    two.load_adapter(tmp_path / "two" / "adapter", name="de")
    first, second = one.adapter_state_dict("de"), two.adapter_state_dict("de")
    assert any(t.abs().sum() > 0 for k, t in first.items() if "lora_B" in k)
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6)


def test_adapter_trainer_trains_over_an_nf4_base_with_default_arguments(base_folder, tmp_path):
    """The HF Trainer refuses a "purely quantized" model; an AdapterModel with an adapter is not one."""
    from transformers import TrainingArguments

    from adapterkit.integrations.hf import AdapterTrainer
    from test_hf_trainer import rows_and_collator

    model = ak.AdapterModel(load(base_folder, "nf4"))
    model.add_adapter("de", ak.LoraConfig(r=4))
    model.train_adapter("de")
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, report_to=[], use_cpu=True)
    AdapterTrainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    saved = sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir() if "safetensors" in p.name)
    assert saved == ["adapter_model.safetensors"]
    assert any(t.abs().sum() > 0 for k, t in model.adapter_state_dict("de").items() if "lora_B" in k)
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items())


def test_lm_evals_model_arguments_score_an_adapter_over_the_quantized_base_it_trained_on(base_folder, tmp_path):
    """``quantize=`` in lm-eval's model arguments gives the same scores as the model built in
    Python over that quantized base, and other scores than over the float base."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from adapterkit.integrations.lm_eval import AdapterkitLM

    trained = ak.AdapterModel(load(base_folder, "nf4"))
    torch.manual_seed(0)
    trained.add_adapter("de", ak.LoraConfig(r=4))
    randomise(trained, "de", seed=1)
    trained.save_adapter("de", tmp_path / "de")
    pairs = [("English: cat\nGerman:", " Katze"), ("English: dog\nGerman:", " Hund")]

    def scores(lm: AdapterkitLM) -> list[tuple[float, bool]]:
        return lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0)
                                 for pair in pairs])

    loaded = AdapterkitLM.create_from_arg_string(f"base={base_folder},adapters={tmp_path / 'de'},quantize=nf4")
    assert quantization_of(loaded.model.base) == "nf4" and loaded.adapter == "de"
    assert scores(loaded) == scores(AdapterkitLM(trained, tiny_tokenizer(), "de"))
    over_float = scores(AdapterkitLM.create_from_arg_string(f"base={base_folder},adapters={tmp_path / 'de'}"))
    assert all(abs(a - b) > 1e-4 for (a, _), (b, _) in zip(scores(loaded), over_float))


def test_trls_sft_trainer_trains_over_an_nf4_base_and_checkpoints_the_adapter_alone(base_folder, tmp_path,
                                                                                   monkeypatch):
    """QLoRA as peft users run it with TRL: the nf4 base stays as it was, the adapter trains, and
    the saved adapter loads over a fresh nf4 base with the trained weights."""
    pytest.importorskip("trl")
    import huggingface_hub

    from test_trl import sft_trainer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    model = ak.AdapterModel(load(base_folder, "nf4"))
    torch.manual_seed(0)
    model.add_adapter("de", ak.LoraConfig(r=4))
    model.train_adapter("de")
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    trainer = sft_trainer(tmp_path, model)
    trainer.train()
    trainer.save_model()
    trained = model.adapter_state_dict("de")
    assert all(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "run").glob("*.safetensors")) == ["adapter_model.safetensors"]
    loaded = ak.AdapterModel(load(base_folder, "nf4"))
    loaded.load_adapter(tmp_path / "run")
    assert all(torch.equal(trained[k], v) for k, v in loaded.adapter_state_dict("de").items())
