import errno
import json
import os
import re

import pytest
import torch

from adapterkit.data import (
    IGNORE_INDEX,
    collate,
    length_bucketed_batches,
    pairs_from_catalogs,
    po_to_jsonl,
    read_jsonl,
    split_held_out,
    tokenize_example,
)
from adapterkit.errors import ConfigError, DataError
from conftest import tiny_tokenizer

CATALOG = r'''# A translator's comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=3; plural=n == 1 ? 0 : n != 0 && n % 1000000 == 0 ? 1 : 2;\n"

#: models.py:1
#, python-format
msgid "Hello %(name)s"
msgstr "Hola %(name)s"

msgctxt "month name"
msgid "May"
msgstr "Mayo"

msgctxt "verb"
msgid "May"
msgstr "Poder"

#, python-format
msgid "%s item"
msgid_plural "%s items"
msgstr[0] "%s elemento"
msgstr[1] "%s de elementos"
msgstr[2] "%s elementos"

#, fuzzy
msgid "Guessed"
msgstr "Adivinado"

msgid "Untranslated"
msgstr ""

msgid ""
"A long "
"string {0}"
msgstr ""
"Una cadena "
"larga {0}"

#~ msgid "Gone"
#~ msgstr "Ido"
msgid "Tab\there"
msgstr "Tab\taquí"
'''


ES = "English: {prompt}\nSpanish:"  # the template every Spanish pair names


def write_catalog(folder, text, name="es.po"):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_catalog_pairs_come_in_catalog_order_from_every_kind_of_entry(tmp_path):
    pairs = pairs_from_catalogs([write_catalog(tmp_path, CATALOG)], "es")
    assert pairs == [
        {"prompt": "English: Hello %(name)s\nSpanish:", "completion": " Hola %(name)s", "prompt_template": ES},
        {"prompt": "English (month name): May\nSpanish:", "completion": " Mayo", "prompt_template": ES},
        {"prompt": "English (verb): May\nSpanish:", "completion": " Poder", "prompt_template": ES},
        {"prompt": "English: %s item\nSpanish:", "completion": " %s elemento", "prompt_template": ES},
        {"prompt": "English: %s items\nSpanish:", "completion": " %s elementos", "prompt_template": ES},
        {"prompt": "English: A long string {0}\nSpanish:", "completion": " Una cadena larga {0}",
         "prompt_template": ES},
        {"prompt": "English: Tab\there\nSpanish:", "completion": " Tab\taquí", "prompt_template": ES},
    ]


@pytest.mark.parametrize("plural_forms, many", [
    ("nplurals=2; plural=(n != 1);", "%s de elementos"),  # German-style: index 1 for n=2
    ("nplurals=3; plural=n == 1 ? 0 : n == 2 ? 2 : 1;", "%s elementos"),
    ("nplurals=3; plural=n % 0;", "%s de elementos"),  # cannot be evaluated: index 1, as without a header
])
def test_the_plural_pair_uses_the_form_the_header_picks_for_two(tmp_path, plural_forms, many):
    text = CATALOG.replace("nplurals=3; plural=n == 1 ? 0 : n != 0 && n % 1000000 == 0 ? 1 : 2;", plural_forms)
    assert plural_forms in text
    pairs = {p["prompt"]: p["completion"] for p in pairs_from_catalogs([write_catalog(tmp_path, text)], "es")}
    assert pairs["English: %s items\nSpanish:"] == " " + many


def test_pairs_from_several_catalogs_keep_the_first_answer_per_prompt(tmp_path):
    first = write_catalog(tmp_path, 'msgid "Yes"\nmsgstr "Sí"\n\nmsgid "No"\nmsgstr "No"\n', "a.po")
    second = write_catalog(tmp_path, 'msgid "Yes"\nmsgstr "Vale"\n\nmsgid "Maybe"\nmsgstr "Quizás"\n', "b.po")
    assert pairs_from_catalogs([first, second], "es") == [
        {"prompt": "English: Yes\nSpanish:", "completion": " Sí", "prompt_template": ES},
        {"prompt": "English: No\nSpanish:", "completion": " No", "prompt_template": ES},
        {"prompt": "English: Maybe\nSpanish:", "completion": " Quizás", "prompt_template": ES},
    ]


