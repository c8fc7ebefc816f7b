"""``accelerate launch`` of transformers' Trainer (``AdapterTrainer``) over an AdapterModel on CPU:
two gloo processes of 2 rows a step give the adapter one process of 4 rows gives (a bottleneck
adapter and an AdaLoRA one, whose rank allocation and penalty run on every process).

Why not bit for bit: each process sums its own rows' token losses and the gradients are then
averaged across processes, where one process sums all rows at once. The scalings are powers of two
(the loss times 2 processes, the all-reduce's mean over 2), so only the order of the float32
additions differs: gradients agree to a relative ~1e-7, and AdamW, whose update is the gradient
over its own running magnitude, passes that on as a relative error of the same order on updates of
at most lr = 1e-2 a step, and six steps through two blocks compound it. The largest difference
measured after 6 steps is 1.2e-7 with torch's LayerNorm (one float32 step at 1.0, on a LayerNorm
weight); with the bottleneck's LayerNorm folded into its down-projection (the CPU's training path)
it is 2.1e-6 at this seed (one LayerNorm bias in block 1) and below 4e-7 at seeds 1 to 3, so
atol=1e-5. A wrong share of the batch moves weights by far more, and AdaLoRA's penalty counted twice
(per process, or per micro-batch) by 2.7e-4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_trainer_worker import MODELS, train
from test_distributed import free_port

TESTS = Path(__file__).parent
LAUNCH_TIMEOUT = 240  # seconds; a launch takes about 20 on two busy cores


def accelerate_launch(script: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Two local processes through accelerate's torchrun launcher, configured by flags alone:
    HF_HOME in ``tmp_path`` keeps any user-wide accelerate config file out. (``--cpu`` would start
    one process unless MPI is set up; the processes run on CPU because the Trainer's
    ``use_cpu=True`` makes accelerate pick its multi-CPU mode with gloo.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(script), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def test_two_processes_under_accelerate_launch_give_the_adapter_of_one(tmp_path):
    process = accelerate_launch(TESTS / "hf_trainer_worker.py", [str(tmp_path / "two"), "2"], tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    for method, (name, _) in MODELS.items():
        one = train(method, tmp_path / "one" / method, batch_size=4).model
        expected = one.adapter_state_dict(name)
        ranks = [load_file(tmp_path / "two" / f"{method}.rank{rank}.safetensors") for rank in (0, 1)]
        records = [json.loads((tmp_path / "two" / f"{method}.rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [(r["world"], r["backend"]) for r in records] == [(2, "gloo")] * 2
        assert records[0]["config"] == records[1]["config"] == one.adapters[name].to_dict()  # AdaLoRA's ranks too
        for key in expected:
            assert torch.equal(ranks[0][key], ranks[1][key]), (method, key)  # every process holds one adapter
            assert torch.allclose(ranks[0][key], expected[key], rtol=0, atol=1e-5), (method, key)
        checkpoint = tmp_path / "two" / method / "checkpoint-3"  # written once, adapter-only
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= {
            p.name for p in checkpoint.iterdir()}
        assert not (checkpoint / "model.safetensors").exists()
