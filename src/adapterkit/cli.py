"""The ``adapterkit`` command: train, eval, generate, info, data tools and serve.

Each subcommand is one ``add_<name>_arguments(parser)`` function that adds its options and sets
``handler``; ``COMMANDS`` names them. ``main`` builds only the parser of the subcommand it is given,
so ``adapterkit --help`` imports neither torch nor the method registry, and answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .errors import AdapterkitError, ConfigError
from .quantization import QUANTIZATIONS
from .templates import check_template

DEFAULT_BASE = "smollm2-135m"  # unless $ADAPTERKIT_BASE names another (bases.default_base)
BASE_HELP = f"embedded base name or local model folder (default: $ADAPTERKIT_BASE, else {DEFAULT_BASE})"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # bases.DTYPES, without importing torch to build the parser


class HelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default, where it has one worth stating."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if action.option_strings and "default" not in text and not unset:
            text += " (default: %(default)s)"
        return text


def template_option(text: str) -> str:
    """--template's value: a prompt template, with \\n standing for a newline."""
    try:
        return check_template(text.replace("\\n", "\n"), "--template")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_template_options(parser: argparse.ArgumentParser, default: str) -> None:
    """--template and --no-template, for the commands that put text into adapters' prompt format."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--template", type=template_option, metavar="TEMPLATE", help=(
        r"prompt format: text holding {prompt} ('English: {prompt}\nGerman:'; \n is a newline), or 'chat' for the "
        f"tokenizer's chat template (default: {default})"))
    group.add_argument("--no-template", action="store_true",
                       help="use the text as given, whatever template the adapters record")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, the same for every command that loads the base."""
    parser.add_argument("--device", help="where the base runs: cpu (default), cuda, cuda:N or mps; "
                                         "under torchrun, cuda means cuda:LOCAL_RANK")
    parser.add_argument("--dtype", choices=DTYPE_NAMES,
                        help="the base's weights (default: float32); adapters stay float32")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="load the base's block layers in 4 bits (nf4, fp4) or 8 bits (int8) through "
                             "bitsandbytes, as QLoRA does; --dtype is then what they compute in")


# ---- train ---------------------------------------------------------------------------------------
def adapter_options() -> dict[str, tuple[list[str], Any]]:
    """Every registered method's config fields (but those training sets itself), each with the
    methods that have it and their defaults ("lora: 8") and its type: each becomes a flag of ``train``."""
    from .methods import registered_methods

    options: dict[str, tuple[list[str], Any]] = {}
    for method in (m for m in registered_methods() if m.trains_alone):
        types = typing.get_type_hints(method.config_class)
        for field in dataclasses.fields(method.config_class):
            if field.name not in method.config_class.set_by_training:
                defaults, _ = options.setdefault(field.name, ([], types[field.name]))
                defaults.append(f"{method.name}: {_field_default(field)}")
    return options


def _field_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return str(field.default)
    return str(field.default_factory()) if field.default_factory is not dataclasses.MISSING else "required"


