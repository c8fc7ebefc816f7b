"""Forward-time cost of LoRA, merged and unmerged, and of a Houlsby bottleneck, over the default base.

Four models share nothing but their starting weights: the bare base (no adapterkit at all), a copy
with a LoRA merged into its weights, and a copy carrying the same LoRA unmerged (through hooks) and
a Houlsby bottleneck (r=64). Their forwards run alternately in one process (A B C D A B C D ...),
so drift in machine speed hits all alike; the script prints the median of each and its ratio to
the bare base.

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/merge.py [--repeats 9] [--batch 8] [--length 128]
"""

import argparse
import copy
from functools import partial

import torch

import adapterkit as ak
from harness import print_table, time_interleaved

LORA = ak.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])


def with_trained_lora(base) -> ak.AdapterModel:
    """An AdapterModel over ``base`` holding the LoRA with non-zero weights (as after training)."""
    model = ak.AdapterModel(base).eval()
    model.add_adapter("lora", LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.adapter_layers["lora"].parameters():
            parameter.normal_(0.0, 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    bare, _ = ak.load_base()
    bare.eval()
    merged = with_trained_lora(copy.deepcopy(bare))
    merged.merge("lora")
    adapted = with_trained_lora(copy.deepcopy(bare))
    adapted.add_adapter("houlsby", ak.BottleneckConfig(placement="houlsby", bottleneck_size=64, init="bert"))

    ids = torch.randint(0, bare.config.vocab_size, (args.batch, args.length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        adapted.set_active("lora")
        gap = (merged(**inputs).logits - adapted(**inputs).logits).abs().max().item()

    def forward(model) -> None:
        with torch.inference_mode():
            model(**inputs)

    times = time_interleaved(
        {
            "bare base": partial(forward, bare),
            "merged LoRA": partial(forward, merged),
            "unmerged LoRA": partial(forward, adapted),
            "Houlsby r=64": partial(forward, adapted),
        },
        args.repeats,
        setup={"unmerged LoRA": partial(adapted.set_active, "lora"),
               "Houlsby r=64": partial(adapted.set_active, "houlsby")},
    )
    print(f"LoRA r=8 on q_proj, v_proj; merged vs unmerged logits differ by at most {gap:.1e}")
    print_table(times, "bare base", f"forward, batch {args.batch} x {args.length}")


if __name__ == "__main__":
    main()
