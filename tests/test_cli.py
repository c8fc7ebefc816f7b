import json

import pytest
import sacrebleu
from conftest import tiny_llama, tiny_tokenizer

from adapterkit.cli import main, parse_layers
from adapterkit.evaluate import chrf, evaluate

PAIRS = [("cat", "Katze"), ("dog", "Hund"), ("house", "Haus"), ("tree", "Baum"), ("sun", "Sonne"), ("moon", "Mond")]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "de.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"English: {e}\nGerman:", "completion": f" {g}"}) + "\n" for e, g in PAIRS))
    return path


def test_train_info_eval_generate(tmp_path, base_dir, data, capsys):
    out = tmp_path / "run"
    options = tmp_path / "options.yaml"
    options.write_text("lr: 0.01\nbatch_size: 3\nadapter:\n  bottleneck_size: 4\n  dropout: 0.0\n")
    code = main([
        "train", "--config", str(options), "--train", str(data), "--eval", str(data), "-o", str(out), "--base", str(base_dir),
        "--name", "de", "--placement", "pfeiffer", "--layers", "1", "--steps", "5", "--max-new-tokens", "4", "--no-progress",
    ])
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").is_file()
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]) == 5
    capsys.readouterr()

    assert main(["info", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "bottleneck" and info["config"]["placement"] == "pfeiffer" and info["config"]["layers"] == [1]
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

    assert main(["generate", "cat", "dog", "--template", r"English: {prompt}\nGerman:", "--adapter", str(out / "adapter"),
                 "--with-base", "--base", str(base_dir), "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> cat" and lines[1].startswith("  [base]") and lines[2].startswith("  [de]") and lines[3] == "> dog"


def test_malformed_training_file_fails_before_loading_anything(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(["train", "--train", str(bad), "-o", str(tmp_path / "x"), "--base", str(tmp_path / "no-such-base")]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_po2jsonl_command(tmp_path, capsys):
    catalog = tmp_path / "django.po"
    catalog.write_text('msgid ""\nmsgstr "Plural-Forms: nplurals=2; plural=(n != 1);\\n"\n\nmsgid "Save %(name)s"\nmsgstr "%(name)s speichern"\n')
    assert main(["data", "po2jsonl", str(catalog), "--lang", "de", "-o", str(tmp_path / "de.jsonl")]) == 0
    assert json.loads((tmp_path / "de.jsonl").read_text()) == {
        "prompt": "English: Save %(name)s\nGerman:", "completion": " %(name)s speichern", "prompt_template": "English: {prompt}\nGerman:"}
    assert "wrote 1 pairs" in capsys.readouterr().out


def test_unknown_adapter_option_is_a_clear_error(tmp_path, data, base_dir, capsys):
    assert main(["train", "--train", str(data), "-o", str(tmp_path / "x"), "--base", str(base_dir), "--r", "4"]) == 2
    assert "unknown BottleneckConfig field(s) ['r']" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_layers("7") == [7]


def test_chrf_equals_sacrebleu_on_a_fixture():
    hypotheses = ["Das ist ein kleines Haus.", "Bitte korrigieren Sie die Fehler.", "", "Hund"]
    references = ["Das ist ein kleines Haus.", "Bitte korrigieren Sie die unten aufgeführten Fehler.", "Speichern", "Katze"]
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
    assert score_generations(model, tiny_tokenizer(), examples, "exact", batch_size=4, max_new_tokens=3) == (result["exact"], result["predictions"])
    assert model.training  # scoring leaves the mode as it found it


def test_adalora_training_shows_its_final_ranks(tmp_path, base_dir, data, capsys):
    code = main([
        "train", "--train", str(data), "-o", str(tmp_path / "run"), "--base", str(base_dir), "--method", "adalora",
        "--init-r", "4", "--target-r", "2", "--target-modules", "q_proj,v_proj", "--set", "tinit=1", "--set", "tfinal=1",
        "--set", "deltaT=1", "--steps", "6", "--batch-size", "3", "--metric", "none", "--no-progress",
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