def test_po2jsonl_skips_fuzzy_empty_obsolete_and_keeps_placeholders(tmp_path):
    catalog = tmp_path / "es.po"
    catalog.write_text(CATALOG, encoding="utf-8")
    count = po_to_jsonl([catalog], "es", tmp_path / "es.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "es.jsonl").read_text(encoding="utf-8").splitlines()]
    assert count == len(pairs)
    by_prompt = {p["prompt"]: p["completion"] for p in pairs}
    assert by_prompt == {
        "English: Hello %(name)s\nSpanish:": " Hola %(name)s",
        "English (month name): May\nSpanish:": " Mayo",
        "English (verb): May\nSpanish:": " Poder",
        "English: %s item\nSpanish:": " %s elemento",
        "English: %s items\nSpanish:": " %s elementos",  # the form for n=2 under this Plural-Forms
        "English: A long string {0}\nSpanish:": " Una cadena larga {0}",
        "English: Tab\there\nSpanish:": " Tab\taquí",
    }


@pytest.mark.parametrize("content, why", [
    (b'msgid "a"\nmsgstring "b"\n', r"Syntax error in po file .*cat\.po \(line 2\)"),
    (b'msgid "a"\nmsgstr "\xff\xfe"\n', "'utf-8' codec can't decode byte 0xff"),
])
def test_a_malformed_catalog_raises_data_error_naming_the_file(tmp_path, content, why):
    catalog = tmp_path / "cat.po"
    catalog.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(catalog))} is not a valid gettext catalog \({why}"):
        pairs_from_catalogs([catalog], "es")
    with pytest.raises(DataError, match=rf"^no catalog file at {re.escape(str(tmp_path / 'missing.po'))}$"):
        po_to_jsonl([tmp_path / "missing.po"], "es", tmp_path / "out.jsonl")


def test_read_jsonl_reports_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    for bad, why in [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": "a"}), "expected"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "assistant"),
        (json.dumps([1, 2]), "JSON object"),
    ]:
        path.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"train.jsonl:4: .*{why}"):
            read_jsonl(path)
    path.write_text(f"{good}\n{good}\n", encoding="utf-8")
    assert len(read_jsonl(path)) == 2


@pytest.mark.parametrize("bad, why", [
    (b'{"prompt": "a", "completion": "\xff"}', "not UTF-8 text (byte 0xff at column 32); save the file as UTF-8"),
    (b'{"prompt": "\xed\xa0\x80", "completion": "x"}',
     "not UTF-8 text (byte 0xed at column 13); save the file as UTF-8"),
    (b'{"prompt": "\\ud800", "completion": "x"}',
     "a string holds the lone surrogate \\ud800, which is not a character; "
     "write the character itself or its full surrogate pair"),
    (b"[" * 100_000, "JSON nested too deeply"),
])
def test_read_jsonl_reports_undecodable_lines_as_data_errors(tmp_path, bad, why):
    path = tmp_path / "train.jsonl"
    good = b'{"prompt": "a", "completion": "b"}'
    path.write_bytes(good + b"\n\n" + good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value) == f"{path}:4: {why}"


def test_read_jsonl_takes_surrogate_pairs_and_any_line_ending(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "\\ud83d\\ude00", "completion": "x"}\r\n\r{"prompt": "\xc3\xa4", "completion": "y"}')
    assert read_jsonl(path) == [{"prompt": "\U0001f600", "completion": "x"}, {"prompt": "ä", "completion": "y"}]


def test_loss_mask_covers_exactly_the_completion_and_eos():
    tokenizer = tiny_tokenizer()
    example = tokenize_example({"prompt": "English: cat\nGerman:", "completion": " Katze"}, tokenizer, max_length=64)
    n_prompt = len("English: cat\nGerman:")
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert tokenizer.decode(example.input_ids[n_prompt:-1]) == " Katze"
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_completion_and_cuts_the_prompt_start():
    tokenizer = tiny_tokenizer()
    example = tokenize_example({"prompt": "0123456789", "completion": "abc"}, tokenizer, max_length=6)
    assert tokenizer.decode(example.input_ids) == "89abc</s>"
    assert example.labels[:2] == [IGNORE_INDEX] * 2


