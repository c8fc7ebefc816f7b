"""Training data: gettext catalogs to JSONL pairs, JSONL reading, tokenisation with loss masks,
and length-bucketed batches.

A training file is JSONL, one example a line: ``{"prompt": ..., "completion": ...}`` or
``{"messages": [...]}`` (rendered with the tokenizer's chat template; the last message is the
assistant's answer). Loss is taken on completion tokens only. A prompt example may say the format
its prompt is written in, ``"prompt_template": "English: {prompt}\nGerman:"`` (its prompt is the
filled-in text): an adapter trained on such examples records that template, and generation then
puts new text into it (see ``adapterkit.templates``).
"""

from __future__ import annotations

import dataclasses
import functools
import gettext
import importlib.util
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import polib
import torch

from .errors import ConfigError, DataError
from .io.folders import write_files_atomically
from .templates import CHAT, SLOT, check_template, render_prompt

IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross_entropy default)

LANGUAGE_NAMES = {
    "ar": "Arabic", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek",
    "es": "Spanish", "fi": "Finnish", "fr": "French", "hu": "Hungarian", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "nl": "Dutch", "nb": "Norwegian", "pl": "Polish", "pt": "Portuguese", "pt_BR": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "zh_Hans": "Chinese",
}


# ---- gettext catalogs ------------------------------------------------------------------------------
def read_catalog(path: str | Path) -> polib.POFile:
    """A gettext catalog parsed by polib; a missing or malformed file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():  # polib would parse a missing path's name as catalog text
        raise DataError(f"no catalog file at {path}")
    try:
        return polib.pofile(str(path))
    except (OSError, ValueError) as error:  # polib: OSError for syntax, UnicodeDecodeError for encoding
        raise DataError(f"{path} is not a valid gettext catalog ({error}); fix the file or leave it out") from None


def plural_index_for_many(catalog: polib.POFile) -> int:
    """The msgstr index a catalog uses for n=2 (its Plural-Forms header says which)."""
    forms = next((value for key, value in catalog.metadata.items() if key.lower() == "plural-forms"), "")
    expression = forms.partition("plural=")[2].strip().rstrip(";")
    try:
        return int(gettext.c2py(expression)(2))
    except (ValueError, SyntaxError, ZeroDivisionError):  # no header, or one gettext cannot evaluate
        return 1


def catalog_pairs(catalog: polib.POFile, language: str) -> list[dict[str, str]]:
    """Prompt/completion pairs from a catalog's usable entries.

    Fuzzy, obsolete, untranslated and header entries are skipped. A plural entry gives two pairs:
    the singular and the plural (the form used for n=2). A context goes into the prompt, because it
    is what tells "May" the month from "May" the verb. Each pair names its template,
    ``translation_template(language)``."""
    target = LANGUAGE_NAMES.get(language, language)
    template = translation_template(language)
    many = plural_index_for_many(catalog)
    pairs = []
    for entry in catalog:
        if entry.fuzzy or entry.obsolete or not entry.msgid:
            continue
        translations = entry.msgstr_plural or {0: entry.msgstr}
        forms = [(entry.msgid, translations.get(0, ""))]
        if entry.msgid_plural:
            forms.append((entry.msgid_plural, translations.get(many, "")))
        for source, translation in forms:
            if source.strip() and translation.strip():
                pairs.append({"prompt": format_prompt(source, target, entry.msgctxt), "completion": " " + translation,
                              "prompt_template": template})
    return pairs


def format_prompt(text: str, target_language: str, context: str | None = None) -> str:
    """The compact translation prompt: ``English: <text>\\n<Language>:``."""
    label = f"English ({context})" if context else "English"
    return f"{label}: {text}\n{target_language}:"


def translation_template(language: str) -> str:
    """The prompt template of translation pairs into ``language``: "English: {prompt}\\n<Language>:"."""
    return format_prompt(SLOT, LANGUAGE_NAMES.get(language, language))


def package_catalogs(package: str, language: str) -> list[Path]:
    """The gettext catalogs for ``language`` inside an installed package (every
    ``locale/<language>/LC_MESSAGES/*.po`` under it), in path order."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"no installed package named {package!r}; "
                        f"install it (pip install {package}) or give the .po files' paths")
    roots = [Path(location) for location in spec.submodule_search_locations]
    found = sorted(path for root in roots for path in root.glob(f"**/locale/{language}/LC_MESSAGES/*.po"))
    if not found:
        languages = sorted({path.parent.parent.name for root in roots
                            for path in root.glob("**/locale/*/LC_MESSAGES/*.po")})
        raise DataError(f"{package} holds no catalogs for language {language!r}; "
                        f"it has: {', '.join(languages) or 'none'}")
    return found


def pairs_from_catalogs(catalogs: Iterable[str | Path], language: str) -> list[dict[str, str]]:
    """The unique prompt/completion pairs of one or more catalogs, in catalog order."""
    return unique_pairs(
        pair for catalog in catalogs
        for pair in catalog_pairs(read_catalog(catalog), language)
    )


def po_to_jsonl(catalogs: Iterable[str | Path], language: str, output: str | Path) -> int:
    """Write the unique pairs of one or more catalogs to a JSONL file; returns how many."""
    catalogs = [Path(catalog) for catalog in catalogs]
    check_outputs([Path(output)], catalogs)
    pairs = pairs_from_catalogs(catalogs, language)
    write_jsonl(output, pairs)
    return len(pairs)


def split_jsonl(
    path: str | Path, fraction: float, seed: int, outputs: tuple[str | Path, str | Path] | None = None
) -> tuple[Path, Path, int, int]:
    """Write a seeded ``fraction`` of a JSONL file's examples to a held-out file and the rest to
    a training file (default: <stem>.train.jsonl and <stem>.heldout.jsonl beside it); returns
    (train path, held-out path, train count, held-out count)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the held-out fraction must be between 0 and 1, got {fraction!r}")
    path = Path(path)
    examples = read_jsonl(path)
    train, held = split_held_out(examples, fraction, seed)
    if not train:
        raise DataError(f"{path} holds {len(examples)} example(s): "
                        f"too few to hold {fraction:g} of them out and train on the rest")
    train_path, held_path = ((Path(p) for p in outputs) if outputs
                             else (path.with_suffix(".train.jsonl"), path.with_suffix(".heldout.jsonl")))
    check_outputs([train_path, held_path], [path])
    write_jsonl_files({train_path: train, held_path: held})
    return train_path, held_path, len(train), len(held)


def check_outputs(outputs: list[Path], inputs: list[Path]) -> None:
    """Refuse output files that are folders, that are one of the inputs (writing would destroy
    what is being read) or that are named twice."""
    for index, output in enumerate(outputs):
        if output.is_dir():
            raise ConfigError(f"{output} is a folder; name a file to write")
        if any(same_file(output, source) for source in inputs):
            raise ConfigError(f"{output} is also an input, which writing it would destroy; name a new file")
        if any(same_file(output, other) for other in outputs[:index]):
            raise ConfigError(f"{output} is named twice as an output; name different files")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links, ``..`` or hard links too)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def unique_pairs(pairs: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """The first pair for each prompt: a prompt with two answers only teaches noise."""
    seen: dict[str, dict[str, str]] = {}
    for pair in pairs:
        seen.setdefault(pair["prompt"], pair)
    return list(seen.values())


# ---- JSONL --------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    """All examples of a JSONL file, each checked; any bad line raises before anything is used."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    examples = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            example = _parse_line(raw)
        except ValueError as error:
            raise DataError(f"{path}:{number}: {error}") from None
        if example is None:
            continue
        problem = _example_problem(example)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        examples.append(example)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _parse_line(raw: bytes) -> object:
    """One JSONL line's value (None for a blank line). Decoded here, not by open(), so that bad
    bytes, lone surrogates and runaway nesting become a ValueError saying what is wrong, rather than
    a traceback now or a crash later in the tokenizer."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                         "save the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeEncodeError as error:
        raise ValueError(
            f"a string holds the lone surrogate \\u{ord(error.object[error.start]):04x}, which is not a character; "
            "write the character itself or its full surrogate pair"
        ) from None
    return value


def _example_problem(example) -> str | None:
    if not isinstance(example, dict):
        return "expected a JSON object"
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for message in messages:
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                return 'each message needs a string "role" and "content"'
        if messages[-1]["role"] != "assistant":
            return 'the last message must be the "assistant" answer to learn'
        return None
    if not isinstance(example.get("prompt"), str) or not isinstance(example.get("completion"), str):
        return 'expected {"prompt": str, "completion": str} or {"messages": [...]}'
    if not example["completion"]:
        return '"completion" is empty'
    if "prompt_template" in example:
        try:
            check_template(example["prompt_template"], '"prompt_template"')
        except ConfigError as error:
            return str(error)
    return None


def template_of(example: dict) -> str | None:
    """The format an example's prompt is in: "chat" for messages, else what it says (None: unsaid)."""
    return CHAT if "messages" in example else example.get("prompt_template")


def apply_template(examples: list[dict], template: str | None, tokenizer=None) -> list[dict]:
    """The examples, those prompt examples that do not say their format put into ``template``
    (and then saying it); the others, and all of them for ``template`` None, as they are."""
    if template is None:
        return examples
    return [
        example if template_of(example) is not None
        else {**example, "prompt": render_prompt(template, example["prompt"], tokenizer), "prompt_template": template}
        for example in examples
    ]


def write_jsonl(path: str | Path, examples: Iterable[dict]) -> None:
    """Write a JSONL file atomically (see ``write_jsonl_files``)."""
    write_jsonl_files({Path(path): examples})


def write_jsonl_files(files: dict[Path, Iterable[dict]]) -> None:
    """Write JSONL files all or nothing: a failed write (a full disk) leaves no partial file and
    keeps any old one, and is a DataError naming the file."""
    try:
        for path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
        write_files_atomically({path: functools.partial(_write_examples, rows) for path, rows in files.items()})
    except OSError as error:
        raise DataError(f"cannot write {error.filename}: {error.strerror}") from None


def _write_examples(examples: Iterable[dict], handle: BinaryIO) -> None:
    for example in examples:
        handle.write((json.dumps(example, ensure_ascii=False) + "\n").encode("utf-8"))


def prompt_and_completion(example: dict, tokenizer) -> tuple[str, str]:
    """The text the model reads and the text it must learn to write."""
    if "messages" not in example:
        return example["prompt"], example["completion"]
    messages = example["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the conversation differently with and without its answer")
    return prompt, full[len(prompt):]


# ---- tokenising and batching -------------------------------------------------------------------
@dataclasses.dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def tokenize_example(example: dict, tokenizer, max_length: int) -> TokenizedExample:
    """Prompt and completion tokenised separately and joined, so the loss mask falls exactly on the
    completion; an end-of-text token follows plain completions so the model learns to stop.
    Over-long examples lose the start of the prompt, never the completion's start."""
    prompt, completion = prompt_and_completion(example, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if "messages" not in example and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    completion_ids = completion_ids[:max_length]
    prompt_ids = (prompt_ids[max(0, len(prompt_ids) - (max_length - len(completion_ids))):]
                  if len(completion_ids) < max_length else [])
    return TokenizedExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def tokenize_all(examples: list[dict], tokenizer, max_length: int) -> list[TokenizedExample]:
    return [tokenize_example(example, tokenizer, max_length) for example in examples]


def length_bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices with similar lengths, so little compute goes to padding.

    Each epoch shuffles (seeded by seed and epoch) before a stable sort by length, so equal-length
    examples meet different partners, and then shuffles the order of the batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding carries no loss)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_held_out(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a seeded random ``fraction`` of the examples held out for evaluation."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(examples) * fraction))
    held = set(order[:n_held])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
