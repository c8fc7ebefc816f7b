"""The bottleneck's training path keeps less for the backward pass than autograd would and folds
the LayerNorm into the down-projection: without a LayerNorm its outputs must be autograd's bit for
bit, with one (reordered sums) within 1e-6; its gradients autograd's to 1e-6 either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.methods.bottleneck import ACTIVATIONS, BottleneckAdapter
from conftest import batch, tiny_llama


def autograds_delta(adapter: BottleneckAdapter, h: torch.Tensor, activation: str, dropout: float) -> torch.Tensor:
    """The lesson's layer written with torch's functions, as autograd differentiates them."""
    if adapter.ln_weight is not None:
        h = F.layer_norm(h, h.shape[-1:], adapter.ln_weight, adapter.ln_bias)
    h = ACTIVATIONS[activation](F.linear(h, adapter.down_weight, adapter.down_bias))
    if dropout:
        h = F.dropout(h, dropout)
    return F.linear(h, adapter.up_weight, adapter.up_bias)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "tanh"])
@pytest.mark.parametrize("layer_norm, dropout", [(True, 0.1), (False, 0.0), (True, 0.0)])
@pytest.mark.parametrize("input_needs_grad, adapter_trains", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("offset", [0.0, 4.0])  # the folded LayerNorm subtracts the mean's share after the product
def test_the_training_path_gives_autograds_outputs_and_gradients(activation, layer_norm, dropout, input_needs_grad,
                                                                 adapter_trains, offset):
    config = ak.BottleneckConfig(bottleneck_size=8, activation=activation, layer_norm=layer_norm, dropout=dropout,
                                 init="bert")
    adapter = BottleneckAdapter(32, 32, config).train()
    with torch.no_grad():
        if layer_norm:
            adapter.ln_weight.normal_(1.0, 0.1)
            adapter.ln_bias.normal_(0.0, 0.1)
        adapter.up_bias.normal_(0.0, 0.1)
    adapter.requires_grad_(adapter_trains)
    torch.manual_seed(0)
    h = torch.randn(3, 5, 32) + offset
    upstream = torch.randn(3, 5, 32)

    def run(delta) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        x = h.clone().requires_grad_(input_needs_grad)
        torch.manual_seed(1)  # the same dropout mask for both
        out = delta(x)
        (out * upstream).sum().backward()
        grads = [x.grad] + [p.grad for p in adapter.parameters()]
        adapter.zero_grad(set_to_none=True)
        return out.detach(), grads

    ours, our_grads = run(adapter.delta)
    theirs, their_grads = run(lambda x: autograds_delta(adapter, x, activation, dropout))
    if layer_norm:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    else:
        assert torch.equal(ours, theirs)
    assert [g is None for g in our_grads] == [g is None for g in their_grads]
    for our, their in zip(our_grads, their_grads):
        if their is not None:
            assert their.abs().sum() > 0
            torch.testing.assert_close(our, their, rtol=0, atol=1e-6)


def test_a_houlsby_adapter_trains_as_before_through_a_whole_model():
    """Two steps through a two-block model: the adapter's gradients match autograd's to 1e-6."""
    def gradients(plain_autograd: bool) -> dict[str, torch.Tensor]:
        model = ak.AdapterModel(tiny_llama())
        torch.manual_seed(0)
        model.add_adapter("bn", ak.BottleneckConfig(bottleneck_size=8, init="bert"))
        model.train_adapter("bn")
        model.train()
        if plain_autograd:
            for module in model.modules():
                if isinstance(module, BottleneckAdapter):
                    module.delta = lambda h, m=module: autograds_delta(m, h, m.activation_name,
                                                                       m.dropout if m.training else 0.0)
        torch.manual_seed(2)
        inputs = batch(rows=2, length=8)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ours, theirs = gradients(False), gradients(True)
    assert ours.keys() == theirs.keys()
    for name, gradient in theirs.items():
        torch.testing.assert_close(ours[name], gradient, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset, spike", [(0.0, 300.0), (50.0, 0.0)])
def test_the_folded_layer_norm_stays_within_1e_6_of_autograd_on_wide_ranging_inputs(offset, spike):
    """A site's input can hold one feature hundreds of times larger than the rest (as language models'
    residual streams do) or a mean far from zero: the folded product subtracts the mean's share after
    it, so its error is measured against the result's size."""
    config = ak.BottleneckConfig(bottleneck_size=16, init="bert")
    adapter = BottleneckAdapter(64, 64, config).train()
    with torch.no_grad():
        adapter.ln_weight.normal_(1.0, 0.1)
        adapter.ln_bias.normal_(0.0, 0.1)
    torch.manual_seed(0)
    h = torch.randn(4, 16, 64) * 3 + offset
    h[..., 5] += spike
    upstream = torch.randn(4, 16, 64)

    def run(delta) -> list[torch.Tensor]:
        x = h.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = delta(x)
        (out * upstream).sum().backward()
        results = [out.detach(), x.grad] + [p.grad for p in adapter.parameters()]
        adapter.zero_grad(set_to_none=True)
        return results

    ours = run(adapter.delta)
    theirs = run(lambda x: autograds_delta(adapter, x, "gelu", 0.1))
    for our, their in zip(ours, theirs):
        torch.testing.assert_close(our, their, rtol=0, atol=1e-6 * their.abs().max().item())
