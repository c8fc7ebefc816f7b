"""Training under torchrun on CPU (gloo): two processes of a tiny model give the adapter one
process gives from the same global batches and seed, with DistributedDataParallel and with the
base's blocks sharded by FSDP2. Each launch takes seconds; a hang is cut off by a timeout."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.cli import main
from conftest import tiny_llama
from distributed_worker import EXAMPLES, METHODS, train

TESTS = Path(__file__).parent
LAUNCH_TIMEOUT = 240  # seconds; a launch takes about 15 on two busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node <processes> <args>`` on a free local port, bounded in time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process adapters (and rank patterns), by method."""
    adapters = {}
    for method in METHODS:
        model, _ = train(method, tmp_path_factory.mktemp(method))
        adapters[method] = ({k: v.clone() for k, v in model.adapter_state_dict("de").items()},
                            model.adapters["de"].to_dict())
    return adapters


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_give_the_adapter_of_one_process(tmp_path, one_process, mode):
    process = torchrun([str(TESTS / "distributed_worker.py"), str(tmp_path), mode], cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    for method, (expected, config) in one_process.items():
        ranks = [load_file(tmp_path / f"{method}.rank{rank}.safetensors") for rank in (0, 1)]
        records = [json.loads((tmp_path / f"{method}.rank{rank}.json").read_text()) for rank in (0, 1)]
        for key in expected:
            assert torch.equal(ranks[0][key], ranks[1][key]), (method, key)  # every rank holds the same adapter
            assert torch.allclose(ranks[0][key], expected[key], rtol=0, atol=1e-5), (method, key)
        assert records[0]["config"] == records[1]["config"] == config  # AdaLoRA: the same rank pattern everywhere
        if mode == "fsdp":
            assert [r["sharded_blocks"] for r in records] == [2, 2]
            # each rank holds half a block
            assert [r["local_rows"] * 2 for r in records] == [records[0]["full_rows"]] * 2
        folder = tmp_path / method
        assert sorted(p.name for p in folder.iterdir()) == ["adapter", "checkpoint", "loss.png", "metrics.jsonl"]
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 9))  # written once, by rank 0
        loaded = ak.AdapterModel(tiny_llama())  # the saved adapter loads in one process, base checked
        loaded.load_adapter(folder / "adapter")
        for key, tensor in loaded.adapter_state_dict("de").items():
            saved = expected[key] if config.get("rank_pattern") is None else tensor  # AdaLoRA saves the kept ranks
            assert torch.allclose(tensor, saved, rtol=0, atol=1e-5)


def test_the_train_command_under_torchrun_resumes_and_matches_one_process(tmp_path, base_dir):
    """`torchrun -m adapterkit train`: rank 0 alone writes; killed after its step-4 checkpoint and
    resumed with --resume, it ends with the adapter of an uninterrupted single-process run."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    argv = ["train", "--train", str(data), "--base", str(base_dir), "--method", "lora",
            "--target-modules", "q_proj,v_proj", "--steps", "6", "--batch-size", "5", "--lr", "1e-2",
            "--max-length", "32", "--metric", "none", "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "single")]) == 0
    first = torchrun(["-m", "adapterkit", *argv, "-o", str(tmp_path / "two"), "--save-every", "4", "--steps", "6"],
                     cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "two" / "adapter").rename(tmp_path / "uninterrupted")
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "two" / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")  # as a kill in step 6 leaves it
    resumed = torchrun(["-m", "adapterkit", *argv, "-o", str(tmp_path / "two"), "--save-every", "4", "--resume"],
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("trained 6 steps") == 1  # rank 0 reports
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    for folder in ("uninterrupted", "two/adapter"):
        two = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert all(torch.allclose(two[k], single[k], rtol=0, atol=1e-5) for k in single), folder


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, base_dir):
    """Rank 1 cannot read its training file (it checks every line before training); rank 0 would
    wait for it in the first collective: torchrun stops both, and rank 1's error names itself."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    script = tmp_path / "one_bad_rank.py"
    script.write_text(
        "import os, sys\nfrom adapterkit.cli import main\n"
        f"path = {str(data)!r} if os.environ['RANK'] == '0' else {str(tmp_path / 'missing.jsonl')!r}\n"
        f"sys.exit(main(['train', '--train', path, '--base', {str(base_dir)!r}, "
        f"'-o', {str(tmp_path / 'out')!r}, '--steps', '4',"
        " '--batch-size', '4', '--metric', 'none', '--no-progress']))\n"
    )
    process = torchrun([str(script)], cwd=tmp_path)
    assert process.returncode != 0
    assert "adapterkit: error: rank 1: " in process.stderr and "missing.jsonl" in process.stderr
    assert not (tmp_path / "out" / "adapter").exists()
