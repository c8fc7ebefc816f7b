"""The ``adapterkit`` command: train, eval, generate, info, and data conversion.

Each subcommand is one ``add_<name>_command(subparsers)`` function that adds its parser and sets
``handler``; ``main`` builds the parser from the list ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import AdapterkitError, ConfigError
from .methods import registered_methods

DEFAULT_BASE = "smollm2-135m"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # bases.DTYPES, without importing torch to build the parser


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, the same for every command that loads the base."""
    parser.add_argument("--device", help="where the base runs: cpu (default), cuda, cuda:N or mps; under torchrun, cuda means cuda:LOCAL_RANK")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="the base's weights (default float32); adapters stay float32")


# ---- train ---------------------------------------------------------------------------------------
NAME_LISTS = ("target_modules", "feedforward_modules")  # comma-separated on the command line


def adapter_options() -> dict[str, list[str]]:
    """Every registered method's config fields (but those training sets itself), with the methods
    that have each: each becomes a flag of ``train``."""
    options: dict[str, list[str]] = {}
    for method in registered_methods():
        for field in dataclasses.fields(method.config_class):
            if field.name not in method.config_class.set_by_training:
                options.setdefault(field.name, []).append(method.name)
    return options


def flag_value(option: str):
    """How a flag's text becomes a config value: layer ranges, name lists, else a YAML scalar."""
    def convert(text: str):
        if option == "layers":
            return parse_layers(text)
        if option in NAME_LISTS:
            return [name.strip() for name in text.split(",") if name.strip()]
        import yaml

        return yaml.safe_load(text)

    convert.__name__ = option  # argparse names the flag's type in its errors
    return convert