def flag_value(option: str, field_type: Any = None):
    """How a flag's text becomes a config value, by the field's type: a list of integers from
    ranges ("0-3,8"), a list of names from comma-separated names, else a YAML scalar."""
    accepted = typing.get_args(field_type) or (field_type,)

    def convert(text: str):
        if list[int] in accepted:
            return parse_layers(text)
        if list[str] in accepted:
            return [name.strip() for name in text.split(",") if name.strip()]
        import yaml

        return yaml.safe_load(text)

    convert.__name__ = option  # argparse names the flag's type in its errors
    return convert


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .methods import DEFAULT_METHOD, registered_methods
    from .train import REPORT_TO, TrainConfig

    default = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    parser.description = (
        "Train one adapter over a frozen base. Options can also come from --config FILE (YAML or TOML, "
        "the same names with underscores; an 'adapter' table holds method options); flags win."
    )
    parser.add_argument("--config", type=Path, help="YAML or TOML file of options")
    parser.add_argument("--train", help="training JSONL ({prompt, completion} or {messages}); required")
    parser.add_argument("--eval", help="held-out JSONL, scored every --eval-every steps and at the end")
    parser.add_argument("-o", "--output",
                        help="output folder: adapter/, checkpoint/, metrics.jsonl, loss.png; required")
    parser.add_argument("--base", help=BASE_HELP)
    parser.add_argument("--name", help="adapter name (default: the output folder's name)")
    parser.add_argument("--method", choices=[m.name for m in registered_methods() if m.trains_alone],
                        help=f"adapter method (default: {DEFAULT_METHOD})")
    parser.add_argument("--template", type=template_option, metavar="TEMPLATE", help=(
        r"prompt format of the examples that do not name one ('prompt_template'): their prompt fills {prompt} "
        r"('English: {prompt}\nGerman:'; \n is a newline), or 'chat'. The adapter records the format all examples "
        "share, for generate, eval and serve (default: what the examples name)"))
    add_device_options(parser)
    adapter_group = parser.add_argument_group("adapter options",
                                              "fields of the method's config (--set KEY=VALUE also works)")
    for option, (methods, field_type) in adapter_options().items():
        adapter_group.add_argument("--" + option.replace("_", "-"), type=flag_value(option, field_type),
                                   dest=f"adapter.{option}", metavar=option.upper(),
                                   help="default per method: " + ", ".join(methods))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other adapter config field (value parsed as YAML)")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, help="optimizer steps (default: --epochs, else one epoch)")
    group.add_argument("--epochs", type=float, help="passes over the data, when --steps is not given (default: 1)")
    group.add_argument("--batch-size", type=int, help=f"examples per batch (default: {default['batch_size']})")
    group.add_argument("--grad-accum", type=int, help=f"batches per optimizer step (default: {default['grad_accum']})")
    group.add_argument("--lr", type=float, help=f"peak learning rate of AdamW, at most 1 (default: {default['lr']})")
    group.add_argument("--warmup-ratio", type=float,
                       help=f"share of the steps warming up linearly (default: {default['warmup_ratio']})")
    group.add_argument("--weight-decay", type=float, help=f"AdamW's weight decay (default: {default['weight_decay']})")
    group.add_argument("--max-grad-norm", type=float,
                       help=f"gradient clipping norm (default: {default['max_grad_norm']})")
    group.add_argument("--seed", type=int,
                       help=f"seed of the adapter's initial weights and the data order (default: {default['seed']})")
    group.add_argument("--max-length", type=int, help="most tokens per example; longer prompts lose their start "
                                                      f"(default: {default['max_length']})")
    group.add_argument("--eval-every", type=int, help="score --eval every N steps (default: 0, at the end only)")
    group.add_argument("--save-every", type=int, help="write checkpoint/ every N steps (default: 0, never)")
    group.add_argument("--metric", choices=["chrf", "exact", "none"],
                       help=f"score of --eval's generations (default: {default['metric']})")
    group.add_argument("--max-new-tokens", type=int,
                       help=f"longest generated answer when scoring (default: {default['max_new_tokens']})")
    group.add_argument("--report-to", choices=REPORT_TO,
                       help="also log the metrics as TensorBoard event files in the output folder (default: none)")
    group.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute each block's activations in the backward pass: less memory, more compute")
    group.add_argument("--fsdp", action="store_true", default=None,
                       help="under torchrun: shard the frozen base's blocks across the ranks (FSDP2)")
    reuse = group.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true",
                       help="continue the run in the output folder from its checkpoint/")
    reuse.add_argument("--overwrite", action="store_true",
                       help="delete the earlier run in the output folder and start afresh")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """File options overlaid with the flags that were given."""
    options: dict[str, Any] = _read_options_file(args.config) if args.config else {}
    adapter = dict(options.pop("adapter", None) or {})
    for key, value in vars(args).items():
        if value is None or key in ("config", "handler", "command", "parser", "set", "resume", "overwrite",
                                    "no_progress"):
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
    from .data import apply_template, read_jsonl
    from .methods import DEFAULT_METHOD, config_class
    from .model import AdapterModel
    from .train import TrainConfig, Trainer, checkpoint_step, clear_run, earlier_run, planned_steps

    options = train_options(args)
    output = Path(options.pop("output"))
    train_examples = read_jsonl(options.pop("train"))  # every line checked before any training
    eval_path = options.pop("eval", None)
    eval_examples = read_jsonl(eval_path) if eval_path else []
    template = check_template(options.pop("template", None), "template")
    base_name = options.pop("base", None) or default_base_name()
    name = options.pop("name", None) or output.name
    method = options.pop("method", DEFAULT_METHOD)
    device, dtype = resolve_device(options.pop("device", None)), options.pop("dtype", None)
    quantize = options.pop("quantize", None)
    checkpointing, fsdp = bool(options.pop("gradient_checkpointing", False)), bool(options.pop("fsdp", False))
    if fsdp and quantize:
        raise ConfigError(f"--fsdp cannot shard a --quantize {quantize} base (FSDP2 shards float parameters, not "
                          "bitsandbytes' packed ones): drop one of them; a quantized base fits one device anyway")
    if fsdp and not distributed.launched():
        raise ConfigError("--fsdp shards the base across several processes: "
                          "launch with torchrun --nproc_per_node N -m adapterkit train ...")
    earlier = earlier_run(output)
    if earlier and not (args.resume or args.overwrite):
        resume = "continue it with --resume, " if checkpoint_step(output) is not None else ""
        raise ConfigError(f"{output} already holds a run ({', '.join(earlier)}): {resume}"
                          "start afresh with --overwrite (deletes those), or choose another --output")
    if earlier and args.resume and checkpoint_step(output) is None:
        raise ConfigError(f"{output} holds a run but no checkpoint/ to resume from "
                          "(it was trained without --save-every); "
                          "start afresh with --overwrite (deletes it), or choose another --output")
    adapter_options = options.pop("adapter")
    config = TrainConfig.from_dict(options)
    config_type = config_class(method)
    for field in config_type.run_length_fields:  # a schedule that needs the run's length
        if adapter_options.get(field) is None:
            adapter_options[field] = planned_steps(len(train_examples), config)
    adapter_config = config_type.from_dict(adapter_options)

    device = distributed.start(device)  # under torchrun: join the ranks; cuda becomes cuda:LOCAL_RANK
    base, tokenizer = load_base(base_name, dtype, "cpu" if fsdp else device, quantize)  # fsdp: shards from host memory
    if earlier and args.overwrite and distributed.rank() == 0:
        clear_run(output)  # only once every option has been checked and the base loaded
    train_examples = apply_template(train_examples, template, tokenizer)
    eval_examples = apply_template(eval_examples, template, tokenizer)
    recorded = recorded_template(train_examples)
    model = AdapterModel(base)
    torch.manual_seed(config.seed)  # the adapter's initial weights are part of "same seed, same adapter"
    model.add_adapter(name, adapter_config)
    model.train_adapter(name)
    if fsdp:
        distributed.shard_base(model, device)
    if distributed.rank() == 0:
        model.print_trainable_parameters()
    trainer = Trainer(model, tokenizer, train_examples, config, output, eval_examples, adapter_name=name,
                      gradient_checkpointing=checkpointing, prompt_template=recorded)
    if args.resume and distributed.rank() == 0:
        step = checkpoint_step(output)
        print(f"resuming from step {step} of {trainer.total_steps} ({output / 'checkpoint'})" if step is not None
              else f"no checkpoint in {output}: training from step 0")
    started = time.perf_counter()
    result = trainer.train(resume=args.resume)
    if distributed.rank() != 0:
        return 0
    print(f"trained {trainer.total_steps} steps in {time.perf_counter() - started:.0f} s; "
          f"adapter saved to {output / 'adapter'}")
    if result:
        print(format_table([_row(name, result, config.metric)]))
    return 0


