"""The ``gptjax`` command line's argparse tree: every subcommand, its arguments and help.

:func:`gptjax.cli.main` parses with it and runs ``COMMANDS[args.command]``.
"""

from __future__ import annotations

import argparse


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        unset = any(action.default is v for v in (None, False, "", argparse.SUPPRESS))
        if unset or not action.option_strings:
            return action.help
        return f"{action.help} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    from gptjax import __version__
    from gptjax.config import MODEL_PRESETS, RUN_PRESETS

    presets = ", ".join([*RUN_PRESETS, *MODEL_PRESETS])
    parser = _Parser(prog="gptjax", description="GPT language models in JAX.")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors and the libraries' log lines"
    )
    parser.add_argument("--version", action="version", version=f"gptjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter count, FLOPs and memory of a config")
    p.add_argument("config", help="a preset (gpt2, quickstart, ...) or a .py config file")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("prepare", help="build the token store of a data source")
    p.add_argument(
        "overrides", nargs="*", help="data.field=value (e.g. data.text_field=body data.tfds_manual_dir=DIR)"
    )
    p.add_argument("--data", default="stdlib", help="stdlib, a path or glob, tfds:NAME, or a token file")
    p.add_argument("--tokenizer", default="bytes", help="bytes or a tiktoken encoding (gpt2, ...)")
    p.add_argument("--cache-dir", default="", help="where token stores go (default: ~/.cache/gptjax)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the quick start)",
        description="Train a run, or resume it from its latest checkpoint.",
    )
    p.add_argument("config", nargs="?", default=None, help=f"a preset ({presets}) or a .py config file")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--run-dir", default="")
    p.add_argument("--stop-at", type=int, default=None, help="save and stop after this step (resume later)")
    p.add_argument(
        "--dry-run", action="store_true", help="compile the step, print its memory and whether it fits"
    )
    p.add_argument("--devices", type=int, default=0, help="dry run: target mesh size (default: visible)")
    p.add_argument("--device-memory", type=float, default=0, help="dry run: bytes per target device")
    p.add_argument("--json", action="store_true", help="dry run: print the report as JSON")
    p.add_argument("--target", default="", help="dry run: compile for a TPU slice with libtpu (v5e-16...)")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (the run's config.json), exit"
    )

    p = sub.add_parser("plan", help="choose mesh, remat and accumulation for a TPU slice (compiles it)")
    p.add_argument("config", help="a preset or a .py config file")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--target", required=True, help="a TPU slice: v5e-16, v5litepod-16, v4-32, v5p-128, v6e-8")
    p.add_argument("--compile", type=int, default=3, help="candidates to compile (best estimate first)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("launch", help="run a gptjax command as N local processes (multi-host on one machine)")
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices per process")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument(
        "launch_command",
        metavar="command",
        nargs=argparse.REMAINDER,
        help="-- then the gptjax command, e.g. -- train quickstart",
    )

    p = sub.add_parser(
        "sample",
        help="generate text from a run's latest checkpoint",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("run_dir", help="a run directory (or checkpoint) from gptjax train or import-hf")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-text)")
    p.add_argument("--prompt-file", default="", help="read the prompt from this UTF-8 file instead")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn from the prompt")
    p.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="tokens generated per sample (default: 200, or what the model's context leaves)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set with this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sample i uses seed + i)")
    p.add_argument("--json", action="store_true", help="print prompts, texts, tokens and log-probabilities")

    p = sub.add_parser("import-hf", help="convert a Hugging Face GPT-2 directory (or hub name) into a run")
    p.add_argument(
        "hf_dir", help="a directory with config.json and model.safetensors, or a hub name like gpt2"
    )
    p.add_argument("run_dir", help="the run directory to write (sample it, or use it as train.init_from)")
    p.add_argument("--tokenizer", default="gpt2", help="the tokenizer the run records")

    p = sub.add_parser("export-hf", help="write a run's latest checkpoint as a Hugging Face GPT-2 directory")
    p.add_argument("run_dir", help="a run directory (or checkpoint)")
    p.add_argument("hf_dir", help="the directory to write")

    p = sub.add_parser("sweep", help="run a scaling-law sweep (skips finished runs, resumes the others)")
    p.add_argument("sweep_config", help="a .py file defining get_sweep() -> gptjax.scaling.Sweep")
    p.add_argument("overrides", nargs="*", help="section.field=value, applied to the sweep's base config")
    p.add_argument("--dir", default="", help="the sweep directory (default: sweeps/<name>)")
    p.add_argument("--status", action="store_true", help="print every run's state, step, loss, job, time")
    p.add_argument(
        "--local-workers", type=int, default=0, metavar="K", help="train K runs at once as processes"
    )
    p.add_argument("--slurm", action="store_true", help="submit the runs to train as one SLURM job array")
    _add_slurm_options(p, sweep=True)

    p = sub.add_parser("submit", help="submit one training run as a SLURM job (requeues at its time limit)")
    p.add_argument("config", nargs="?", default=None, help="a preset name or a .py config file")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--dry-run", action="store_true", help="write and print the batch script, submit nothing")
    _add_slurm_options(p, sweep=False)

    p = sub.add_parser("fit", help="fit scaling laws (with bootstrap intervals) to a sweep's results")
    p.add_argument("sweep_dir")
    p.add_argument("--irreducible", action="store_true", help="add an irreducible loss E to L(N), L(D), L(C)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals")
    p.add_argument("--budget", type=float, action="append", help="FLOPs for compute-optimal N, D (repeats)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plot", help="PNG plots of a run directory or a sweep directory")
    p.add_argument("path", help="a run directory or a sweep directory")
    p.add_argument("--out", default="", help="where the PNGs go (default: PATH/plots)")

    p = sub.add_parser("finetune", help="fine-tune a run on a labelled task (GPT-1 style)")
    p.add_argument("config", nargs="?", default=None, help="a .py file: get_config() -> FinetuneConfig")
    p.add_argument("overrides", nargs="*", help="field=value (e.g. init_from=runs/quickstart body_lr=1e-4)")

    p = sub.add_parser("eval", help="loss, perplexity, bits per byte; zero/few-shot multiple choice")
    p.add_argument("run_dir", help="a run directory (or checkpoint)")
    p.add_argument("--data", default="", help="a data source (default: the run's own)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--task", default="", help="a JSONL of {context, choices, label} to score")
    p.add_argument("--shots", type=int, default=0, help="in-context examples per question")
    p.add_argument("--shots-from", default="", help="the JSONL split the in-context examples are drawn from")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of in-context examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=0, help="LM batches per split (0: the full pass)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("attention", help="draw every head's attention of one layer for a prompt (PNG)")
    p.add_argument("run_dir", help="a run directory (or checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", default="attention.png", help="the PNG to write")
    return parser


def _add_slurm_options(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    g = p.add_argument_group("SLURM (defaults: the sweep file's slurm={...}, else the cluster's)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", help="time limit per job: MM, HH:MM:SS or D-HH")
    g.add_argument("--ntasks", type=int, help="processes per run (more than 1: srun, multi-host)")
    g.add_argument("--gpus-per-task", type=int)
    g.add_argument("--cpus-per-task", type=int)
    if sweep:
        g.add_argument("--max-parallel", type=int, help="array tasks running at once (%%N)")
    g.add_argument("--signal-seconds", type=int, help="save and requeue this long before the limit (120)")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION", help="an extra #SBATCH option")
