"""The training loss: the fused head + cross-entropy against the logits it avoids, and the models
whose logits are not their head's product."""

import contextlib
import weakref

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import adapterkit as ak
import adapterkit.loss
from adapterkit.data import collate, tokenize_all
from adapterkit.evaluate import completion_logits
from adapterkit.loss import SummedCrossEntropy, activations_recomputed, fusable, training_loss
from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_tokenizer
from test_train import EXAMPLES


def with_adapter(base, dropout: float = 0.0) -> ak.AdapterModel:
    model = ak.AdapterModel(base)
    torch.manual_seed(0)
    model.add_adapter("de", ak.BottleneckConfig(bottleneck_size=8, init="bert", dropout=dropout))
    model.train_adapter("de")
    return model


def a_batch() -> dict[str, torch.Tensor]:
    return collate(tokenize_all(EXAMPLES[:5], tiny_tokenizer(), 32), 0)


def loss_and_gradients(model, loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_of(model, a_batch())
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), gradients


def assert_same_within_1e_6(ours, theirs) -> None:
    (loss, gradients), (their_loss, their_gradients) = ours, theirs
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-6)
    assert gradients.keys() == their_gradients.keys()
    for name, gradient in their_gradients.items():
        assert gradient.abs().max() > 0
        torch.testing.assert_close(gradients[name], gradient, rtol=0, atol=1e-6)


def over_the_logits(model, batch) -> torch.Tensor:
    logits, targets = completion_logits(model, batch)
    return SummedCrossEntropy.apply(logits.float(), targets) / targets.numel()


def inputs_of(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("chunk_rows, part_rows", [(None, None), (8, 3)], ids=["whole", "chunks of 8, parts of 3"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_the_fused_head_and_loss_give_the_logits_paths_loss_and_gradients_within_1e_6(build, chunk_rows, part_rows,
                                                                                      monkeypatch):
    if chunk_rows:  # the batch's 33 completion tokens: 5 chunks, the last of 1 row, in parts of 3, 3 and 2
        monkeypatch.setattr(adapterkit.loss, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(adapterkit.loss, "PART_ELEMENTS", part_rows * VOCAB)
    model = with_adapter(build())
    head = model.get_output_embeddings()
    assert fusable(model, head, inputs_of(a_batch()))
    assert_same_within_1e_6(loss_and_gradients(model, training_loss), loss_and_gradients(model, over_the_logits))


def test_the_training_loss_and_its_gradients_equal_torchs_cross_entropy():
    def torchs(model, batch):
        logits, targets = completion_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits, targets)

    model = with_adapter(tiny_llama())
    assert_same_within_1e_6(loss_and_gradients(model, training_loss), loss_and_gradients(model, torchs))


def test_without_gradients_the_fused_loss_is_the_models_own():
    model = with_adapter(tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(training_loss(model, a_batch()), model(**a_batch()).loss, rtol=0, atol=1e-6)


def test_checking_the_head_leaves_the_dropout_masks_and_the_random_stream_of_a_plain_pass():
    model = with_adapter(tiny_llama(), dropout=0.1)
    model.train()
    torch.manual_seed(1)
    ours = training_loss(model, a_batch())  # the first call checks the head with a one-token pass
    after_ours = torch.rand(4)
    torch.manual_seed(1)
    theirs = model(**a_batch()).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(after_ours, torch.rand(4))


def test_a_model_that_soft_caps_its_logits_keeps_the_logits_path():
    torch.manual_seed(0)
    base = Gemma2ForCausalLM(Gemma2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=VOCAB, final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model = with_adapter(base)
    assert not fusable(model, base.lm_head, inputs_of(a_batch()))
    loss, gradients = loss_and_gradients(model, training_loss)
    their_loss, their_gradients = loss_and_gradients(model, lambda m, batch: m(**batch).loss)
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-6)
    for name, gradient in their_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-5, atol=1e-6)  # torch's sums, ordered otherwise


def test_an_adapter_put_on_the_head_after_the_check_is_seen_and_applied():
    model = with_adapter(tiny_llama(), dropout=0.1)
    model.train()
    training_loss(model, a_batch())  # checked and fused: nothing at the head yet
    config = ak.LoraConfig(r=2, target_modules=["lm_head"])
    model.add_adapter("head", config)
    torch.manual_seed(2)  # LoRA starts as no change: give it one
    changing = {key: torch.randn_like(value) for key, value in model.adapter_state_dict("head").items()}
    model.delete_adapter("head")
    model.add_adapter("head", config, changing)
    model.set_active(["de", "head"])
    torch.manual_seed(1)
    ours = training_loss(model, a_batch())
    after_ours = torch.rand(4)
    torch.manual_seed(1)
    theirs = model(**a_batch()).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(after_ours, torch.rand(4))  # the wasted fused pass drew no masks of its own
    assert not fusable(model, model.get_output_embeddings(), inputs_of(a_batch()))


def test_full_fine_tuning_trains_the_head_through_its_logits():
    model = tiny_gpt2()  # its head is tied to the trainable input embeddings; eval(): no dropout
    assert not fusable(model, model.get_output_embeddings(), inputs_of(a_batch()))
    loss, gradients = loss_and_gradients(model, training_loss)
    their_loss, their_gradients = loss_and_gradients(model, lambda m, batch: m(**batch).loss)
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(gradients["transformer.wte.weight"], their_gradients["transformer.wte.weight"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_swiglus_activation_is_recomputed_in_the_backward_pass_bit_for_bit(recompute):
    model = with_adapter(tiny_llama())
    outputs = []
    act = model.base.model.layers[0].mlp.act_fn
    act.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    with activations_recomputed() if recompute else contextlib.nullcontext():
        loss = model(**a_batch()).loss
    assert (outputs[0]() is None) == recompute  # only the gate and up are kept: silu(gate) is made again
    loss.backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    reference = with_adapter(tiny_llama())
    reference(**a_batch()).loss.backward()
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert torch.equal(gradients[name], p.grad), name