def recorded_template(examples: list[dict]) -> str | None:
    """The prompt template every example shares, which the adapter records; says so when there is none."""
    from .data import template_of
    from .templates import shared_template

    templates = [template_of(example) for example in examples]
    shared = shared_template(templates)
    if shared is None:
        why = "they come in several formats" if any(templates) else "they name none and --template was not given"
        print(f"note: the adapter records no prompt template ({why}); "
              "generate, eval and serve will give it text as it is", file=sys.stderr)
    return shared


# ---- eval ----------------------------------------------------------------------------------------
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", help="JSONL file of prompt/completion or messages examples "
                                                "(not with --harness)")
    parser.add_argument("--adapter", action="append", default=[],
                        help="adapter folder (repeat for several; default: none, the bare base)")
    parser.add_argument("--with-base", action="store_true", help="also score the bare base")
    parser.add_argument("--base", help=BASE_HELP)
    add_device_options(parser)
    add_template_options(parser, "each adapter's own, for examples that name none; "
                                 "the bare base takes the one all adapters share")
    parser.add_argument("--metric", choices=["chrf", "exact", "none"], default="chrf",
                        help="score of the generated answers")
    parser.add_argument("--batch-size", type=int, default=32, help="examples scored together")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest generated answer")
    parser.add_argument("--num-beams", type=int, default=1,
                        help="HF's beam search with this many beams (1: greedy); each answer decodes as many rows")
    parser.add_argument("--json", type=Path, help="also write the scores (and predictions) to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    harness = parser.add_argument_group("lm-eval tasks", "instead of a JSONL file (pip install 'adapterkit[eval]')")
    harness.add_argument("--harness", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks, run over "
                         "the bare base and every --adapter in one pass")
    harness.add_argument("--include-path", type=Path, metavar="DIR", help="folder of local lm-eval task YAML files")
    harness.add_argument("-o", "--output-json", type=Path, metavar="FILE",
                         help="write lm-eval's results, one per adapter, to this file")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .data import apply_template, read_jsonl
    from .evaluate import evaluate

    if args.harness:
        return run_harness(args)
    if args.data is None:
        raise ConfigError("give a JSONL file to score, or --harness TASKS to run lm-eval tasks")
    if args.include_path or args.output_json:
        raise ConfigError("--include-path and --output-json go with --harness (JSONL scores are written with --json)")
    if args.metric != "none":
        check_decoding(args.max_new_tokens, num_beams=args.num_beams)
    examples = read_jsonl(args.data)
    model, tokenizer, adapters = _model_with_adapters(args.base or default_base_name(), args.adapter, args.device,
                                                      args.dtype, args.quantize)
    rows, report = [], {}
    for name, template in run_templates(args, adapters).items():
        model.set_active(name)
        label = name or "base"
        with progress_bar(args, label, len(examples) if args.metric != "none" else 0) as bar:
            result = evaluate(model, tokenizer, apply_template(examples, template, tokenizer), args.metric,
                              args.batch_size, args.max_new_tokens, progress=bar.update, num_beams=args.num_beams)
        rows.append(_row(label, result, args.metric))
        report[label] = result
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def run_harness(args: argparse.Namespace) -> int:
    """lm-eval tasks over the bare base and every adapter in one pass: a table of each task's
    metrics with a column per adapter, and lm-eval's results in --output-json."""
    from .integrations import require_lm_eval

    require_lm_eval()
    if args.data or args.json or args.template is not None or args.no_template:
        raise ConfigError("--harness runs lm-eval's tasks, which write their own prompts: drop the JSONL file, --json "
                          "(use --output-json) and --template")
    if args.num_beams != 1:
        raise ConfigError("--num-beams applies to JSONL scoring; lm-eval's tasks set their own generation options")
    from lm_eval.utils import handle_non_serializable

    from .integrations.lm_eval import evaluate_adapters, task_manager

    tasks = [task.strip() for task in args.harness.split(",") if task.strip()]
    manager = task_manager(tasks, args.include_path)  # unknown tasks are refused before the base loads
    base = args.base or default_base_name()
    model, tokenizer, adapters = _model_with_adapters(base, args.adapter, args.device, args.dtype,
                                                      args.quantize)
    results = evaluate_adapters(model, tokenizer, [None, *adapters], tasks, batch_size=args.batch_size,
                                task_manager=manager, log_samples=False)
    print(format_table(harness_rows(results)))
    if args.output_json:
        text = json.dumps(results, indent=2, ensure_ascii=False, default=handle_non_serializable)
        args.output_json.write_text(text + "\n", encoding="utf-8")
    return 0


def harness_rows(results: dict[str, dict]) -> list[dict[str, str]]:
    """One row per task and metric (lm-eval's "acc,none" shown as "acc"), one column per adapter."""
    labels = list(results)
    first = results[labels[0]]["results"]
    rows = []
    for task, metrics in first.items():
        for key in metrics:
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric:
                continue
            row = {"task": task, "metric": metric if filter_name == "none" else key}
            row.update({label: _metric_text(results[label]["results"][task].get(key)) for label in labels})
            rows.append(row)
    return rows


def _metric_text(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def run_templates(args: argparse.Namespace, adapters: dict[str, str | None]) -> dict[str | None, str | None]:
    """{adapter name (None: the bare base): the prompt template its run uses}, the base first when
    it runs: --template for all, none with --no-template, else each adapter's own and, for the base,
    the one all the adapters share."""
    from .templates import shared_template

    runs: dict[str | None, str | None] = {}
    if args.with_base or not adapters:
        runs[None] = shared_template(list(adapters.values()))
    runs.update(adapters)
    if args.no_template or args.template is not None:
        runs = dict.fromkeys(runs, args.template)
    for name, template in runs.items():
        if template is not None:
            print(f"{name or 'base'}: prompts in the format {template!r}", file=sys.stderr)
    return runs


def progress_bar(args: argparse.Namespace, label: str, total: int):
    """A tqdm bar on stderr counting answers (off with --no-progress or nothing to count)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="answer", disable=args.no_progress or not total, dynamic_ncols=True)


# ---- generate ------------------------------------------------------------------------------------
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help="texts to answer, each put into the prompt template")
    parser.add_argument("--adapter", action="append", default=[],
                        help="adapter folder (repeat for several; default: none, the bare base)")
    parser.add_argument("--with-base", action="store_true", help="also answer with the bare base")
    add_template_options(parser, "each adapter's own; the bare base takes the one all adapters share")
    parser.add_argument("--chat", action="store_true",
                        help="also send each filled-in prompt as a user message through the chat template")
    parser.add_argument("--base", help=BASE_HELP)
    add_device_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest answer")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="HF's: >1 discourages tokens already in prompt or answer")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="OpenAI's: subtracted per earlier use of a token")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's: subtracted once from every token already used")
    parser.add_argument("--num-beams", type=int, default=1, help="HF's beam search with this many beams (1: greedy)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="HF's, with --num-beams: hypotheses ranked by log-probability / length ** this "
                             "(>1 favours longer answers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .evaluate import generate_batched
    from .templates import CHAT, render_prompt

    check_decoding(args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                   frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                   num_beams=args.num_beams, length_penalty=args.length_penalty)
    model, tokenizer, adapters = _model_with_adapters(args.base or default_base_name(), args.adapter, args.device,
                                                      args.dtype, args.quantize)
    answers = {}
    for name, template in run_templates(args, adapters).items():
        texts = [render_prompt(template, p, tokenizer) for p in args.prompts]
        chat = args.chat or template == CHAT
        if args.chat:
            texts = [render_prompt(CHAT, t, tokenizer) for t in texts]
        model.set_active(name)
        with progress_bar(args, name or "base", len(texts)) as bar:
            answers[name or "base"] = generate_batched(
                model, tokenizer, texts, args.max_new_tokens, stop=None if chat else "\n",
                repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty, progress=bar.update, num_beams=args.num_beams,
                length_penalty=args.length_penalty)
    for i, prompt in enumerate(args.prompts):
        print(f"> {prompt}")
        for label, outputs in answers.items():
            print(f"  [{label}] {outputs[i]}")
    return 0


def check_decoding(max_new_tokens: int, **options: Any) -> None:
    """Decoding options (``Sampling``'s fields) that do not go together fail before the base loads, not after."""
    from .generation import Sampling

    Sampling(max_tokens=max_new_tokens, **options).check()


# ---- info ----------------------------------------------------------------------------------------
def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="adapter folder (adapterkit's, peft's or AdapterHub's)")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from .io import describe_adapter

    info = describe_adapter(args.path)
    info["base"]["pretrained_path"] = base_pretrained_path(info["base"]["name_or_path"])
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    base = info["base"]
    options = ", ".join(f"{k}={v}" for k, v in (info["config"] or {}).items() if v is not None)
    print(f"adapter     {info['name']}  ({info['path']}, {info['format']} format)")
    print(f"method      {info['method']}: {options}")
    print(f"parameters  {info['parameters']:,} ({info['dtype']})")
    print(f"size        {info['size_bytes'] / 1e6:.2f} MB on disk")
    print(f"base        {base['name_or_path'] or 'not recorded'}")
    if base.get("weights_sha256"):
        base_params = f"{base['num_parameters']:,}" if base.get("num_parameters") else "?"
        quantized = f" (trained over its {base['quantized']} copy)" if base.get("quantized") else ""
        print(f"            {base.get('architecture')} ({base.get('model_type')}, {base_params} parameters, "
              f"{base.get('dtype') or 'float32'}{quantized}, "
              f"weights sha256 {base['weights_sha256'][:16]}…)")
    if base["pretrained_path"] and base["pretrained_path"] != base["name_or_path"]:
        print(f"            folder {base['pretrained_path']}{base_folder_note(base['name_or_path'])}")
    template = info["prompt_template"]
    print("template    " + ("the tokenizer's chat template (the text is the user's message)" if template == "chat"
                            else json.dumps(template, ensure_ascii=False) if template
                            else "none recorded: text is given as it is"))
    return 0


def base_pretrained_path(name: str | None) -> str | None:
    """The folder (or hub id) to give transformers, peft or lm-eval for a recorded base; None when
    none is recorded or its embedded wheel is missing."""
    from .bases import pretrained_path
    from .errors import BaseModelError

    try:
        return pretrained_path(name) if name else None
    except BaseModelError:
        return None


def base_folder_note(name: str) -> str:
    from .bases import is_materialised

    return "" if is_materialised(name) else " (made by the base's first load)"


# ---- export --------------------------------------------------------------------------------------
EXPORT_FORMATS = ("peft", "adapterkit")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write an adapter in another format: --format peft writes what peft.PeftModel.from_pretrained reads "
        "(its base_model_name_or_path is the base's folder), --format adapterkit reads a peft folder and writes ours. "
        "The adapter is loaded onto its base to be checked, so the base must be at hand."
    )
    parser.add_argument("path", type=Path, help="adapter folder (adapterkit's, peft's or AdapterHub's)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the format to write; required")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder to write; required")
    parser.add_argument("--base", help="embedded base name or local model folder the adapter belongs to "
                                       "(default: the one it records, else the default base)")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that is not empty")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .bases import load_base, pretrained_path
    from .errors import BaseModelError
    from .io import read_adapter, write_folder_atomically
    from .methods import get_method, registered_methods
    from .model import AdapterModel
    from .names import is_valid_name

    output = args.output
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ConfigError(f"{output} is not empty: write into it anyway with --overwrite, or choose another --output")
    saved = read_adapter(args.path)
    method = saved.config.method
    if args.format == "peft" and get_method(method).peft is None:
        held = ", ".join(m.name for m in registered_methods() if m.peft is not None)
        raise ConfigError(f"a {method} adapter has no peft format; peft holds {held}")
    base_name = args.base or saved.base_name or default_base_name()
    try:
        base, _ = load_base(base_name)
    except BaseModelError as error:
        raise BaseModelError(f"{error}; give the adapter's base as --base" if not args.base else str(error)) from None
    name = saved.name or (output.name if is_valid_name(output.name) else "adapter")
    model = AdapterModel(base)
    model.load_adapter(args.path, name=name)
    write_folder_atomically(output, model.adapter_files(name, args.format))
    recorded = pretrained_path(base_name) if args.format == "peft" else base_name  # peft resolves folders and hub ids
    print(f"wrote the {method} adapter {name} in {args.format} format to {output} (base {recorded})")
    return 0


# ---- data ----------------------------------------------------------------------------------------
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="tool", required=True, metavar="{po2jsonl,split}")
    po = tools.add_parser("po2jsonl", help="gettext catalogs (.po) -> prompt/completion JSONL",
                          formatter_class=HelpFormatter,
                          description="Translation pairs from gettext catalogs; each pair names its prompt template, "
                                      "which the trained adapter records.")
    po.add_argument("catalogs", nargs="*", type=Path, help="catalog files (.po)")
    po.add_argument("--from-package", metavar="PACKAGE",
                    help="also every catalog for --lang inside this installed Python package "
                         "(its locale/<lang>/LC_MESSAGES/*.po), e.g. django")
    po.add_argument("--lang", required=True, help="the catalogs' language code, e.g. de")
    po.add_argument("-o", "--output", required=True, type=Path, help="JSONL file to write")
    po.set_defaults(handler=run_po2jsonl, parser=po)
    split = tools.add_parser("split", help="hold out a random share of a JSONL file", formatter_class=HelpFormatter,
                             description="Write a seeded random share of the examples to a held-out file "
                                         "and the rest to a training file.")
    split.add_argument("data", type=Path, help="JSONL file to split")
    split.add_argument("--held-out", type=float, default=0.1, help="share of the examples held out, between 0 and 1")
    split.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    split.add_argument("-o", "--output", nargs=2, type=Path, metavar=("TRAIN", "HELD_OUT"),
                       help="the two files to write (default: <data>.train.jsonl and <data>.heldout.jsonl beside it)")
    split.set_defaults(handler=run_split, parser=split)


