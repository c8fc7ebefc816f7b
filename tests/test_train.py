import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterFileError, ConfigError, TrainingError
from adapterkit.train import ADAPTER_DIR, CHECKPOINT_DIR, LOSS_PLOT, METRICS_FILE, TrainConfig, Trainer, lr_at
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

WORDS = ["cat", "dog", "house", "tree", "water", "sun", "moon", "bread", "milk", "book", "door", "car"]
GERMAN = ["Katze", "Hund", "Haus", "Baum", "Wasser", "Sonne", "Mond", "Brot", "Milch", "Buch", "Tuer", "Auto"]
EXAMPLES = [{"prompt": f"English: {w}\nGerman:", "completion": f" {g}"} for w, g in zip(WORDS, GERMAN)]


def make_model(seed: int = 0) -> ak.AdapterModel:
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(seed)
    model.add_adapter("de", ak.BottleneckConfig(bottleneck_size=8, dropout=0.1, init="bert"))
    return model


def run(tmp_path, steps=6, resume=False, model=None, eval_examples=None, **options) -> ak.AdapterModel:
    model = model or make_model()
    config = TrainConfig(steps=steps, batch_size=4, lr=1e-2, max_length=32, progress=False, metric="none", **options)
    Trainer(model, tiny_tokenizer(), EXAMPLES, config, tmp_path, eval_examples, adapter_name="de").train(resume=resume)
    return model


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict("de").items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    model = make_model()
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    run(tmp_path, steps=20, model=model, eval_examples=EXAMPLES[:4], eval_every=10)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20]
    assert (tmp_path / LOSS_PLOT).stat().st_size > 0
    assert_same(base_before, model.base.state_dict())
    trained = adapter_tensors(model)
    reloaded = ak.AdapterModel(model.unload())
    reloaded.load_adapter(tmp_path / ADAPTER_DIR)
    assert_same(trained, reloaded.adapter_state_dict("de"))


def test_same_seed_and_data_give_bit_identical_adapters(tmp_path):
    first = adapter_tensors(run(tmp_path / "a"))
    second = adapter_tensors(run(tmp_path / "b"))
    assert_same(first, second)
    other_seed = adapter_tensors(run(tmp_path / "c", seed=1))
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


class Killed(Exception):
    pass


