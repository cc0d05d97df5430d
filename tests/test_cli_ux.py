"""What a new user meets first: help, version, the resolved config, overrides that do what
they say, short runs, the console's log lines, and quiet libraries."""

import json
import logging
import subprocess
import sys

import pytest

from gptjax import __version__
from gptjax.cli import main
from gptjax.config import load_config
from gptjax.errors import GptjaxError, GptjaxWarning
from gptjax.metrics import interval_mean


def test_help_and_argument_errors_do_not_start_jax():
    # Help and usage errors come back before JAX (2 s to import) would: nothing imports it.
    code = (
        "import sys\nfrom gptjax import cli\nparser = cli._build_parser()\n"
        "for argv in (['--help'], ['train', '--help'], ['sample']):\n"
        "    try: parser.parse_args(argv)\n    except SystemExit: pass\n"
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gptjax {__version__}"


def test_train_help_lists_presets_and_sample_help_says_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for preset in ("quickstart", "gpt2-xl", "nano", "micro", "mini"):
        assert preset in out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "softmax temperature; 0 is greedy (default: 0.8)" in out
    assert "or what the model's context leaves" in out


def test_print_config_is_the_runs_config_json(corpus, tmp_path, capsys):
    args = [
        "train", "nano", f"data.source={corpus}", "train.steps=2", "train.batch_size=8",
        "train.eval_max_batches=1", "optim.warmup_steps=1", "sample.num_samples=0",
        "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main([*args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # printing trains nothing
    assert main(args) == 0
    assert (tmp_path / "run" / "config.json").read_text() + "\n" == printed
    # Loading a checkpoint made orbax log "WARNING:absl:Given directory is read only=..." and
    # more: a command prints only what was asked for (--debug shows the rest).
    command = [sys.executable, "-m", "gptjax.cli", "eval", str(tmp_path / "run"), "--max-batches", "1"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "loss (nats/token)" in result.stdout
    assert result.stderr == ""


def test_a_users_mesh_minus_one_wins_over_the_presets():
    assert load_config("gpt2", ["mesh.fsdp=-1"]).mesh.fsdp == -1
    assert load_config("gpt2", ["mesh.fsdp=-1"]).mesh.data == 1
    assert load_config("gpt2", ["mesh.tensor=2"]).mesh.data == -1  # untouched without a -1
    with pytest.raises(GptjaxError, match="at most one mesh axis may be -1"):
        load_config("gpt2", ["mesh.fsdp=-1", "mesh.data=-1"])  # both given: the user's conflict


def test_the_tokenizer_brings_its_vocabulary_unless_set():
    assert load_config("nano", ["data.tokenizer=gpt2"]).model.vocab_size == 50257
    assert load_config("gpt2", ["data.tokenizer=bytes"]).model.vocab_size == 257
    assert load_config("nano", ["data.tokenizer=gpt2", "model.vocab_size=50304"]).model.vocab_size == 50304
    with pytest.raises(GptjaxError, match="smaller than tokenizer"):
        load_config("nano", ["data.tokenizer=gpt2", "model.vocab_size=300"])


def test_a_short_run_clamps_the_warmup_with_a_warning():
    with pytest.warns(GptjaxWarning, match=r"optim.warmup_steps \(100\) is longer than training"):
        config = load_config("nano", ["train.steps=20"])
    assert config.optim.warmup_steps == 2  # a tenth of the run: the schedule still decays
    with pytest.raises(GptjaxError, match="warmup_steps"):  # both given: the user's numbers stand
        load_config("nano", ["train.steps=20", "optim.warmup_steps=30"])


def test_the_warning_is_one_line_on_the_command_line():
    code = "from gptjax.cli import main; main(['train', 'nano', 'train.steps=20', '--print-config'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        "gptjax: warning: optim.warmup_steps (100) is longer than training (train.steps = 20): "
        "shortened to 2 steps, a tenth of the run"
    )


def test_prepare_takes_data_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"body": f"document {i} " * 50}) + "\n" for i in range(20)))
    assert main(["prepare", "--data", str(records)]) == 2
    assert "text_field" in capsys.readouterr().err
    assert main(["prepare", "--data", str(records), "data.text_field=body", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train_tokens"] > 0
    assert main(["prepare", "model.n_layer=2"]) == 2
    assert "data.field=value overrides only" in capsys.readouterr().err


def test_dry_run_on_a_mesh_the_batch_does_not_divide_says_what_works(capsys):
    # 8 visible devices (conftest); 16 compiles in a subprocess: both say it in one line.
    for devices in ("8", "16"):
        assert main(["train", "nano", "train.batch_size=4", "--dry-run", "--devices", devices]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"set train.batch_size={devices}" in err


def test_logged_loss_is_the_interval_mean_and_lines_carry_an_eta(corpus, tmp_path, capsys):
    base = [
        "train", "nano", f"data.source={corpus}", "train.steps=6", "train.batch_size=8",
        "train.eval_every=0", "train.eval_max_batches=1", "optim.warmup_steps=1", "sample.num_samples=0",
    ]  # fmt: skip

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}

    assert main([*base, "train.log_every=1", "--run-dir", str(tmp_path / "every")]) == 0
    capsys.readouterr()
    assert main([*base, "train.log_every=3", "--run-dir", str(tmp_path / "third")]) == 0
    out = capsys.readouterr().out
    each, mean = losses(tmp_path / "every"), losses(tmp_path / "third")
    assert sorted(mean) == [3, 6]
    assert mean[3] == pytest.approx(sum(each[s] for s in (1, 2, 3)) / 3, rel=1e-6)
    assert mean[6] == pytest.approx(sum(each[s] for s in (4, 5, 6)) / 3, rel=1e-6)
    step3 = next(line for line in out.splitlines() if line.startswith("step 3/6 | loss"))
    assert "| eta 0:00:" in step3


def test_interval_mean_leaves_out_skipped_steps():
    assert interval_mean([1.0, float("nan"), 3.0]) == 2.0
    assert interval_mean([float("nan"), float("inf")]) == float("inf")  # all skipped: stays non-finite


def test_library_log_lines_are_quiet_unless_debug(monkeypatch):
    from gptjax.quiet import quiet_libraries

    monkeypatch.setattr(logging.getLogger("absl"), "level", logging.NOTSET)
    quiet_libraries()
    # absl carries orbax's logged errors (with tracebacks) too: only --debug shows them.
    assert not logging.getLogger("absl").isEnabledFor(logging.ERROR)
    assert logging.getLogger("absl").isEnabledFor(logging.CRITICAL)


def test_the_cpu_peak_is_measured_once_per_machine(tmp_path, monkeypatch):
    from gptjax import metrics

    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
    probes = []
    monkeypatch.setattr(metrics, "_matmul_probe", lambda: probes.append(1) or 1e11 * len(probes))
    metrics.measured_cpu_peak.cache_clear()
    try:
        assert metrics.measured_cpu_peak() == 1e11
        metrics.measured_cpu_peak.cache_clear()  # a new process on the same machine
        assert metrics.measured_cpu_peak() == 1e11 and len(probes) == 1
        (tmp_path / "cpu_peak_flops.json").unlink()
        metrics.measured_cpu_peak.cache_clear()
        assert metrics.measured_cpu_peak() == 2e11  # deleting the file measures again
    finally:
        metrics.measured_cpu_peak.cache_clear()


def test_wandb_logs_offline_into_the_run_directory(corpus, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    args = [
        "train", "nano", f"data.source={corpus}", "train.batch_size=8", "train.log_every=1",
        "train.eval_max_batches=1", "optim.warmup_steps=1", "sample.num_samples=0",
        "train.wandb_project=gptjax-test", "--run-dir", str(run_dir),
    ]  # fmt: skip
    assert main([*args, "train.steps=2"]) == 0
    assert "gptjax: logging to W&B project gptjax-test" in capsys.readouterr().out
    run_id = (run_dir / "wandb_id").read_text()
    [record] = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert record.stat().st_size > 0
    assert main([*args, "train.steps=3"]) == 0  # a resumed run continues the same W&B run
    assert (run_dir / "wandb_id").read_text() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    import wandb

    wandb.teardown()  # its service's event loop, closed now rather than during a later test
