"""Mixed-adapter batches over the default base: a batch spread over 8 adapters vs the same batch on one.

Every variant runs once per round, rounds repeat (A B C ... A B C ...), so drift in machine speed
hits all alike; prints the median of each and its ratio to the single-adapter batch. For LoRA it
also runs peft's own mixed batch (``adapter_names=``) with the same weights on the same batch.

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/mixed.py [--repeats 5] [--batch 32] [--length 64]
"""

import argparse
import random

import torch

import adapterkit as ak
from harness import median, print_table, time_interleaved

ADAPTERS = 8


def randomise(model: ak.AdapterModel, name: str, seed: int) -> None:
    """Trained-looking weights (a new LoRA adapter is exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def peft_twin(model: ak.AdapterModel, names: list[str], config: ak.LoraConfig):
    """The same LoRA adapters as a peft model over a second copy of the base."""
    from peft import LoraConfig, get_peft_model

    base, _ = ak.load_base()
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules,
                             lora_dropout=0.0)
    twin = get_peft_model(base, peft_config, adapter_name=names[0])
    for name in names[1:]:
        twin.add_adapter(name, peft_config)
    for name in names:
        modules = dict(twin.named_modules())
        for key, tensor in model.adapter_state_dict(name).items():
            module_name, _, param = key.rpartition(".adapter.")
            layer = modules["base_model.model." + module_name]
            getattr(layer, param)[name].weight.data.copy_(tensor)
    return twin.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--no-peft", action="store_true", help="skip the peft comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base, _ = ak.load_base()
    model = ak.AdapterModel(base).eval()
    bottlenecks = [f"houlsby{i}" for i in range(ADAPTERS)]
    loras = [f"lora{i}" for i in range(ADAPTERS)]
    lora_config = ak.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    for name in bottlenecks:
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=64, init="bert"))
    for i, name in enumerate(loras):
        model.add_adapter(name, lora_config)
        randomise(model, name, i)

    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spread = random.Random(0).choices(range(ADAPTERS), k=args.batch)

    def active(name):
        def run():
            model.set_active(name)
            model(**inputs)
        return run

    def mixed(names):
        return lambda: model(**inputs, adapter_names=names)

    variants = {
        "bottleneck: one adapter (set_active)": active(bottlenecks[0]),
        "bottleneck: one adapter via adapter_names": mixed([bottlenecks[0]] * args.batch),
        "bottleneck: 8 adapters via adapter_names": mixed([bottlenecks[i] for i in spread]),
        "lora: one adapter (set_active)": active(loras[0]),
        "lora: 8 adapters via adapter_names": mixed([loras[i] for i in spread]),
    }
    if not args.no_peft:
        twin = peft_twin(model, loras, lora_config)
        peft_names = [loras[i] for i in spread]
        with torch.inference_mode():
            ours = model(**inputs, adapter_names=peft_names).logits
            theirs = twin(**inputs, adapter_names=peft_names).logits
        print(f"peft vs adapterkit mixed LoRA logits: max abs diff {(ours - theirs).abs().max().item():.2e}")

        def peft_single():
            twin.set_adapter(loras[0])
            twin(**inputs)

        variants["peft lora: one adapter (set_adapter)"] = peft_single
        variants["peft lora: 8 adapters via adapter_names"] = lambda: twin(**inputs, adapter_names=peft_names)

    with torch.inference_mode():
        times = time_interleaved(variants, args.repeats)
    for family in dict.fromkeys(label.split(":")[0] for label in times):  # each to its own one-adapter batch
        rows = {label: samples for label, samples in times.items() if label.split(":")[0] == family}
        reference = next(label for label in rows if "set_" in label)
        print_table(rows, reference, f"forward, batch {args.batch} x {args.length} spread over {ADAPTERS} adapters")
    if not args.no_peft:
        ours, theirs = (median(times["lora: 8 adapters via adapter_names"]),
                        median(times["peft lora: 8 adapters via adapter_names"]))
        print(f"mixed LoRA batch, adapterkit / peft: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
