"""Forward-time cost of bottleneck adapters over the default base.

Runs the bare base and the base with an adapter alternately in one process (A B A B ...), so
drift in machine speed hits both alike, and prints the median time of each and their ratio.

    .venv/bin/python bench/overhead.py [--repeats 9] [--batch 8] [--length 128]
"""

import argparse
from functools import partial

import torch

import adapterkit as ak
from harness import print_table, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = ak.load_base()
    model = ak.AdapterModel(base).eval()
    variants = {
        "houlsby r=64": ak.BottleneckConfig(placement="houlsby", bottleneck_size=64),
        "pfeiffer r=64": ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=64),
    }
    for name, config in variants.items():
        model.add_adapter(name.split()[0], config)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    runs = {"base": None, **{name.split()[0]: name.split()[0] for name in variants}}

    def forward() -> None:
        with torch.inference_mode():
            model(**inputs)

    times = time_interleaved(
        {label: forward for label in runs},
        args.repeats,
        setup={label: partial(model.set_active, adapter) for label, adapter in runs.items()},
    )
    print_table(times, "base", f"forward, batch {args.batch} x {args.length}")


if __name__ == "__main__":
    main()
