"""The ``gptjax`` command line: parse, build a config, call the library. Nothing more.

Every user error becomes one line on stderr and exit code 2 (``--debug`` shows the
traceback). Each subcommand is a ``_cmd_*`` function in ``COMMANDS``; its arguments are in
:mod:`gptjax.cli_parser`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from gptjax.cli_parser import build_parser as _build_parser
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

    command = args.launch_command[1:] if args.launch_command[:1] == ["--"] else args.launch_command
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


COMMANDS = {
    "info": _cmd_info,
    "prepare": _cmd_prepare,
    "train": _cmd_train,
    "plan": _cmd_plan,
    "launch": _cmd_launch,
    "sample": _cmd_sample,
    "import-hf": _cmd_import_hf,
    "export-hf": _cmd_export_hf,
    "sweep": _cmd_sweep,
    "submit": _cmd_submit,
    "fit": _cmd_fit,
    "plot": _cmd_plot,
    "finetune": _cmd_finetune,
    "eval": _cmd_eval,
    "attention": _cmd_attention,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options too (`train gpt2 --run-dir D model.n_layer=2`).
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:  # named after the subcommand, whose --help lists what it takes
        what = f"gptjax {args.command}"
        parser.exit(2, f"{what}: error: unrecognized arguments: {' '.join(stray)} (see {what} --help)\n")
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
        return COMMANDS[args.command](args)
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