def add_train_command(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an adapter on a JSONL file", description=(
        "Train one adapter over a frozen base. Options can also come from --config FILE (YAML or TOML, "
        "the same names with underscores; an 'adapter' table holds method options); flags win."
    ))
    parser.add_argument("--config", type=Path, help="YAML or TOML file of options")
    parser.add_argument("--train", help="training JSONL ({prompt, completion} or {messages})")
    parser.add_argument("--eval", help="held-out JSONL, scored every --eval-every steps and at the end")
    parser.add_argument("-o", "--output", help="output folder: adapter/, checkpoint/, metrics.jsonl, loss.png")
    parser.add_argument("--base", help=f"embedded base name or local model folder (default {DEFAULT_BASE})")
    parser.add_argument("--name", help="adapter name (default: the output folder's name)")
    parser.add_argument("--method", choices=[m.name for m in registered_methods()], help="default bottleneck")
    add_device_options(parser)
    adapter_group = parser.add_argument_group("adapter options", "fields of the method's config (--set KEY=VALUE also works)")
    for option, methods in adapter_options().items():
        adapter_group.add_argument("--" + option.replace("_", "-"), type=flag_value(option), dest=f"adapter.{option}",
                                   metavar=option.upper(), help=", ".join(methods))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other adapter config field (value parsed as YAML)")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int)
    group.add_argument("--epochs", type=float)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--grad-accum", type=int)
    group.add_argument("--lr", type=float)
    group.add_argument("--warmup-ratio", type=float)
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--max-grad-norm", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--max-length", type=int)
    group.add_argument("--eval-every", type=int)
    group.add_argument("--save-every", type=int)
    group.add_argument("--metric", choices=["chrf", "exact", "none"])
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute each block's activations in the backward pass: less memory, more compute")
    group.add_argument("--fsdp", action="store_true", default=None,
                       help="under torchrun: shard the frozen base's blocks across the ranks (FSDP2)")
    group.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint if it exists")
    group.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_train)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """File options overlaid with the flags that were given."""
    options: dict[str, Any] = _read_options_file(args.config) if args.config else {}
    adapter = dict(options.pop("adapter", None) or {})
    for key, value in vars(args).items():
        if value is None or key in ("config", "handler", "command", "set", "resume", "no_progress"):
            continue
        if key.startswith("adapter."):
            adapter[key.split(".", 1)[1]] = value
        else:
            options[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        import yaml

        adapter[key.strip()] = yaml.safe_load(value)
    if isinstance(adapter.get("layers"), str):
        adapter["layers"] = parse_layers(adapter["layers"])
    options["adapter"] = adapter
    if args.no_progress:
        options["progress"] = False
    for required in ("train", "output"):
        if not options.get(required):
            raise ConfigError(f"give --{required} (or '{required}' in the config file)")
    return options


def parse_layers(text: str) -> list[int]:
    """ "15-29" or "0,2,4" or "0-3,8" -> layer indices."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            layers.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ConfigError(f"layers must look like '15-29' or '0,2,4', got {text!r}") from None
    return layers


def _read_options_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of options")
    return {key.replace("-", "_"): value for key, value in data.items()}


def run_train(args: argparse.Namespace) -> int:
    from . import distributed

    try:
        return _train(args)
    finally:
        distributed.stop()


def _train(args: argparse.Namespace) -> int:
    import torch

    from . import distributed
    from .bases import load_base, resolve_device
    from .data import read_jsonl
    from .methods import config_class
    from .model import AdapterModel
    from .train import Trainer, TrainConfig, planned_steps

    options = train_options(args)
    output = Path(options.pop("output"))
    train_examples = read_jsonl(options.pop("train"))  # every line checked before any training
    eval_path = options.pop("eval", None)
    eval_examples = read_jsonl(eval_path) if eval_path else []
    base_name = options.pop("base", DEFAULT_BASE)
    name = options.pop("name", None) or output.name
    method = options.pop("method", "bottleneck")
    device, dtype = resolve_device(options.pop("device", None)), options.pop("dtype", None)
    checkpointing, fsdp = bool(options.pop("gradient_checkpointing", False)), bool(options.pop("fsdp", False))
    if fsdp and not distributed.launched():
        raise ConfigError("--fsdp shards the base across several processes: launch with torchrun --nproc_per_node N -m adapterkit train ...")
    adapter_options = options.pop("adapter")
    config = TrainConfig.from_dict(options)
    config_type = config_class(method)
    if "total_step" in {f.name for f in dataclasses.fields(config_type)} and adapter_options.get("total_step") is None:
        adapter_options["total_step"] = planned_steps(len(train_examples), config)  # a schedule that needs the run's length
    adapter_config = config_type.from_dict(adapter_options)

    device = distributed.start(device)  # under torchrun: join the ranks; cuda becomes cuda:LOCAL_RANK
    base, tokenizer = load_base(base_name, dtype, "cpu" if fsdp else device)  # sharded from host memory
    model = AdapterModel(base)
    torch.manual_seed(config.seed)  # the adapter's initial weights are part of "same seed, same adapter"
    model.add_adapter(name, adapter_config)
    model.train_adapter(name)
    if fsdp:
        distributed.shard_base(model, device)
    if distributed.rank() == 0:
        model.print_trainable_parameters()
    trainer = Trainer(model, tokenizer, train_examples, config, output, eval_examples, adapter_name=name, gradient_checkpointing=checkpointing)
    started = time.perf_counter()
    result = trainer.train(resume=args.resume)
    if distributed.rank() != 0:
        return 0
    print(f"trained {trainer.total_steps} steps in {time.perf_counter() - started:.0f} s; adapter saved to {output / 'adapter'}")
    if result:
        print(format_table([_row(name, result, config.metric)]))
    return 0


# ---- eval ----------------------------------------------------------------------------------------
def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score adapters (or the bare base) on a JSONL file")
    parser.add_argument("data", help="JSONL file of prompt/completion or messages examples")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder (repeat for several); none: the bare base")
    parser.add_argument("--with-base", action="store_true", help="also score the bare base")
    parser.add_argument("--base", default=DEFAULT_BASE)
    add_device_options(parser)
    parser.add_argument("--metric", choices=["chrf", "exact", "none"], default="chrf")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, help="also write the scores (and predictions) to this file")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .data import read_jsonl
    from .evaluate import evaluate

    examples = read_jsonl(args.data)
    model, tokenizer, names = _model_with_adapters(args.base, args.adapter, args.device, args.dtype)
    runs = ([None] if args.with_base or not names else []) + names
    rows, report = [], {}
    for name in runs:
        model.set_active(name)
        result = evaluate(model, tokenizer, examples, args.metric, args.batch_size, args.max_new_tokens)
        label = name or "base"
        rows.append(_row(label, result, args.metric))
        report[label] = result
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


# ---- generate ------------------------------------------------------------------------------------
def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer prompts with one or more adapters, side by side")
    parser.add_argument("prompts", nargs="+", help="prompt texts (put into --template)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder (repeat for several)")
    parser.add_argument("--with-base", action="store_true", help="also answer with the bare base")
    parser.add_argument("--template", default="{prompt}", help=r"prompt template, e.g. 'English: {prompt}\nGerman:' (\n is a newline)")
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    parser.add_argument("--base", default=DEFAULT_BASE)
    add_device_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="HF's: >1 discourages tokens already in prompt or answer")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's: subtracted per earlier use of a token")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's: subtracted once from every token already used")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .evaluate import generate_batched

    model, tokenizer, names = _model_with_adapters(args.base, args.adapter, args.device, args.dtype)
    template = args.template.replace("\\n", "\n")
    texts = [template.format(prompt=p) for p in args.prompts]
    if args.chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts]
    runs = ([None] if args.with_base or not names else []) + names
    answers = {}
    for name in runs:
        model.set_active(name)
        answers[name or "base"] = generate_batched(model, tokenizer, texts, args.max_new_tokens, stop=None if args.chat else "\n",
                                                   repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                                                   presence_penalty=args.presence_penalty)
    for i, prompt in enumerate(args.prompts):
        print(f"> {prompt}")
        for label, outputs in answers.items():
            print(f"  [{label}] {outputs[i]}")
    return 0


# ---- info ----------------------------------------------------------------------------------------
def add_info_command(subparsers) -> None:
    parser = subparsers.add_parser("info", help="describe a saved adapter folder")
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from .io import describe_adapter

    info = describe_adapter(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    base = info["base"]
    options = ", ".join(f"{k}={v}" for k, v in (info["config"] or {}).items() if v is not None)
    print(f"adapter     {info['name']}  ({info['path']})")
    print(f"method      {info['method']}: {options}")
    print(f"parameters  {info['parameters']:,} ({info['dtype']})")
    print(f"size        {info['size_bytes'] / 1e6:.2f} MB on disk")
    base_params = f"{base['num_parameters']:,}" if base.get("num_parameters") else "?"
    print(f"base        {base.get('architecture')} ({base.get('model_type')}, {base_params} parameters, {base.get('dtype') or 'float32'}, weights sha256 {str(base.get('weights_sha256'))[:16]}…)")
    return 0


# ---- data ----------------------------------------------------------------------------------------
def add_data_command(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare training data")
    tools = parser.add_subparsers(dest="tool", required=True)
    po = tools.add_parser("po2jsonl", help="gettext catalogs (.po) -> prompt/completion JSONL")
    po.add_argument("catalogs", nargs="+", type=Path)
    po.add_argument("--lang", required=True, help="the catalogs' language code, e.g. de")
    po.add_argument("-o", "--output", required=True, type=Path)
    po.set_defaults(handler=run_po2jsonl)


def run_po2jsonl(args: argparse.Namespace) -> int:
    from .data import po_to_jsonl

    count = po_to_jsonl(args.catalogs, args.lang, args.output)
    print(f"wrote {count} pairs to {args.output}")
    return 0


# ---- shared --------------------------------------------------------------------------------------
def _model_with_adapters(base_name: str, paths: Sequence[str], device: str | None = None, dtype: str | None = None):
    """(model, tokenizer, adapter names): the base (on ``device``, in ``dtype``) with each adapter
    loaded under its saved name (made unique with a numeric suffix when two share one)."""
    from .bases import load_base
    from .io import read_adapter_config
    from .model import AdapterModel

    base, tokenizer = load_base(base_name, dtype, device)
    model = AdapterModel(base)
    names: list[str] = []
    for path in paths:
        saved = read_adapter_config(path).get("name") or "adapter"
        name, n = saved, 1
        while name in names:
            n += 1
            name = f"{saved}-{n}"
        names.append(model.load_adapter(path, name=name))
    return model, tokenizer, names


def _row(label: str, result: dict, metric: str) -> dict[str, str]:
    row = {"model": label, "examples": str(result["examples"]), "loss": f"{result['loss']:.3f}"}
    if metric != "none":
        row[metric] = f"{result[metric]:.1f}"
    row["seconds"] = f"{result['seconds']:.1f}"
    return row


def format_table(rows: list[dict[str, str]]) -> str:
    """A plain aligned text table."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# ---- serve ---------------------------------------------------------------------------------------
def add_serve_command(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server over one base and a folder of adapters", description=(
        "Serve /v1/completions and /v1/chat/completions; a request's 'model' names an adapter folder inside "
        "--adapters (or the base's name). Concurrent requests run together as mixed-adapter batches."
    ))
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"embedded base name or local model folder (default {DEFAULT_BASE})")
    parser.add_argument("--adapters", required=True, type=Path, help="folder whose sub-folders are saved adapters")
    add_device_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="key for POST/DELETE /v1/adapters (default: $ADAPTERKIT_API_KEY; none: those are off)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most rows decoding together")
    parser.add_argument("--max-loaded-adapters", type=int, default=8, help="least recently used idle adapters are unloaded beyond this")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting for a place; beyond it, 429 with Retry-After")
    parser.add_argument("--max-prefill-tokens", type=int, default=512,
                        help="most prompt tokens (rows x padded length) prefilled in one step; longer prompts prefill in chunks")
    parser.add_argument("--compositions", type=Path, help='JSON file naming compositions, e.g. {"de-legal": {"stack": ["de", "legal"]}}; '
                        'a request\'s model may name one')
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    for option in ("max_batch_size", "max_loaded_adapters", "max_queue", "max_prefill_tokens"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be at least 1")
    api_key = args.api_key or os.environ.get("ADAPTERKIT_API_KEY") or None
    serve(args.base, args.adapters, args.host, args.port, api_key, args.max_batch_size, args.max_loaded_adapters,
          args.max_queue, args.max_prefill_tokens, read_compositions(args.compositions) if args.compositions else None,
          device=args.device, dtype=args.dtype)
    return 0


def read_compositions(path: Path) -> dict:
    """{name: block} from a JSON file of {name: {"stack" | "average" | "fuse": [...]}}."""
    from .compose import Composition, from_json

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ConfigError(f"cannot read compositions from {path}: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must map composition names to blocks")
    blocks = {name: from_json(spec) for name, spec in document.items()}
    plain = sorted(name for name, block in blocks.items() if not isinstance(block, Composition))
    if plain:
        raise ConfigError(f"{path}: {plain} name a single adapter; a composition is a stack, average or fuse")
    return blocks


COMMANDS: list[Callable] = [add_train_command, add_eval_command, add_generate_command, add_info_command, add_data_command, add_serve_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterkit", description="Adapters over one frozen base model.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_library_messages()
    try:
        return args.handler(args)
    except AdapterkitError as error:
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""  # under torchrun
        print(f"adapterkit: error: {rank}{error}", file=sys.stderr)
        return 2


def show_library_messages() -> None:
    """The library logs what a user at a terminal wants to see (AdaLoRA's final ranks): print it."""
    logger = logging.getLogger("adapterkit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
