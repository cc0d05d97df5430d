"""The ``gptjax`` command line: parse, build a config, call the library. Nothing more.

Every user error becomes one line on stderr and exit code 2 (``--debug`` shows the
traceback). Each subcommand is a ``_cmd_*`` function registered in ``_build_parser``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from gptjax.errors import GptjaxError
from gptjax.host import keep_freed_memory
from gptjax.quiet import quiet_libraries, show_warnings_as_lines


def _print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


# --------------------------------------------------------------------------------------
# Subcommands


def _cmd_info(args: argparse.Namespace) -> int:
    from gptjax.config import info, load_config

    result = info(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_table(
        [
            ("config", result["name"]),
            ("parameters", f"{result['params']:,}"),
            ("non-embedding parameters", f"{result['non_embedding_params']:,}"),
            (
                "training FLOPs / token",
                f"{_human(result['flops_per_token'])} (6N + 6·L·T·D, T={result['seq_len']})",
            ),
            ("params, fp32", f"{result['param_bytes_fp32'] / 2**20:,.1f} MiB"),
            ("AdamW state, fp32", f"{result['adamw_state_bytes_fp32'] / 2**20:,.1f} MiB"),
        ]
    )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from gptjax.config import Config, apply_overrides
    from gptjax.data import prepare

    other = [o for o in args.overrides if not o.strip().startswith("data.")]
    if other:
        raise GptjaxError(f"prepare takes data.field=value overrides only, got {other[0]!r}")
    flags = [f"data.source={args.data}", f"data.tokenizer={args.tokenizer}"]
    if args.cache_dir:
        flags.append(f"data.cache_dir={args.cache_dir}")
    stats = prepare(apply_overrides(Config(), [*flags, *args.overrides]).data)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        _print_table([(k, v) for k, v in stats.items() if not isinstance(v, dict)])
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gptjax.config import load_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    if args.print_config:
        print(load_config(args.config, overrides).to_json())  # what the run writes as config.json
        return 0
    from gptjax.train import train

    if args.dry_run:
        from gptjax.preflight import dry_run, format_report

        report = dry_run(
            load_config(args.config, overrides),
            n_devices=args.devices,
            device_memory=args.device_memory,
            target=args.target,
        )
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0 if report["fits"] else 1
    result = train(load_config(args.config, overrides), stop_at=args.stop_at)
    return 0 if result.step >= 0 else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from gptjax.config import load_config
    from gptjax.plan import format_plan, plan

    result = plan(load_config(args.config, args.overrides), args.target, compile=args.compile)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0 if result["best"] else 1


def _cmd_sample(args: argparse.Namespace) -> int:
    from gptjax.runs import load
    from gptjax.sample import SamplingParams, generate, stream

    prompts = [args.prompt]
    if args.prompt_file:
        try:
            prompts = [Path(args.prompt_file).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise GptjaxError(f"cannot read --prompt-file {args.prompt_file!r}: {e}") from e
    if args.num_samples < 1:
        raise GptjaxError(f"--num-samples ({args.num_samples}) must be >= 1")
    prompts = prompts * args.num_samples
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
    )
    model, config, tokenizer = load(args.run_dir)
    max_new = args.max_new_tokens
    if max_new is None:  # the default fits the model: 200 new tokens, or what the context leaves
        longest = max(len(tokenizer.encode(p)) or 1 for p in prompts)
        max_new = max(1, min(200, config.model.block_size - longest))
    kwargs = dict(
        max_new_tokens=max_new, params=params, seed=args.seed, tokenizer=tokenizer, eot_id=tokenizer.eot_id
    )
    if args.json:
        out = generate(model, prompts, **kwargs)
        rows = [
            {"prompt": p, "text": t, "tokens": tok, "logprobs": lp, "finish_reason": r}
            for p, t, tok, lp, r in zip(
                prompts, out.texts, out.tokens, out.logprobs, out.finish_reasons, strict=True
            )
        ]
        print(json.dumps({"run_dir": args.run_dir, "samples": rows}))
        return 0
    for i, prompt in enumerate(prompts):
        # One row at a time so each sample streams as it is decoded; seeds stay per sample.
        # The first chunk is decoded before anything is printed: a bad argument fails first.
        chunks = stream(model, [prompt], **{**kwargs, "seed": args.seed + i})
        first = next(chunks, None)
        print(f"--- sample {i} ---", flush=True)
        print(prompt, end="", flush=True)
        for chunk in itertools.chain([first] if first is not None else [], chunks):
            print(chunk.texts[0], end="", flush=True)
        print(flush=True)
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from gptjax.launch import launch

    command = args.launched[1:] if args.launched[:1] == ["--"] else args.launched
    return launch(
        command, processes=args.processes, devices_per_process=args.devices_per_process, port=args.port
    )


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from gptjax.interop import import_hf

    run_dir = import_hf(args.hf_dir, args.run_dir, tokenizer=args.tokenizer)
    print(f"gptjax: imported {args.hf_dir} into {run_dir}; try: gptjax sample {run_dir}")
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from gptjax.interop import export_hf

    hf_dir = export_hf(args.run_dir, args.hf_dir)
    tokenizer = "; AutoTokenizer loads its tokenizer" if (hf_dir / "vocab.json").is_file() else ""
    print(f"gptjax: wrote {hf_dir} (transformers.GPT2LMHeadModel.from_pretrained loads it{tokenizer})")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from gptjax import scaling

    sweep = scaling.load_sweep(args.sweep_config, args.overrides)
    sweep_dir = Path(args.dir or scaling.sweep.default_dir(sweep))
    if args.status:
        runs = scaling.expand(sweep, sweep_dir)
        print(scaling.format_status(scaling.states(sweep_dir, runs)))
        return 0
    if args.slurm:
        return _sweep_slurm(args, sweep, sweep_dir)
    if args.local_workers:
        result = scaling.run_workers(sweep, sweep_dir, workers=args.local_workers)
    else:
        result = scaling.run_sweep(sweep, sweep_dir)
    counts: dict[str, int] = {}
    for row in result.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"gptjax sweep: {counts} -> {result.table}")
    print(f"next: gptjax fit {result.sweep_dir}; gptjax plot {result.sweep_dir}")
    return 0 if counts.get("finished", 0) == len(result.rows) else 1


def _slurm_options(args: argparse.Namespace, defaults: dict[str, Any]):
    from gptjax.scaling import SlurmOptions

    names = ("partition", "account", "time", "ntasks", "gpus_per_task", "cpus_per_task", "max_parallel")
    given = {k: getattr(args, k, None) for k in (*names, "signal_seconds")}
    return SlurmOptions.merge(defaults, {**given, "extra": args.sbatch})


def _sweep_slurm(args: argparse.Namespace, sweep, sweep_dir: Path) -> int:
    from gptjax.scaling import local, submit_sweep

    options = _slurm_options(args, sweep.slurm)
    sweep_dir, runs, _ = local.prepare(sweep, sweep_dir)
    out = submit_sweep(sweep.name, sweep_dir, runs, options)
    left = ", ".join(f"{n} {s}" for s, n in out["skipped"].items())
    if out["job"] is None:
        print(f"gptjax sweep: nothing to submit ({left}); script: {out['script']}")
    else:
        throttle = f", at most {options.max_parallel} at once" if options.max_parallel else ""
        print(
            f"gptjax sweep: submitted {len(out['submitted'])} of {len(runs)} runs as job array "
            f"{out['job']}{throttle}"
            + (f"; left alone: {left}" if left else "")
            + f"; script: {out['script']}"
        )
    print(f"next: gptjax sweep {args.sweep_config} --status" + (f" --dir {args.dir}" if args.dir else ""))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from gptjax.scaling import submit

    out = submit(args.config, args.overrides, _slurm_options(args, {}), dry_run=args.dry_run)
    if args.dry_run:
        print(out["script"].read_text(), end="")
        return 0
    print(f"gptjax submit: job {out['job']} -> {out['run_dir']} (script: {out['script']})")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from gptjax.scaling.fits import describe_runs, fit_sweep

    result = fit_sweep(
        args.sweep_dir, irreducible=args.irreducible, n_boot=args.bootstrap, budgets=args.budget or ()
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"gptjax fit: {describe_runs(result['runs'])}")
    print(result["conventions"])
    for name, fit in result["fits"].items():
        print(f"{name}: {fit['form']}  ({fit['n_points']} points, {fit['n_boot']} bootstrap fits)")
        _print_table(
            [(f"  {k}", f"{v:.4g}  95% CI [{lo:.4g}, {hi:.4g}]") for k, v in fit["params"].items()
             for lo, hi in [fit["ci95"][k]]]
        )  # fmt: skip
    for name, reason in result["skipped"].items():
        print(f"{name}: not fitted ({reason})")
    for opt in result["compute_optimal"]:
        print(
            f"compute-optimal at C = {opt['flops']:.3g}: N = {_human(opt['params'])} "
            f"[{_human(opt['params_ci95'][0])}, {_human(opt['params_ci95'][1])}], "
            f"D = {_human(opt['tokens'])} "
            f"[{_human(opt['tokens_ci95'][0])}, {_human(opt['tokens_ci95'][1])}] tokens"
        )
    iso = result["isoflop"]
    for m in iso["minima"]:
        print(
            f"IsoFLOP minimum at C = {m['flops']:.3g}: N = {_human(m['params'])}, "
            f"D = {_human(m['tokens'])} tokens, val loss {m['val_loss']:.4f}"
        )
    for budget, reason in iso["skipped"].items():
        print(f"IsoFLOP at {budget}: no minimum ({reason})")
    if iso["params_exponent"] is not None:
        print(f"IsoFLOP: N_opt ~ C^{iso['params_exponent']:.3f} ({len(iso['minima'])} budgets)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from gptjax.scaling import plot_run, plot_sweep

    path = Path(args.path)
    plot = plot_sweep if (path / "sweep.json").exists() else plot_run
    for png in plot(path, args.out or None):
        print(png)
    if plot is plot_sweep:
        from gptjax.scaling.fits import describe_runs, runs_used
        from gptjax.scaling.results import table

        print(f"gptjax plot: {describe_runs(runs_used(table(path)))}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from gptjax.finetune import FinetuneConfig, apply_overrides, finetune, load_finetune_config

    if args.config:
        config = load_finetune_config(args.config, args.overrides)
    else:
        config = apply_overrides(FinetuneConfig(), args.overrides)
    result = finetune(config)
    best = " ".join(f"{k}={v:.4g}" for k, v in result.best.items())
    print(f"gptjax finetune: best {best}; {result.steps} steps in {result.seconds:.1f}s -> {result.run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from gptjax.evaluate import evaluate_run

    result = evaluate_run(
        args.run_dir, data=args.data, split=args.split, task=args.task, shots=args.shots,
        shots_from=args.shots_from, seed=args.seed, batch_size=args.batch_size, max_batches=args.max_batches,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows: list[tuple[str, Any]] = []
    if "lm" in result:
        lm = result["lm"]
        rows += [
            ("data", f"{lm['source']} ({lm['split']} split, {lm['tokens']:,} tokens, {lm['bytes']:,} bytes)"),
            ("loss (nats/token)", f"{lm['loss']:.4f}"),
            ("perplexity", f"{lm['perplexity']:.3f}"),
            ("bits per byte", f"{lm['bits_per_byte']:.4f}"),
        ]
    if "multiple_choice" in result:
        mc = result["multiple_choice"]
        rows += [
            ("task", f"{mc['task']} ({mc['n']} questions, {mc['shots']}-shot, chance {mc['chance']:.3f})"),
            ("accuracy", f"{mc['accuracy']:.4f} ± {mc['accuracy_stderr']:.4f}"),
            ("accuracy, per byte", f"{mc['accuracy_norm']:.4f} ± {mc['accuracy_norm_stderr']:.4f}"),
        ]
    _print_table(rows)
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from gptjax.attention_maps import attention_maps

    maps = attention_maps(args.run_dir, args.prompt, args.layer, args.out)
    print(f"gptjax attention: {maps.probs.shape[0]} heads x {len(maps.labels)} tokens -> {maps.path}")
    return 0


# --------------------------------------------------------------------------------------


def _describe_os_error(e: OSError | UnicodeError) -> str:
    if isinstance(e, UnicodeError):
        return f"text that is not valid UTF-8 ({e}): give UTF-8 text"
    where = " ".join(repr(str(f)) for f in (e.filename, e.filename2) if f)
    return f"{e.strerror or e}{': ' + where if where else ''}: check the path, its permissions and free space"


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


def _build_parser() -> argparse.ArgumentParser:
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
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("prepare", help="build the token store of a data source")
    p.add_argument(
        "overrides", nargs="*", help="data.field=value (e.g. data.text_field=body data.tfds_manual_dir=DIR)"
    )
    p.add_argument("--data", default="stdlib", help="stdlib, a path or glob, tfds:NAME, or a token file")
    p.add_argument("--tokenizer", default="bytes", help="bytes or a tiktoken encoding (gpt2, ...)")
    p.add_argument("--cache-dir", default="", help="where token stores go (default: ~/.cache/gptjax)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_prepare)

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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="choose mesh, remat and accumulation for a TPU slice (compiles it)")
    p.add_argument("config", help="a preset or a .py config file")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--target", required=True, help="a TPU slice: v5e-16, v5litepod-16, v4-32, v5p-128, v6e-8")
    p.add_argument("--compile", type=int, default=3, help="candidates to compile (best estimate first)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("launch", help="run a gptjax command as N local processes (multi-host on one machine)")
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices per process")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument(  # not dest "command": that names the subcommand in error lines
        "launched", metavar="command", nargs=argparse.REMAINDER,
        help="-- then the gptjax command, e.g. -- train quickstart",
    )  # fmt: skip
    p.set_defaults(func=_cmd_launch)

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
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("import-hf", help="convert a Hugging Face GPT-2 directory (or hub name) into a run")
    p.add_argument(
        "hf_dir", help="a directory with config.json and model.safetensors, or a hub name like gpt2"
    )
    p.add_argument("run_dir", help="the run directory to write (sample it, or use it as train.init_from)")
    p.add_argument("--tokenizer", default="gpt2", help="the tokenizer the run records")
    p.set_defaults(func=_cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a run's latest checkpoint as a Hugging Face GPT-2 directory")
    p.add_argument("run_dir", help="a run directory (or checkpoint)")
    p.add_argument("hf_dir", help="the directory to write")
    p.set_defaults(func=_cmd_export_hf)

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
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("submit", help="submit one training run as a SLURM job (requeues at its time limit)")
    p.add_argument("config", nargs="?", default=None, help="a preset name or a .py config file")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--dry-run", action="store_true", help="write and print the batch script, submit nothing")
    _add_slurm_options(p, sweep=False)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("fit", help="fit scaling laws (with bootstrap intervals) to a sweep's results")
    p.add_argument("sweep_dir")
    p.add_argument("--irreducible", action="store_true", help="add an irreducible loss E to L(N), L(D), L(C)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals")
    p.add_argument("--budget", type=float, action="append", help="FLOPs for compute-optimal N, D (repeats)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("plot", help="PNG plots of a run directory or a sweep directory")
    p.add_argument("path", help="a run directory or a sweep directory")
    p.add_argument("--out", default="", help="where the PNGs go (default: PATH/plots)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("finetune", help="fine-tune a run on a labelled task (GPT-1 style)")
    p.add_argument("config", nargs="?", default=None, help="a .py file: get_config() -> FinetuneConfig")
    p.add_argument("overrides", nargs="*", help="field=value (e.g. init_from=runs/quickstart body_lr=1e-4)")
    p.set_defaults(func=_cmd_finetune)

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
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("attention", help="draw every head's attention of one layer for a prompt (PNG)")
    p.add_argument("run_dir", help="a run directory (or checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", default="attention.png", help="the PNG to write")
    p.set_defaults(func=_cmd_attention)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options too (`train gpt2 --run-dir D model.n_layer=2`).
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # A config name that looks like an override belongs to the overrides.
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None
    keep_freed_memory()  # before JAX starts: XLA:CPU steps then run without page faults
    if not args.debug:
        quiet_libraries()
    show_warnings_as_lines()
    try:
        return args.func(args)
    except GptjaxError as e:
        if args.debug:
            raise
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as e:  # a file the user named cannot be read or written
        if args.debug:
            raise
        print(f"gptjax {args.command}: error: {_describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptjax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a collective whose peer died: one line, not a traceback
        from gptjax import peers

        if not args.debug and peers.caused_by_lost_peer(e):
            peers.peer_lost()
        raise


if __name__ == "__main__":
    sys.exit(main())
