"""lm-evaluation-harness over adapterkit.

``AdapterkitLM`` is an lm-eval model whose requests run through the generation engine, every row
through one adapter (or the bare base). It is registered with lm-eval as ``adapterkit``, so
``simple_evaluate(model="adapterkit", model_args=...)`` finds it once this module is imported;
``python -m adapterkit.integrations.lm_eval`` is lm-eval's own command line with it imported.

``evaluate_adapters`` scores several adapters in one pass: each adapter's ``simple_evaluate`` runs
unchanged on a thread of its own, the threads take turns, and whenever every one of them waits
for the model, all their requests go through one engine together, so rows of different adapters
share forward passes (mixed-adapter batches).

Tokenisation is lm-eval's Hugging Face backend's (``HFLM``): the class is a ``TemplateLM``, so
lm-eval's own ``_encode_pair`` encodes context and continuation together and splits them, and
``tok_encode``, ``prefix_token_id``, ``max_length`` and the rolling windows follow HFLM. On the same
base, loglikelihoods equal HFLM's for requests that fit the context.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import require_lm_eval

require_lm_eval()

import lm_eval  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import model_registry, register_model  # noqa: E402
from lm_eval.models.utils import (  # noqa: E402
    DEFAULT_MAX_LENGTH,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from torch import nn  # noqa: E402

from ..errors import AdapterNameError, ConfigError, GenerationError  # noqa: E402
from ..generation import ACTIVE, MAX_STOP_CHARS, MAX_STOPS, Engine, Generation, Sampling  # noqa: E402
from ..model import AdapterModel  # noqa: E402
from ..names import BASE  # noqa: E402

NAME = "adapterkit"  # the name lm-eval's --model takes
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's
SCORING = Sampling(max_tokens=0, prompt_logprobs=True, logprobs=1)  # each prompt token's logprob and the top token
GENERATION_OPTIONS = {"do_sample", "temperature", "top_p", "repetition_penalty", "until", "max_gen_toks"}

Runner = Callable[[list[Generation]], None]


def run_generations(model: nn.Module, tokenizer, generations: list[Generation], max_batch_size: int) -> None:
    """Every generation through one engine, longest prompts first, so that prompts of similar
    length are admitted together; a row that fails raises GenerationError."""
    Engine(model, tokenizer, max_batch_size).run(sorted(generations, key=lambda g: -len(g.prompt)))
    failed = next((g for g in generations if g.error is not None), None)
    if failed is not None:
        raise GenerationError(f"an lm-eval request failed: {failed.error}")


class AdapterkitLM(TemplateLM):
    """An lm-eval model over an adapterkit model: from Python ``AdapterkitLM(model, tokenizer,
    adapter="de")`` (``adapter`` None or "base": the bare base), or from lm-eval's model arguments
    ``base=FOLDER_OR_NAME,adapters=PATH|NAME:PATH|...,adapter=NAME,batch_size=32,device=cpu,dtype=float32``
    and ``quantize=nf4|fp4|int8`` (a QLoRA adapter scored over the base it trained on; several
    adapters are separated by ``|``, since lm-eval splits its arguments at commas; with one adapter
    loaded, ``adapter`` defaults to it).

    ``batch_size`` is the engine's most rows in flight ("auto": 32, or ``max_batch_size``). The
    model is put in eval mode (mixed-adapter batches are for inference). ``runner`` runs a list of
    generations; ``evaluate_adapters`` replaces it to pool several models' requests in one engine."""

    def __init__(
        self,
        model: nn.Module | None = None,
        tokenizer=None,
        adapter: str | None = None,
        *,
        base: str | None = None,
        adapters: str | Sequence[str] | None = None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            model, tokenizer, loaded = load_model(base, adapters, device, dtype, quantize)
            adapter = adapter if adapter is not None else _only(loaded)
        elif tokenizer is None or any(v is not None for v in (base, adapters, device, dtype, quantize)):
            raise ConfigError("give a model and its tokenizer, or base= (with adapters=, device=, dtype=, quantize=) "
                              "to load one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapter = None if adapter in (None, BASE) else adapter
        self.row_adapter = _row_adapter(model, self.adapter)
        self.max_batch_size = engine_rows(batch_size, max_batch_size)
        self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
        self._max_length, self._max_gen_toks = max_length, int(max_gen_toks)
        self._device = next(model.parameters()).device
        self.runner: Runner = functools.partial(run_generations, self.model, self.tokenizer,
                                                max_batch_size=self.max_batch_size)

    # ---- what lm-eval reads ----------------------------------------------------------------
    @property
    def label(self) -> str:
        """The adapter's name, or "base"."""
        return self.adapter or BASE

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by (HFLM's choice: the given id, else BOS, else EOS)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.max_batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """Goes into lm-eval's results["config"]."""
        return {"adapter": self.label, "base": getattr(self.model.config, "_name_or_path", None)}

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM's: the tokenizer's special tokens unless told, none when the text starts with the
        prefix token's text already."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    # ---- requests ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, whether it is the greedy continuation) per
        (key, context tokens, continuation tokens). A request longer than the context loses its
        first tokens: the engine feeds the scored last token too, so it keeps ``max_length``
        tokens where HFLM keeps ``max_length + 1``."""
        for _, _, continuation in requests:
            if len(continuation) >= self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's context "
                                  f"of {self.max_length} tokens")
        generations = [Generation((context + continuation)[-self.max_length :], SCORING, self.row_adapter)
                       for _, context, continuation in requests]
        self.runner(generations)
        return [continuation_score(g, len(c)) for g, (_, _, c) in zip(generations, requests, strict=True)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole loglikelihood in HFLM's windows (one token shorter: see
        ``_loglikelihood_tokens``), all windows of all texts in one run."""
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) answers, cut at the first of the ``until`` strings
        (and end-of-text), at most ``max_gen_toks`` tokens; contexts keep their last
        ``max_length - max_gen_toks`` tokens, as HFLM's do."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        rows = []
        for context, gen_kwargs in (request.args for request in requests):
            options = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            sampling = sampling_for(options, [stop for stop in until if stop != eos])
            room = self.max_length - sampling.max_tokens
            if room < 1:
                raise ConfigError(f"max_gen_toks {sampling.max_tokens} leaves no room for a context in the model's "
                                  f"{self.max_length} tokens")
            prompt = self.tok_encode(context, left_truncate_len=room)
            rows.append((Generation(prompt, sampling, self.row_adapter), until))
        self.runner([generation for generation, _ in rows])
        return [postprocess_generated_text(generation.text, until, None) for generation, until in rows]


def continuation_score(generation: Generation, length: int) -> tuple[float, bool]:
    """(sum of the last ``length`` prompt tokens' logprobs, whether each was the likeliest)."""
    scored = generation.prompt_logprobs[len(generation.prompt_logprobs) - length :]
    greedy = all(item.top and item.top[0][0] == item.token for item in scored)
    return sum(item.logprob for item in scored), greedy


def sampling_for(options: dict[str, Any], stops: list[str]) -> Sampling:
    """The engine's sampling for lm-eval's normalised generation options. The engine takes at most
    ``MAX_STOPS`` short stop strings; the rest still cut the text afterwards, so the answer is
    the same, only generated a little further."""
    unknown = sorted(set(options) - GENERATION_OPTIONS)
    if unknown:
        raise ConfigError(f"generation options {unknown} are not supported by adapterkit's engine; it takes "
                          f"{sorted(GENERATION_OPTIONS)}: drop them from the task's generation_kwargs")
    sampled = bool(options.get("do_sample"))
    return Sampling(
        max_tokens=int(options["max_gen_toks"]),
        temperature=float(options.get("temperature") or 0.0) if sampled else 0.0,
        top_p=float(options.get("top_p") or 1.0) if sampled else 1.0,
        repetition_penalty=float(options.get("repetition_penalty") or 1.0),
        stop=[stop for stop in stops if 0 < len(stop) <= MAX_STOP_CHARS][:MAX_STOPS],
    ).check()


def engine_rows(batch_size: int | str, max_batch_size: int | None) -> int:
    """The engine's most rows in flight from lm-eval's batch_size: a number, or "auto"/"auto:N"
    (which lm-eval's HF backend probes for; the engine's batches need no probing)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH_SIZE)
    try:
        rows = int(batch_size)
    except (TypeError, ValueError):
        rows = 0
    if rows < 1:
        raise ConfigError(f"batch_size must be a positive number of rows or 'auto', got {batch_size!r}")
    return rows


def adapter_paths(adapters: str | Sequence[str] | None) -> list[tuple[str | None, str]]:
    """[(name or None: the saved one, folder)] from "PATH|NAME:PATH|..." or a list of those."""
    items = adapters.split("|") if isinstance(adapters, str) else list(adapters or [])
    pairs = []
    for item in (str(item).strip() for item in items):
        name, colon, path = item.partition(":")
        named = colon and name and "/" not in name and "\\" not in name and not Path(item).exists()
        pairs.append((name, path) if named else (None, item))
    return [pair for pair in pairs if pair[1]]


def load_model(base: str | None, adapters: str | Sequence[str] | None, device: str | None,
               dtype: str | None, quantize: str | None) -> tuple[AdapterModel, Any, list[str]]:
    """(model, tokenizer, the loaded adapters' names) for lm-eval's string arguments."""
    from ..bases import default_base, load_base

    base_model, tokenizer = load_base(base or default_base(), dtype, device, quantize)
    model = AdapterModel(base_model)
    return model, tokenizer, [model.load_adapter(path, name=name) for name, path in adapter_paths(adapters)]


def _only(loaded: list[str]) -> str | None:
    if len(loaded) > 1:
        raise ConfigError(f"adapters= loaded {', '.join(loaded)}; "
                          "say which one runs with adapter=NAME (or adapter=base)")
    return loaded[0] if loaded else None


def _row_adapter(model: nn.Module, adapter: str | None):
    """What the engine's rows name: the adapter (None: the bare base), checked now rather than at
    the first forward pass; a model without adapters runs its rows as they are (ACTIVE)."""
    if not isinstance(model, AdapterModel):
        if adapter is not None:
            raise ConfigError(f"adapter={adapter!r} needs an adapterkit AdapterModel; this model is a plain "
                              f"{type(model).__name__}")
        return ACTIVE
    if adapter is not None and adapter not in model.adapters and adapter not in model.compositions:
        known = ", ".join([*model.adapters, *model.compositions]) or "none"
        raise AdapterNameError(f"no adapter or composition named {adapter!r}; this model has: {known}")
    return adapter


if NAME not in model_registry:
    register_model(NAME)(AdapterkitLM)


# ---- several adapters in one pass --------------------------------------------------------------
class _Stopped(BaseException):
    """Ends a turn's thread early (a BaseException, so that no ``except Exception`` in lm-eval
    catches it)."""


class _Turn:
    """One evaluation on a thread of its own that runs only while the coordinator waits for it:
    from its start or its last model call to its next model call (``hand_over``) or its end.
    Turns never run at the same time, so lm-eval runs exactly as it would alone."""

    def __init__(self, evaluate: Callable[[Runner], Any]) -> None:
        self._evaluate = evaluate
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self.pending: list[Generation] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = self.stopping = False
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        self._go.acquire()
        try:
            if not self.stopping:
                self.result = self._evaluate(self.hand_over)
        except BaseException as error:  # handed to the coordinator, which raises it
            self.error = error
        finally:
            self.done = True
            self._paused.release()

    def hand_over(self, generations: list[Generation]) -> None:
        """On this turn's thread: wait until the coordinator has run ``generations``."""
        self.pending = generations
        self._paused.release()
        self._go.acquire()
        if self.stopping:
            raise _Stopped()

    def take(self) -> None:
        """On the coordinator's thread: let this turn run until it hands over or ends."""
        self._go.release()
        self._paused.acquire()

    def stop(self) -> None:
        if not self.done:
            self.stopping = True
            self.take()
        self._thread.join()


def in_lockstep(evaluations: dict[str, Callable[[Runner], Any]], runner: Runner) -> dict[str, Any]:
    """{label: evaluation(hand_over)}, each evaluation on a thread of its own, taking turns; an
    evaluation's model calls give their generations to ``hand_over``, and once every evaluation
    waits (or is done), ``runner`` runs all the waiting generations together."""
    turns = {label: _Turn(evaluate) for label, evaluate in evaluations.items()}
    try:
        while live := [turn for turn in turns.values() if not turn.done]:
            for turn in live:
                turn.take()
            failed = next((turn.error for turn in turns.values() if turn.error is not None), None)
            if failed is not None:
                raise failed
            runner([generation for turn in live if not turn.done for generation in turn.pending])
    finally:
        for turn in turns.values():
            turn.stop()
    return {label: turn.result for label, turn in turns.items()}


def task_manager(tasks: Sequence[Any], include_path: str | Path | None = None):
    """lm-eval's TaskManager for ``tasks``. With ``include_path``, lm-eval's own task folders
    (thousands of YAML files, seconds to index) are read only when a named task is not there."""
    from lm_eval.tasks import TaskManager

    names = [task for task in tasks if isinstance(task, str)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"no task folder at {include_path}")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in manager.all_tasks for name in names):
            return manager
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f"in {include_path} nor " if include_path is not None else ""
        raise ConfigError(f"no lm-eval task named {unknown[0]!r} {where}among lm-eval's own; "
                          "a local task is a YAML file in the folder given as the include path")
    return manager


def evaluate_adapters(
    model: AdapterModel,
    tokenizer,
    adapters: Sequence[str | None],
    tasks: Sequence[Any],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include_path: str | Path | None = None,
    **options: Any,
) -> dict[str, dict]:
    """{adapter name, or "base" for None: lm-eval's results} for every adapter on ``tasks``, in one
    pass: each adapter's ``lm_eval.simple_evaluate(**options)`` runs as it would alone, but all
    their requests go through one engine, ``batch_size`` rows at a time, rows of different
    adapters in the same forward passes. ``options`` are simple_evaluate's (limit, num_fewshot,
    task_manager, log_samples, ...)."""
    labels = [adapter or BASE for adapter in adapters]
    if not labels or len(set(labels)) < len(labels):
        raise ConfigError(f"adapters must name each adapter once (None: the bare base), got {list(adapters)}")
    if options.get("task_manager") is None:
        options["task_manager"] = task_manager(tasks, include_path)
    models = {label: AdapterkitLM(model, tokenizer, adapter, batch_size=batch_size)
              for label, adapter in zip(labels, adapters, strict=True)}
    runner = functools.partial(run_generations, model, tokenizer, max_batch_size=engine_rows(batch_size, None))

    def evaluate(lm: AdapterkitLM, hand_over: Runner) -> dict:
        lm.runner = hand_over
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **options)

    return in_lockstep({label: functools.partial(evaluate, lm) for label, lm in models.items()}, runner)


def main() -> None:
    """lm-eval's own command line with the ``adapterkit`` model registered: lm-eval finds models
    only in its registry and has no plugin entry point, so this module must be imported first."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