def run_until_killed(folder, model, forward: int, **options) -> None:
    """Train until the ``forward``-th forward pass of the base over a batch (the loss's one-token
    look at the head not counted), where a simulated crash stops it."""
    calls = {"n": 0}

    def die(module, args, kwargs):
        calls["n"] += kwargs["input_ids"].shape[1] > 1
        if calls["n"] == forward:
            raise Killed

    handle = model.base.register_forward_pre_hook(die, with_kwargs=True)
    with pytest.raises(Killed):
        run(folder, model=model, **options)
    handle.remove()


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    uninterrupted = adapter_tensors(run(tmp_path / "whole", steps=8, grad_accum=2))
    # dies in the first forward of step 6 (two micro-batches per step)
    run_until_killed(tmp_path / "cut", make_model(), 2 * 5 + 1, steps=8, grad_accum=2, save_every=2)
    state = json.loads((tmp_path / "cut" / CHECKPOINT_DIR / "trainer_state.json").read_text())
    assert state["step"] == 4
    resumed = run(tmp_path / "cut", steps=8, grad_accum=2, save_every=2, resume=True, model=make_model(seed=123))
    assert_same(uninterrupted, adapter_tensors(resumed))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_after_kill_9_in_a_real_process(tmp_path):
    """A separate process trains with checkpoints and is killed with SIGKILL mid-run."""
    script = f"""
import sys, os, signal
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
import test_train as t
model = t.make_model()
calls = {{"n": 0}}
def kill(module, args):
    calls["n"] += 1
    if calls["n"] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
model.base.register_forward_pre_hook(kill)
t.run(__import__("pathlib").Path({str(tmp_path / 'cut')!r}), steps=8, save_every=2, model=model)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert process.returncode == -9, process.stderr.decode()
    resumed = run(tmp_path / "cut", steps=8, save_every=2, resume=True)
    assert_same(adapter_tensors(run(tmp_path / "whole", steps=8)), adapter_tensors(resumed))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = make_model()
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += output.shape[1] > 1  # steps, not the loss's one-token look at the head
        if calls["n"] == 5:
            return output * float("nan")

    model.base.model.norm.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*last good checkpoint \(step 4\)"):
        run(tmp_path, steps=8, save_every=2, model=model)
    checkpoint = tmp_path / CHECKPOINT_DIR
    fresh = ak.AdapterModel(model.unload())
    fresh.load_adapter(checkpoint)  # a checkpoint is itself a loadable adapter
    assert all(torch.isfinite(t).all() for t in fresh.adapter_state_dict("de").values())
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 4


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["bottleneck", "adalora"])
def test_completion_only_logits_give_the_models_own_loss(build, method):
    from adapterkit.data import collate, tokenize_all
    from adapterkit.evaluate import completion_loss
    from adapterkit.loss import training_loss

    model = ak.AdapterModel(build())
    torch.manual_seed(0)
    if method == "adalora":
        config = ak.AdaLoraConfig(init_r=4, target_r=2, target_modules=["c_attn", "q_proj", "v_proj"], tinit=1,
                                  tfinal=1, deltaT=1, total_step=6)
    else:
        config = ak.BottleneckConfig(bottleneck_size=8, init="bert")
    model.add_adapter("de", config)
    model.train_adapter("de")
    model.eval()  # no dropout, so both passes see the same network
    tokenizer = tiny_tokenizer()
    batch = collate(tokenize_all(EXAMPLES[:5], tokenizer, 32), tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(training_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)
        model.train()
        if method == "adalora":  # the orthogonality penalty is part of the training loss
            assert model.regularization_loss() > 0
        torch.manual_seed(1)  # the same dropout masks in both passes
        ours = training_loss(model, batch)
        torch.manual_seed(1)
        assert torch.allclose(ours, model(**batch).loss, rtol=1e-5, atol=1e-6)
        model.eval()
    summed = sum(
        model(**collate(tokenize_all([e], tokenizer, 32), tokenizer.pad_token_id)).loss.item()
        * sum(label != -100 for label in tokenize_all([e], tokenizer, 32)[0].labels[1:])
        for e in EXAMPLES
    )
    tokens = sum(sum(label != -100 for label in t.labels[1:]) for t in tokenize_all(EXAMPLES, tokenizer, 32))
    assert completion_loss(model, tokenizer, EXAMPLES, batch_size=4, max_length=32) == pytest.approx(summed / tokens,
                                                                                                     rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainConfig(steps=100, lr=1.0, warmup_ratio=0.1)
    rates = [lr_at(step, 100, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] < 0.001


def adapter_step_callback(model):
    from transformers import TrainerCallback

    class AdapterStep(TrainerCallback):
        def __init__(self, model):
            self.model = model

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.model.step(state.global_step + 1)

    return AdapterStep(model)


@pytest.mark.parametrize("method", ["bottleneck", "adalora"])
def test_only_the_adapter_trains_under_hf_trainer(tmp_path, method):
    import warnings

    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    from adapterkit.data import TokenizedExample, collate, tokenize_all

    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(0)
    if method == "adalora":
        config = ak.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], tinit=1, tfinal=1,
                                  deltaT=1, total_step=6)
    else:
        config = ak.BottleneckConfig(bottleneck_size=8, init="bert")
    model.add_adapter("de", config)
    model.train_adapter("de")
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    adapter_before = adapter_tensors(model)
    tokenizer = tiny_tokenizer()
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in tokenize_all(EXAMPLES, tokenizer, 32)]

    def collator(batch):
        return collate([TokenizedExample(r["input_ids"], r["labels"]) for r in batch], tokenizer.pad_token_id)

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, logging_steps=100,
    )
    trainer = HFTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                        callbacks=[adapter_step_callback(model)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without rank allocation.*")
        trainer.train()
    assert_same(base_before, model.base.state_dict())
    after = model.adapter_state_dict("de")
    assert any(not torch.equal(adapter_before[k], after[k]) for k in after if k in adapter_before)
    if method == "adalora":
        ranks = model.adapter_ranks("de")
        assert sum(ranks.values()) < 4 * len(ranks)  # the allocation pruned ranks


# ---- AdaLoRA: the rank allocation resumes too ------------------------------------------------------
ADA_STEPS = 8  # tinit 2, masks every 2 steps, final ranks fixed at step 6 and held to step 8


def make_ada_model(seed: int = 0) -> ak.AdapterModel:
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(seed)
    model.add_adapter("de", ak.AdaLoraConfig(
        init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], tinit=2, tfinal=2, deltaT=2,
        total_step=ADA_STEPS, dropout=0.1,
    ))
    return model


def record_allocation(model) -> dict[int, dict[str, torch.Tensor]]:
    """The allocation's state (importance averages, masks) after each step, as checkpoints hold it."""
    states = {}
    step = model.step

    def recording_step(global_step):
        step(global_step)
        states[global_step] = model.training_state("de")

    model.step = recording_step
    return states


