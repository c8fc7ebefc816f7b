import json

import pytest
import torch
from conftest import tiny_tokenizer

from adapterkit.data import (
    IGNORE_INDEX,
    collate,
    length_bucketed_batches,
    parse_po,
    po_to_jsonl,
    read_jsonl,
    split_held_out,
    tokenize_example,
)
from adapterkit.errors import DataError

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


def test_parse_po_reads_every_kind_of_entry():
    entries = {(e.msgctxt, e.msgid): e for e in parse_po(CATALOG)}
    assert entries[(None, "%s item")].msgid_plural == "%s items"
    assert entries[(None, "%s item")].msgstr == {0: "%s elemento", 1: "%s de elementos", 2: "%s elementos"}
    assert entries[(None, "Guessed")].fuzzy
    assert entries[(None, "Gone")].obsolete
    assert not entries[(None, "Tab\there")].obsolete and entries[(None, "Tab\there")].msgstr == {0: "Tab\taquí"}
    assert entries[(None, "A long string {0}")].msgstr[0] == "Una cadena larga {0}"
    assert entries[("month name", "May")].msgstr[0] == "Mayo"
    assert not entries[(None, "Hello %(name)s")].fuzzy


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


def test_malformed_po_names_the_line():
    with pytest.raises(DataError, match=r"cat.po:2: unknown keyword"):
        parse_po('msgid "a"\nmsgstring "b"\n', "cat.po")


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