def test_chat_examples_learn_only_the_answer():
    tokenizer = tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    example = tokenize_example({"messages": messages}, tokenizer, max_length=64)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == " yo\n"
    assert tokenizer.decode(example.input_ids) == "user: hi\nassistant: yo\n"


def test_collate_pads_right_without_loss_on_padding():
    tokenizer = tiny_tokenizer()
    examples = [tokenize_example({"prompt": p, "completion": "x"}, tokenizer, 64) for p in ("ab", "abcdef")]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 4
    assert (batch["labels"][0, 4:] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][1], torch.tensor(examples[1].input_ids))


def test_length_buckets_group_similar_lengths_and_are_seeded():
    lengths = [1, 50, 2, 49, 3, 48, 4, 47]
    batches = length_bucketed_batches(lengths, batch_size=4, seed=0, epoch=0)
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[1, 2, 3, 4], [47, 48, 49, 50]]
    assert batches == length_bucketed_batches(lengths, batch_size=4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))


def test_held_out_split_is_disjoint_and_seeded():
    examples = [{"prompt": str(i), "completion": "x"} for i in range(50)]
    train, held = split_held_out(examples, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    assert (train, held) == split_held_out(examples, 0.1, seed=3)


def test_the_catalogs_of_an_installed_package_are_found_by_language():
    from adapterkit.data import package_catalogs

    found = package_catalogs("django", "de")
    assert found == sorted(found) and all(path.parent.parts[-3:] == ("locale", "de", "LC_MESSAGES") for path in found)
    names = {path.as_posix().rpartition("/django/")[2] for path in found}
    assert {"conf/locale/de/LC_MESSAGES/django.po", "contrib/admin/locale/de/LC_MESSAGES/djangojs.po"} <= names
    assert len(found) == len(set(found)) >= 10  # the core's and every contrib app's
    with pytest.raises(DataError, match=r"^django holds no catalogs for language 'xx'; it has: .*\bde\b"):
        package_catalogs("django", "xx")
    with pytest.raises(DataError, match=r"^no installed package named 'no_such_pkg'"):
        package_catalogs("no_such_pkg", "de")


def test_split_writes_both_files_next_to_the_input_and_keeps_every_field(tmp_path):
    from adapterkit.data import split_jsonl

    source = tmp_path / "de.jsonl"
    examples = [{"prompt": f"English: w{i}\nGerman:", "completion": f" v{i}",
                 "prompt_template": "English: {prompt}\nGerman:"} for i in range(20)]
    source.write_text("".join(json.dumps(e) + "\n" for e in examples))
    train_path, held_path, n_train, n_held = split_jsonl(source, 0.1, seed=0)
    assert (train_path, held_path, n_train, n_held) == (tmp_path / "de.train.jsonl", tmp_path / "de.heldout.jsonl",
                                                        18, 2)
    assert (read_jsonl(train_path), read_jsonl(held_path)) == split_held_out(examples, 0.1, seed=0)
    assert split_jsonl(source, 0.25, 1, (tmp_path / "a.jsonl", tmp_path / "b.jsonl"))[2:] == (15, 5)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(examples[0]) + "\n")
    with pytest.raises(DataError, match=r"one.jsonl holds 1 example\(s\): too few"):
        split_jsonl(one, 0.5, 0)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_jsonl(source, 1.0, 0)


def test_a_template_fills_only_prompts_that_do_not_say_their_format(tmp_path):
    from adapterkit.data import apply_template, template_of

    raw = {"prompt": "cat", "completion": " Katze"}
    said = {"prompt": "Q: dog\nA:", "completion": " Hund", "prompt_template": "Q: {prompt}\nA:"}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hallo"}]}
    filled = apply_template([raw, said, chat], "English: {prompt}\nGerman:")
    assert filled == [{"prompt": "English: cat\nGerman:", "completion": " Katze",
                       "prompt_template": "English: {prompt}\nGerman:"}, said, chat]
    assert [template_of(e) for e in filled] == ["English: {prompt}\nGerman:", "Q: {prompt}\nA:", "chat"]
    assert apply_template([raw], None) == [raw]
    written_out = {"prompt": "English: cow\nGerman:", "completion": " Kuh"}  # already in the format: not wrapped twice
    assert apply_template([written_out], "English: {prompt}\nGerman:")[0]["prompt"] == "English: cow\nGerman:"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**raw, "prompt_template": "German:"}) + "\n")
    with pytest.raises(DataError, match=r'bad.jsonl:1: "prompt_template" must be text holding \{prompt\}'):
        read_jsonl(bad)