def ada_outcome(model, folder, states) -> dict:
    """All a run leaves: live tensors, masks, rank pattern, the bytes of the saved adapter folder, and
    the allocation's state after each step."""
    modules = model.adapter_layers["de"]
    return {
        "states": states,
        "tensors": adapter_tensors(model),
        "keep": {key: module.keep.clone() for key, module in modules.items()},
        "rank_pattern": model.adapters["de"].rank_pattern,
        "files": {path.name: path.read_bytes() for path in sorted((folder / ADAPTER_DIR).iterdir())},
    }


@pytest.fixture(scope="module")
def uninterrupted_ada(tmp_path_factory):
    folder, model = tmp_path_factory.mktemp("whole"), make_ada_model()
    states = record_allocation(model)
    return ada_outcome(run(folder, steps=ADA_STEPS, model=model), folder, states)


@pytest.mark.parametrize("checkpoint_step", [1, 4, 5, 6, 7], ids=lambda s: f"step{s}")
def test_adalora_resumes_bit_identically_from_any_step(tmp_path, uninterrupted_ada, checkpoint_step, capsys):
    """Checkpoints before tinit (1), just after a mask (4), between masks (5: pruned values the
    optimizer moved off zero), when the final ranks are fixed (6) and after (7)."""
    run_until_killed(tmp_path, make_ada_model(), checkpoint_step + 1, steps=ADA_STEPS, save_every=1)
    assert json.loads((tmp_path / CHECKPOINT_DIR / "trainer_state.json").read_text())["step"] == checkpoint_step
    resumed = make_ada_model(seed=123)
    states = record_allocation(resumed)
    outcome = ada_outcome(run(tmp_path, steps=ADA_STEPS, save_every=1, resume=True, model=resumed), tmp_path, states)
    assert sorted(outcome["states"]) == list(range(checkpoint_step + 1, ADA_STEPS + 1))
    for step, state in outcome["states"].items():
        assert_same(uninterrupted_ada["states"][step], state)
    assert_same(uninterrupted_ada["tensors"], outcome["tensors"])
    assert_same(uninterrupted_ada["keep"], outcome["keep"])
    assert outcome["rank_pattern"] == uninterrupted_ada["rank_pattern"] is not None
    assert outcome["files"] == uninterrupted_ada["files"]
    assert capsys.readouterr().out == ""  # the final ranks go to the log, not stdout


