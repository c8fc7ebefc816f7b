"""Tiny random models built from configs: offline, seconds each."""

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB = 97


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


def make_base(arch: str):
    return BUILDERS[arch]()


def batch(seed: int = 0, rows: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or batch())).logits


TOKENIZER_CHARS = string.ascii_letters + string.digits + " \n.,:;!?'\"()%{}-_"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids fit the tiny models' vocabulary (pad 0, bos 1, eos 2)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({char: 4 + i for i, char in enumerate(TOKENIZER_CHARS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return tokenizer


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The tiny Llama and its tokenizer saved as a local model folder (what --base and
    $ADAPTERKIT_BASE take)."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def train_steps(model, inputs, steps: int, lr: float) -> list[float]:
    """Plain AdamW steps on the model's trainable parameters, language-modelling ``inputs``; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def rows_alone(model, inputs: dict, names: list) -> torch.Tensor:
    """Each row run on its own with its adapter or composition active (None or "base": the bare
    base): what a mixed batch's rows must equal."""
    rows = []
    for row, name in enumerate(names):
        model.set_active(None if name in (None, "base") else name)
        rows.append(logits(model, {k: v[row : row + 1] for k, v in inputs.items()}))
    model.set_active(None)
    return torch.cat(rows)


def randomise(model, name: str, seed: int) -> None:
    """Strong random weights for adapter ``name``, so that each adapter answers differently."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def biased_base(arch: str):
    """The tiny base with non-zero biases, the same on every call (the builders start them at
    zero, which would hide a mistake in an adapter's handling of the bias)."""
    base = make_base(arch)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name.endswith("bias"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return base