# ---- output files ----------------------------------------------------------------------------------
def run_cli(argv, capsys):
    """(exit code, stderr) of `adapterkit ARGV`."""
    from adapterkit.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def files_in(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def jsonl_source(folder):
    source = folder / "de.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"w{i}", "completion": f" v{i}"}) + "\n" for i in range(20)))
    return source


@pytest.mark.parametrize("spelling", ["same", "dotdot", "hard link", "symbolic link"])
def test_po2jsonl_refuses_to_write_over_one_of_its_catalogs(tmp_path, capsys, spelling):
    catalog = write_catalog(tmp_path, CATALOG)
    (tmp_path / "sub").mkdir()
    output = {"same": catalog, "dotdot": tmp_path / "sub" / ".." / "es.po", "hard link": tmp_path / "hard.po",
              "symbolic link": tmp_path / "soft.po"}[spelling]
    if spelling == "hard link":
        os.link(catalog, output)
    if spelling == "symbolic link":
        output.symlink_to(catalog)
    before = files_in(tmp_path)
    code, err = run_cli(["data", "po2jsonl", str(catalog), "--lang", "es", "-o", str(output)], capsys)
    message = f"{output} is also an input, which writing it would destroy; name a new file"
    assert (code, err) == (2, f"adapterkit: error: {message}\n")
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("outputs, message", [
    (("folder", "b.jsonl"), "{folder} is a folder; name a file to write"),
    (("a.jsonl", "folder"), "{folder} is a folder; name a file to write"),
    (("a.jsonl", "sub/../de.jsonl"), "{1} is also an input, which writing it would destroy; name a new file"),
    (("a.jsonl", "sub/../a.jsonl"), "{1} is named twice as an output; name different files"),
], ids=["train folder", "held-out folder", "the input", "one file twice"])
def test_split_refuses_outputs_that_are_folders_the_input_or_one_file_twice(tmp_path, capsys, outputs, message):
    source = jsonl_source(tmp_path)
    for folder in ("folder", "sub"):
        (tmp_path / folder).mkdir()
    paths = [tmp_path / name for name in outputs]
    before = files_in(tmp_path)
    code, err = run_cli(["data", "split", str(source), "-o", *map(str, paths)], capsys)
    expected = message.format(*paths, folder=tmp_path / "folder")
    assert (code, err) == (2, f"adapterkit: error: {expected}\n")
    assert files_in(tmp_path) == before


def test_split_onto_a_full_device_writes_neither_file(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    source = jsonl_source(tmp_path)
    before = files_in(tmp_path)
    code, err = run_cli(["data", "split", str(source), "-o", str(tmp_path / "a.jsonl"), "/dev/full"], capsys)
    assert (code, err) == (2, "adapterkit: error: cannot write /dev/full: No space left on device\n")
    assert files_in(tmp_path) == before


def test_a_full_disk_keeps_the_old_output_files_and_leaves_no_partial_ones(tmp_path, capsys, monkeypatch):
    source, catalog = jsonl_source(tmp_path), write_catalog(tmp_path, CATALOG)
    train, held = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    train.write_text("old training file\n")
    held.write_text("old held-out file\n")
    before = files_in(tmp_path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    code, err = run_cli(["data", "split", str(source), "-o", str(train), str(held)], capsys)
    assert (code, err) == (2, f"adapterkit: error: cannot write {train}: No space left on device\n")
    code, err = run_cli(["data", "po2jsonl", str(catalog), "--lang", "es", "-o", str(held)], capsys)
    assert (code, err) == (2, f"adapterkit: error: cannot write {held}: No space left on device\n")
    assert files_in(tmp_path) == before
    monkeypatch.undo()
    assert run_cli(["data", "split", str(source), "-o", str(train), str(held)], capsys)[0] == 0
    assert (len(read_jsonl(train)), len(read_jsonl(held))) == (18, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "de.jsonl", "es.po"]