def test_an_adalora_checkpoint_after_the_final_ranks_loads_as_the_cut_adapter(tmp_path):
    model = make_ada_model()
    run(tmp_path, steps=ADA_STEPS, model=model, save_every=7)
    fresh = ak.AdapterModel(tiny_llama())
    fresh.load_adapter(tmp_path / CHECKPOINT_DIR)
    assert fresh.adapters["de"].rank_pattern == model.adapters["de"].rank_pattern
    assert fresh.adapter_ranks("de") == model.adapter_ranks("de")


def test_resuming_with_other_adapter_options_is_refused_and_keeps_the_checkpoint(tmp_path):
    run_until_killed(tmp_path, make_model(), 5, steps=8, save_every=2)
    checkpoint = tmp_path / CHECKPOINT_DIR
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}
    other = ak.AdapterModel(tiny_llama())
    other.add_adapter("de", ak.BottleneckConfig(bottleneck_size=4, dropout=0.1, init="bert"))
    with pytest.raises(ConfigError, match=r"bottleneck_size: 8 there, 4 here"):
        run(tmp_path, steps=8, save_every=2, resume=True, model=other)
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before
    resumed = run(tmp_path, steps=8, save_every=2, resume=True, model=make_model(seed=123))
    assert_same(adapter_tensors(run(tmp_path / "whole", steps=8)), adapter_tensors(resumed))


# ---- what a kill leaves behind -----------------------------------------------------------------------
def test_resume_drops_a_torn_metrics_line_and_lines_without_a_step(tmp_path):
    run_until_killed(tmp_path, make_model(), 6, steps=8, save_every=2)  # dies in step 6; checkpoint at step 4
    metrics = tmp_path / METRICS_FILE
    before = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2, 3, 4, 5]
    lines = before[:2] + ['"not an object"', '{"loss": 1.0}', '{"step": "3"}'] + before[2:]
    metrics.write_text("\n".join(lines) + '\n{"step": 3, "lo')  # a kill in the middle of a write
    (tmp_path / LOSS_PLOT).unlink()
    config = TrainConfig(steps=8, batch_size=4, progress=False, metric="none")
    Trainer(make_model(), tiny_tokenizer(), EXAMPLES, config, tmp_path, adapter_name="de").plot_losses()
    assert (tmp_path / LOSS_PLOT).stat().st_size > 0
    resumed = run(tmp_path, steps=8, save_every=2, resume=True, model=make_model(seed=123))
    after = metrics.read_text().splitlines()
    assert after[:4] == before[:4]
    assert [json.loads(line)["step"] for line in after] == list(range(1, 9))
    assert_same(adapter_tensors(run(tmp_path / "whole", steps=8)), adapter_tensors(resumed))


def test_a_kill_while_saving_a_checkpoint_leaves_no_staging_folder_after_resume(tmp_path):
    """A separate process is killed with SIGKILL inside the second checkpoint's write."""
    script = f"""
import os, pathlib, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_train as t
fsync, calls = os.fsync, {{"n": 0}}
def fsync_or_die(fd):
    calls["n"] += 1
    if calls["n"] == 8:  # a checkpoint syncs 4 files and 2 folders: the second file of the second one
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
os.fsync = fsync_or_die
t.run(pathlib.Path({str(tmp_path / 'cut')!r}), steps=8, save_every=2)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert process.returncode == -9, process.stderr.decode()
    cut = tmp_path / "cut"
    assert len(list(cut.glob(f".{CHECKPOINT_DIR}.*.saving"))) == 1
    assert json.loads((cut / CHECKPOINT_DIR / "trainer_state.json").read_text())["step"] == 2
    resumed = run(cut, steps=8, save_every=2, resume=True)
    assert sorted(path.name for path in cut.iterdir()) == sorted([ADAPTER_DIR, CHECKPOINT_DIR, LOSS_PLOT,
                                                                  METRICS_FILE])
    assert_same(adapter_tensors(run(tmp_path / "whole", steps=8)), adapter_tensors(resumed))


def leftover(folder: Path, name: str, kind: str) -> str:
    """A staging folder as io.write_folder_atomically makes it, with a file in it; its name."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=f".{kind}", dir=folder))
    (path / "optimizer.safetensors").write_bytes(b"partial")
    return path.name


def hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_leftover_staging_folders_go_when_training_starts_unless_one_is_the_only_copy(tmp_path):
    only_copy, staged = leftover(tmp_path, CHECKPOINT_DIR, "old"), leftover(tmp_path, CHECKPOINT_DIR, "saving")
    leftover(tmp_path, ADAPTER_DIR, "saving")
    (tmp_path / f".{CHECKPOINT_DIR}.notes.saving").write_text("a file, not a staging folder")
    (tmp_path / f".{CHECKPOINT_DIR}.mine").mkdir()
    others = [f".{CHECKPOINT_DIR}.mine", f".{CHECKPOINT_DIR}.notes.saving"]
    run(tmp_path, steps=2, save_every=2)  # no checkpoint folder yet: the .old one may be the only copy
    assert hidden(tmp_path) == sorted([only_copy, staged, *others])
    run(tmp_path, steps=2)
    assert hidden(tmp_path) == sorted(others)


# ---- a full disk ----------------------------------------------------------------------------------
def no_space_left(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_a_checkpoint_is_our_error_and_keeps_the_old_loss_plot(tmp_path, monkeypatch):
    (tmp_path / LOSS_PLOT).write_bytes(b"the old plot")
    monkeypatch.setattr(os, "fsync", no_space_left)  # where a full disk shows when a file is flushed to it
    with pytest.raises(AdapterFileError) as caught:
        run(tmp_path, steps=4, save_every=2)
    assert str(caught.value) == f"cannot write the checkpoint to {tmp_path / CHECKPOINT_DIR}: No space left on device"
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOSS_PLOT, METRICS_FILE]
    assert (tmp_path / LOSS_PLOT).read_bytes() == b"the old plot"


def test_a_full_disk_while_plotting_keeps_the_old_loss_plot_and_the_trained_adapter(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def savefig_on_a_full_disk(figure, target, **options):
        if isinstance(target, (str, os.PathLike)):
            open(target, "wb").close()  # matplotlib opens (and empties) the file before the disk fills
        else:
            target.write(b"\x89PNG, cut short")
        no_space_left()

    (tmp_path / LOSS_PLOT).write_bytes(b"the old plot")
    monkeypatch.setattr(Figure, "savefig", savefig_on_a_full_disk)
    with pytest.raises(TrainingError) as caught:
        run(tmp_path, steps=2)
    assert str(caught.value) == f"cannot write {tmp_path / LOSS_PLOT}: No space left on device"
    assert sorted(path.name for path in tmp_path.iterdir()) == [ADAPTER_DIR, LOSS_PLOT, METRICS_FILE]
    assert (tmp_path / LOSS_PLOT).read_bytes() == b"the old plot"
    ak.AdapterModel(tiny_llama()).load_adapter(tmp_path / ADAPTER_DIR)


def test_a_full_disk_during_training_is_one_line_from_the_cli(tmp_path, base_dir, monkeypatch, capsys):
    from adapterkit.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES))
    out = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", no_space_left)
    capsys.readouterr()
    options = ["--steps", "2", "--save-every", "1", "--batch-size", "4", "--no-progress"]
    assert main(["train", "--train", str(data), "-o", str(out), "--base", str(base_dir), *options]) == 2
    err = capsys.readouterr().err
    message = f"cannot write the checkpoint to {out / CHECKPOINT_DIR}: No space left on device"
    assert err.splitlines()[-1] == f"adapterkit: error: {message}"
    assert "Traceback" not in err and err.count("adapterkit: error:") == 1
    assert sorted(path.name for path in out.iterdir()) == [METRICS_FILE]
