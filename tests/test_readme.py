"""Every ``gptjax`` command the README shows runs, in the README's order, on tiny settings.

``COMMANDS`` lists each command exactly as the README writes it (code blocks and inline
code), with the overrides that make it tiny or the reason it is not run here. A README
edit that adds, drops or changes a command fails ``test_readme_commands_are_all_listed``
until this table says how to run it, so the README cannot drift from what works.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from gptjax.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CPU; the model and data shapes are still the README's.
_QUICK = ["train.steps=4", "train.eval_max_batches=2", "sample.max_new_tokens=16"]
_TINY_GPT2 = [  # the shape of the tiny Hugging Face model the test writes as ./gpt2-hf-dir
    "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=64",
    "train.steps=2", "train.batch_size=8", "train.eval_max_batches=1", "sample.num_samples=0",
]  # fmt: skip
_NOT_RUN_INSTALL = "installs the package: CI's own setup (.ci/run) is this command"
_NOT_RUN_TESTS = "the test suite itself"
_NOT_RUN_BENCH = "a benchmark: tests/test_bench.py runs each in its smoke mode"
_NOT_RUN_SWEEP = "12 training runs: tests/test_scaling.py runs a real sweep, its fits and its plots"
_SYNOPSIS = "a synopsis with placeholders, not a command"
_NOT_RUN_CLUSTER = "submits to SLURM or trains a sweep: tests/test_slurm.py, tests/test_scaling.py run it"
_NOT_RUN_TPU = "compiles gpt2-xl for a TPU slice (minutes): tests/test_tpu.py runs it at nano scale"
_PROSE = "a command's name in the prose"

# README command -> extra arguments (run) or the reason it is not run.
COMMANDS: dict[str, list[str] | str] = {
    "pip install -e .": _NOT_RUN_INSTALL,
    "gptjax train": _QUICK,
    "pip install -e '.[test]'": _NOT_RUN_INSTALL,
    "pytest": _NOT_RUN_TESTS,
    'gptjax sample runs/quickstart --prompt "class "': [],
    "gptjax train|sample|eval|...": "a list of subcommands",
    "gptjax train gpt2 model.n_layer=6 optim.lr=3e-4 mesh.fsdp=-1": [
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=32",
        "data.source=my_texts/",
        "train.steps=2",
        "train.batch_size=8",
        "train.eval_max_batches=1",
        "sample.num_samples=0",
        "--run-dir",
        "runs/gpt2-fsdp",
    ],  # fmt: skip
    "gptjax info gpt2 --json": [],
    "gptjax prepare --data SOURCE --tokenizer NAME [data.field=value ...] [--json]": _SYNOPSIS,
    "gptjax train nano train.steps=20 --print-config": [],
    "gptjax train CONFIG [section.field=value ...] [--run-dir DIR] [--stop-at STEP]": _SYNOPSIS,
    'gptjax sample RUN_DIR --prompt "def " [--prompt-file F] [--num-samples N] [--max-new-tokens 200] '
    "[--temperature 0.8] [--top-k K] [--top-p P] [--min-p P] [--seed S] [--json]": _SYNOPSIS,
    "gptjax import-hf ./gpt2-hf-dir runs/gpt2": [],
    'gptjax sample runs/gpt2 --prompt "Hello"': [],
    "gptjax train gpt2 data.source=my_texts/ train.init_from=runs/gpt2 --run-dir runs/gpt2-ft": _TINY_GPT2,
    "gptjax export-hf runs/gpt2-ft ./gpt2-ft-hf": [],
    "gptjax launch --processes 2 --devices-per-process 2 -- train quickstart": _QUICK,
    "gptjax sweep configs/sweep_small.py --dir runs/sweep_small": _NOT_RUN_SWEEP,
    "gptjax fit runs/sweep_small [--json] [--irreducible] [--budget 1e15]": _NOT_RUN_SWEEP,
    "gptjax plot runs/sweep_small": _NOT_RUN_SWEEP,
    "gptjax plot runs/sweep_small/runs/<hash>": _NOT_RUN_SWEEP,
    "gptjax finetune configs/finetune_keywords.py": ["max_steps=4", "eval_every=2"],
    "gptjax finetune configs/finetune_keywords.py task=multiple_choice "
    "train_file=data/keywords/mc_train.jsonl val_file=data/keywords/mc_val.jsonl "
    "run_dir=runs/finetune_keywords_mc": ["max_steps=4", "eval_every=2"],
    "gptjax eval runs/quickstart [--data SOURCE] [--split val|train|all] [--json]": ["--max-batches", "2"],
    "gptjax eval runs/quickstart --task questions.jsonl --shots 3 --shots-from examples.jsonl": [],
    'gptjax attention runs/quickstart --prompt "def main(args):" --layer 2 --out attention.png': [],
    "gptjax sample": "a command's name in the prose",
    "gptjax --help": "a command's name in the prose",
    "gptjax --version": [],
    "gptjax eval": "a command's name in the prose",
    "python scripts/bench_train.py --shapes quickstart gpt2": _NOT_RUN_BENCH,
    "python scripts/bench_sample.py": _NOT_RUN_BENCH,
    "python scripts/bench_model.py": _NOT_RUN_BENCH,
    "python scripts/bench_data.py": _NOT_RUN_BENCH,
    "python scripts/bench_multihost.py": _NOT_RUN_BENCH,
    "python scripts/bench_vocab.py": _NOT_RUN_BENCH,
    "gptjax train gpt2-xl train.batch_size=64 --dry-run --devices 64 --device-memory 80e9": [
        "model.n_layer=2"
    ],
    "gptjax --debug ...": "a pattern: any command with --debug",
    'pytest -m "not slow"': _NOT_RUN_TESTS,
    "gptjax submit CONFIG --ntasks N": _SYNOPSIS,
    "gptjax sweep configs/sweep_small.py --dir sweeps/small --local-workers 2": _NOT_RUN_CLUSTER,
    "gptjax sweep configs/sweep_small.py --dir sweeps/small --slurm --partition gpu --account myproj "
    "--time 4:00:00 --gpus-per-task 1 --max-parallel 8 --sbatch=--mem=64G --sbatch=--constraint=a100": (
        _NOT_RUN_CLUSTER
    ),
    "gptjax sweep configs/sweep_small.py --dir sweeps/small --status": _NOT_RUN_CLUSTER,
    "gptjax sweep configs/sweep_small.py --dir sweeps/small --slurm": _NOT_RUN_CLUSTER,
    "gptjax fit sweeps/small; gptjax plot sweeps/small": _NOT_RUN_CLUSTER,
    "gptjax submit quickstart --time 24:00:00 --ntasks 8 --gpus-per-task 1": _NOT_RUN_CLUSTER,
    "gptjax submit quickstart --dry-run": _NOT_RUN_CLUSTER,
    "gptjax submit": _PROSE,
    "gptjax fit": _PROSE,
    "gptjax plot": _PROSE,
    "gptjax plan": _PROSE,
    "gptjax launch": _PROSE,
    "gptjax train gpt2-xl model.dtype=bfloat16 train.batch_size=32 --dry-run --target v5e-16": _NOT_RUN_TPU,
    "gptjax train gpt2-xl model.dtype=bfloat16 train.batch_size=32 --dry-run --target v5e-16 --json": (
        _NOT_RUN_TPU
    ),
    "gptjax plan gpt2-xl model.dtype=bfloat16 train.batch_size=32 --target v5e-16": _NOT_RUN_TPU,
    "python scripts/tpu_table.py": _NOT_RUN_TPU,
    "gptjax train mini model.block_size=T\nmodel.attention=A model.dtype=bfloat16 train.batch_size=8 "
    "--dry-run --target v5e-4": _SYNOPSIS,
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's bash blocks and inline ``gptjax ...`` code, in order."""
    found: list[tuple[int, str]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        body = block.group(1).replace("\\\n", " ")
        for line in body.splitlines():
            line = line.split("  #")[0].strip()  # comments are set off by two spaces or more
            for command in line.split(" && "):
                if command.strip():
                    found.append((block.start(), " ".join(command.split())))
    prose = re.sub(r"```.*?```", lambda m: " " * len(m.group()), text, flags=re.S)
    for span in re.finditer(r"`(gptjax [^`]+)`", prose):
        found.append((span.start(), span.group(1)))
    ordered, seen = [], set()
    for _, command in sorted(found, key=lambda pair: pair[0]):
        if command not in seen:
            seen.add(command)
            ordered.append(command)
    return ordered


def test_readme_commands_are_all_listed():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert [c for c in commands if c not in COMMANDS] == [], "README commands missing from COMMANDS"
    assert [c for c in COMMANDS if c not in commands] == [], "COMMANDS no longer in the README"


def _write_inputs(cwd: Path, texts: Path) -> None:
    """What the README's commands read that a user brings: texts, task files, a GPT-2 dir."""
    (cwd / "configs").symlink_to(ROOT / "configs")
    (cwd / "my_texts").symlink_to(texts)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import"]
    rows = [{"context": f"{w} is a", "choices": ["word", "number"], "label": 0} for w in words]
    for name in ("questions.jsonl", "examples.jsonl"):
        (cwd / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(cwd / "gpt2-hf-dir")


@pytest.mark.slow
@pytest.mark.filterwarnings("default::gptjax.errors.GptjaxWarning")  # short runs clamp the warmup
def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys, corpus, gpt2_tokenizer_available):
    monkeypatch.chdir(tmp_path)
    _write_inputs(tmp_path, corpus)  # corpus: a private store cache too
    for command in readme_commands((ROOT / "README.md").read_text()):
        extra = COMMANDS[command]
        if isinstance(extra, str):
            continue
        argv = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command))[1:] + extra  # [optional] parts left out
        try:
            code = main(argv)
        except SystemExit as e:  # --version and --help exit from argparse
            code = e.code
        out = capsys.readouterr()
        assert code == 0, f"{command!r} exited {code}: {out.err[-2000:]}"
        assert "Traceback" not in out.err, command
    assert (tmp_path / "gpt2-ft-hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