def run_po2jsonl(args: argparse.Namespace) -> int:
    from .data import package_catalogs, po_to_jsonl

    catalogs = list(args.catalogs)
    if args.from_package:
        found = package_catalogs(args.from_package, args.lang)
        print(f"found {len(found)} catalogs for {args.lang!r} in {args.from_package}")
        catalogs += found
    if not catalogs:
        raise ConfigError("give catalog files, or --from-package PACKAGE")
    count = po_to_jsonl(catalogs, args.lang, args.output)
    print(f"wrote {count} pairs to {args.output}")
    return 0


def run_split(args: argparse.Namespace) -> int:
    from .data import split_jsonl

    train, held, n_train, n_held = split_jsonl(args.data, args.held_out, args.seed, args.output)
    print(f"wrote {n_train} training examples to {train} and {n_held} held-out examples to {held}")
    return 0


# ---- shared --------------------------------------------------------------------------------------
def _model_with_adapters(base_name: str, paths: Sequence[str], device: str | None = None, dtype: str | None = None,
                         quantize: str | None = None):
    """(model, tokenizer, {adapter name: its prompt template}): the base (on ``device``, in
    ``dtype``, ``quantize``d or not) with each adapter loaded under its saved name (made unique with a numeric suffix
    when two share one)."""
    from .bases import load_base
    from .io import read_adapter_config
    from .model import AdapterModel

    base, tokenizer = load_base(base_name, dtype, device, quantize)
    model = AdapterModel(base)
    adapters: dict[str, str | None] = {}
    for path in paths:
        document = read_adapter_config(path)
        saved = document.get("name") or "adapter"
        name, n = saved, 1
        while name in adapters:
            n += 1
            name = f"{saved}-{n}"
        adapters[model.load_adapter(path, name=name)] = document.get("prompt_template")  # checked by the load
    return model, tokenizer, adapters


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
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .serve.config import ServeConfig

    parser.description = (
        "Serve /v1/completions and /v1/chat/completions; a request's 'model' names an adapter inside "
        "--adapters (or the base's name). Concurrent requests run together as mixed-adapter batches. "
        "Completions take the prompt as sent; chat requests to an adapter that records a prompt template "
        "have their one user message put into it."
    )
    parser.add_argument("--base", help=BASE_HELP)
    parser.add_argument("--adapters", required=True, type=Path, help=(
        "folder of adapters, each served under its sub-folder's name: an adapter folder, or a training run's "
        "output folder (train -o runs/de: runs/de/adapter is served as de); required"))
    add_device_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="key for POST/DELETE /v1/adapters (default: $ADAPTERKIT_API_KEY; none: those are off)")
    for name in ServeConfig.names():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(ServeConfig, name),
                            help=ServeConfig.help_of(name))
    parser.add_argument("--compositions", type=Path,
                        help='JSON file naming compositions, e.g. {"de-legal": {"stack": ["de", "legal"]}}; '
                             'a request\'s model may name one')
    parser.add_argument("--ray", action="store_true", help=(
        "serve as a Ray Serve application: --replicas servers behind one ingress that sends each request to a "
        "replica already serving its adapter (pip install 'adapterkit[ray]'; docs/serving.md)"))
    parser.add_argument("--replicas", type=int, help="with --ray: how many servers (default: 1)")
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve
    from .serve.main import require_ray

    if args.replicas is not None and not args.ray:
        raise ConfigError("--replicas applies to --ray: add --ray")
    if args.ray:
        require_ray()
    config = ServeConfig(**{name: getattr(args, name) for name in ServeConfig.names()})
    api_key = args.api_key or os.environ.get("ADAPTERKIT_API_KEY") or None
    compositions = read_compositions(args.compositions) if args.compositions else None
    base = args.base or default_base_name()
    if args.ray:
        from .serve.ray import run

        run(base, args.adapters, args.host, args.port, 1 if args.replicas is None else args.replicas, api_key,
            config, compositions, args.device, args.dtype, args.quantize)
        return 0
    serve(base, args.adapters, args.host, args.port, api_key, config, compositions, device=args.device,
          dtype=args.dtype, quantize=args.quantize)
    return 0


