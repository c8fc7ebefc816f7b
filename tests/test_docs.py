"""Every Python and shell block of README.md and docs/*.md runs as written, so a snippet that stops
working fails the suite. Blocks run in order, one file at a time, in a scratch folder, over a tiny
base (``$ADAPTERKIT_BASE``) where they name the default one. A block that cannot run here says
why in an HTML comment on the line before it: ``<!-- snippet: skip (reason) -->``; one that needs
the real base or minutes is ``<!-- snippet: slow -->`` and runs with ``-m slow``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- snippet: (?P<mark>skip|slow)[^>]*-->\n)?```(?P<lang>python|sh|bash)\n(?P<code>.*?)```",
                   re.S)


def blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, mark) of each runnable block."""
    text = path.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m["lang"], m["code"], m["mark"]) for m in FENCE.finditer(text)]


def test_every_block_is_found_and_every_skip_says_why():
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        assert text.count("```python") + text.count("```sh") + text.count("```bash") == len(blocks(path)), path
        assert not re.search(r"<!-- snippet: skip\s*-->", text), f"{path}: a skipped block must say why"


@pytest.fixture(scope="module")
def docs_base(tmp_path_factory) -> Path:
    """A tiny Llama as deep as the default base (30 layers), so that the docs' ``--layers 10-29``
    mean what they say, and the character tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=30, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("docs-base")
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run_file(path: Path, base: Path | None, workdir: Path, slow: bool) -> int:
    """Run the file's blocks in order over ``base`` (None: the real default); returns how many ran."""
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    environment.pop("ADAPTERKIT_BASE", None)
    if base is not None:
        environment["ADAPTERKIT_BASE"] = str(base)
    namespace: dict = {"__name__": "__snippet__"}
    ran = 0
    old_base, old_cwd = os.environ.get("ADAPTERKIT_BASE"), os.getcwd()
    os.environ.pop("ADAPTERKIT_BASE", None)
    if base is not None:
        os.environ["ADAPTERKIT_BASE"] = str(base)
    os.chdir(workdir)
    try:
        for line, language, code, mark in blocks(path):
            if mark == "skip" or (mark == "slow") != slow:
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if language == "python":
                try:
                    exec(compile(code, where, "exec"), namespace)
                except Exception as error:
                    raise AssertionError(f"the Python block at {where} failed: "
                                         f"{type(error).__name__}: {error}") from error
            else:
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir, env=environment,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, (f"the shell block at {where} failed ({done.returncode}):\n"
                                              f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            ran += 1
    finally:
        os.chdir(old_cwd)
        if old_base is None:
            os.environ.pop("ADAPTERKIT_BASE", None)
        else:
            os.environ["ADAPTERKIT_BASE"] = old_base
    return ran


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_blocks_run_as_written(path, docs_base, tmp_path):
    run_file(path, docs_base, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_slow_blocks_run_as_written(path, tmp_path):
    run_file(path, None, tmp_path, slow=True)