def read_compositions(path: Path) -> dict:
    """{name: block} from a JSON file of {name: {"stack" | "average" | "fuse": [...]}}."""
    from .compose import compositions_from_json

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ConfigError(f"cannot read compositions from {path}: {error}") from None
    try:
        return compositions_from_json(document)
    except AdapterkitError as error:
        raise ConfigError(f"{path}: {error}") from None


def default_base_name() -> str:
    from .bases import default_base

    return default_base()


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "train": ("train an adapter on a JSONL file", add_train_arguments),
    "eval": ("score adapters (or the bare base) on a JSONL file", add_eval_arguments),
    "generate": ("answer prompts with one or more adapters, side by side", add_generate_arguments),
    "info": ("describe a saved adapter folder", add_info_arguments),
    "export": ("write an adapter in peft's format, or a peft adapter in ours", add_export_arguments),
    "data": ("prepare training data: po2jsonl, split", add_data_arguments),
    "serve": ("OpenAI-compatible HTTP server over one base and a folder of adapters", add_serve_arguments),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; only ``command``'s subparser gets its options, so that top-level help
    needs none of the heavy imports some options' choices do."""
    parser = argparse.ArgumentParser(prog="adapterkit", description="Adapters over one frozen base model.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"adapterkit {version('adapterkit')}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_text, add_arguments) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                          formatter_class=HelpFormatter)
        subparser.set_defaults(parser=subparser)
        if command == name:
            add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(unrecognized(args.parser, unknown))
    show_library_messages()
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except AdapterkitError as error:
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""  # under torchrun
        print(f"adapterkit: error: {rank}{error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `adapterkit info --json ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write at exit
        print("adapterkit: the output was closed before all of it was written", file=sys.stderr)
        return 1


def unrecognized(parser: argparse.ArgumentParser, arguments: list[str]) -> str:
    """argparse's message for unknown arguments, naming the closest flag to the first misspelt one."""
    message = f"unrecognized arguments: {' '.join(arguments)}"
    flags = [flag for action in parser._actions for flag in action.option_strings]
    for argument in arguments:
        if argument.startswith("-"):
            close = difflib.get_close_matches(argument.partition("=")[0], flags, n=1)
            if close:
                return f"{message}; did you mean {close[0]}?"
    return message


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
