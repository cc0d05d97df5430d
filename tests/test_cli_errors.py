"""Bad input to every command: one line on stderr that says what is wrong, exit code 2.

Each row is a command line (``{name}`` fields are paths made by the ``assets`` fixture)
and a fragment its error line must contain. Rows run in-process through
``gptjax.cli.main``; rows for commands this checkout does not have are skipped by name.
Every row that reaches the library (not an argparse usage error) is run again with
``--debug``, which must raise the ``GptjaxError`` so that its traceback shows.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax.cli import _build_parser, main
from gptjax.config import load_config
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.runs import write_params_run

TRAIN = [
    "nano",
    "data.source={corpus}",
    "data.val_fraction=0.1",
    "model.block_size=32",
    "train.steps=2",
    "train.batch_size=8",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "optim.warmup_steps=1",
    "sample.num_samples=0",
]

R = ["--run-dir", "{tmp}/r"]  # a scratch run directory

# (id, argv, fragment of the error line); the ids in USAGE are argparse's usage errors.
# fmt: off
ROWS = [
    # no command, unknown command
    ("no-command", [], "required: command"),
    ("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    # info: config names, files, keys, types, sizes
    ("info-unknown-config", ["info", "nonexistent"], "unknown config 'nonexistent'"),
    ("info-missing-config-file", ["info", "{tmp}/missing.py"], "does not exist"),
    ("info-empty-config-file", ["info", "{empty_py}"], "must define get_config()"),
    ("info-syntax-error-config", ["info", "{syntax_py}"], "failed to load: SyntaxError"),
    ("info-binary-config", ["info", "{binary_py}"], "failed to load"),
    ("info-config-wrong-return", ["info", "{wrong_return_py}"], "returned int, not a gptjax Config"),
    ("info-unknown-section", ["info", "nano", "foo.bar=1"], "unknown config key 'foo.bar'"),
    ("info-unknown-field", ["info", "nano", "model.n_layers=3"], "unknown config key 'model.n_layers'"),
    ("info-no-equals", ["info", "nano", "model.n_layer"], "must look like section.field=value"),
    ("info-not-an-int", ["info", "nano", "model.n_layer=two"], "is not an integer"),
    ("info-not-a-number", ["info", "nano", "optim.lr=fast"], "is not a number"),
    ("info-nan", ["info", "nano", "optim.lr=nan"], "must be finite"),
    ("info-not-a-bool", ["info", "nano", "model.bias=maybe"], "is not a boolean"),
    ("info-bad-choice", ["info", "nano", "model.position=alibi"], "is not one of"),
    ("info-zero-layers", ["info", "nano", "model.n_layer=0"], "n_layer (0) must be >= 1"),
    ("info-negative-width", ["info", "nano", "model.n_embd=-32"], "n_embd (-32) must be >= 1"),
    ("info-indivisible-heads", ["info", "nano", "model.n_head=3"], "must be divisible by n_head (3)"),
    ("info-vocab-too-small", ["info", "nano", "data.tokenizer=gpt2", "model.vocab_size=300"],
     "smaller than tokenizer"),
    ("info-unknown-option", ["info", "nano", "--bogus"], "info: error: unrecognized arguments: --bogus"),
    # prepare: missing, empty, binary and undecodable data
    ("prepare-missing-source", ["prepare", "--data", "{tmp}/nowhere"], "does not exist"),
    ("prepare-empty-dir", ["prepare", "--data", "{empty_dir}"], "no .txt/.md/.py/.jsonl files"),
    ("prepare-empty-file", ["prepare", "--data", "{empty_txt}"], "holds no text"),
    ("prepare-binary-garbage", ["prepare", "--data", "{binary_txt}"], "is not UTF-8 text"),
    ("prepare-invalid-utf8", ["prepare", "--data", "{latin1_txt}"], "is not UTF-8 text"),
    ("prepare-nul-bytes", ["prepare", "--data", "{nul_txt}"], "NUL"),
    ("prepare-corrupt-gzip", ["prepare", "--data", "{bad_gz}"], "cannot read"),
    ("prepare-bad-jsonl", ["prepare", "--data", "{bad_jsonl}"], "line 2 of"),
    ("prepare-jsonl-not-object", ["prepare", "--data", "{number_jsonl}"], "line 1 of"),
    ("prepare-jsonl-text-not-str", ["prepare", "--data", "{int_text_jsonl}"], "line 1 of"),
    ("prepare-jsonl-missing-field", ["prepare", "--data", "{no_field_jsonl}"], "set data.text_field"),
    ("prepare-unknown-tokenizer", ["prepare", "--data", "{corpus}", "--tokenizer", "nope"],
     "unknown tokenizer"),
    ("prepare-odd-bin", ["prepare", "--data", "{odd_bin}"], "odd_tokens.bin"),
    ("prepare-empty-bin", ["prepare", "--data", "{empty_bin}"], "empty"),
    ("prepare-garbage-npy", ["prepare", "--data", "{garbage_npy}"], "garbage.npy"),
    ("prepare-float-npy", ["prepare", "--data", "{float_npy}"], "flat integer array"),
    # train: config errors, data errors, checkpoints from another model
    ("train-unknown-key", ["train", *TRAIN, "train.stepz=3", *R], "unknown config key"),
    ("train-zero-steps", ["train", *TRAIN, "train.steps=0", *R], "steps (0) must be >= 1"),
    ("train-negative-batch", ["train", *TRAIN, "train.batch_size=-8", *R], "batch_size (-8)"),
    ("train-warmup-too-long", ["train", *TRAIN, "optim.warmup_steps=5", *R], "warmup_steps (5)"),
    ("train-indivisible-batch", ["train", *TRAIN, "train.batch_size=3", "optim.accum_steps=2", *R],
     "divisible by"),
    ("train-stop-at-not-int", ["train", "nano", "--stop-at", "soon"], "invalid int value: 'soon'"),
    ("train-run-dir-is-a-file", ["train", *TRAIN, "--run-dir", "{blocker}/run"], "is not writable"),
    ("train-missing-data", ["train", *TRAIN, "data.source={tmp}/nowhere", *R], "does not exist"),
    ("train-corpus-too-small", ["train", *TRAIN, "model.block_size=64", "data.source={tiny_txt}",
                                *R], "fewer than one window"),
    ("train-resume-other-model", ["train", *TRAIN, "model.n_layer=3", "--run-dir", "{run}"],
     "different model"),
    ("train-init-from-other-model", ["train", *TRAIN, "train.init_from={rope_run}", *R],
     "different model"),
    ("train-init-from-missing", ["train", *TRAIN, "train.init_from={tmp}/nowhere", *R],
     "does not exist"),
    ("train-resume-weights-only", ["train", *TRAIN, "--run-dir", "{nano_weights}"],
     "holds model weights only"),
    # sample: runs, prompts and sampling knobs
    ("sample-missing-run", ["sample", "{tmp}/nowhere"], "does not exist"),
    ("sample-empty-run", ["sample", "{empty_dir}"], "no checkpoint"),
    ("sample-prompt-too-long", ["sample", "{run}", "--prompt", "x" * 100, "--max-new-tokens", "4"],
     "exceeds the model's block_size (32)"),
    ("sample-zero-new-tokens", ["sample", "{run}", "--max-new-tokens", "0"], "max_new_tokens (0)"),
    ("sample-negative-new-tokens", ["sample", "{run}", "--max-new-tokens", "-3"], "max_new_tokens (-3)"),
    ("sample-negative-temperature", ["sample", "{run}", "--temperature", "-1"], "temperature (-1.0)"),
    ("sample-top-p-zero", ["sample", "{run}", "--top-p", "0"], "top_p (0.0) must be in (0, 1]"),
    ("sample-top-k-past-vocab", ["sample", "{run}", "--top-k", "1000", "--max-new-tokens", "2"],
     "exceeds the vocabulary"),
    ("sample-zero-samples", ["sample", "{run}", "--num-samples", "0"], "--num-samples (0) must be >= 1"),
    ("sample-missing-prompt-file", ["sample", "{run}", "--prompt-file", "{tmp}/nowhere.txt"], "cannot read"),
    ("sample-invalid-utf8-prompt", ["sample", "{run}", "--prompt-file", "{latin1_txt}"], "cannot read"),
    ("sample-temperature-not-float", ["sample", "{run}", "--temperature", "hot"], "invalid float value"),
    ("sample-damaged-checkpoint", ["sample", "{damaged_run}"], "cannot be read"),
    # import-hf / export-hf
    ("import-missing-dir", ["import-hf", "{tmp}/nowhere", "{tmp}/imported"], "does not exist"),
    ("import-a-file", ["import-hf", "{empty_txt}", "{tmp}/imported"], "is a file"),
    ("import-no-config", ["import-hf", "{empty_dir}", "{tmp}/imported"], "has no config.json"),
    ("import-bad-json", ["import-hf", "{hf_bad_json}", "{tmp}/imported"], "is not valid JSON"),
    ("import-json-not-object", ["import-hf", "{hf_list_json}", "{tmp}/imported"], "JSON object"),
    ("import-not-gpt2", ["import-hf", "{hf_llama}", "{tmp}/imported"], "not GPT-2"),
    ("import-no-weights", ["import-hf", "{hf_no_weights}", "{tmp}/imported"], "has no weights"),
    ("import-garbage-weights", ["import-hf", "{hf_garbage_weights}", "{tmp}/imported"], "model.safetensors"),
    ("export-missing-run", ["export-hf", "{tmp}/nowhere", "{tmp}/hf"], "does not exist"),
    ("export-rope-model", ["export-hf", "{rope_run}", "{tmp}/hf"], "learned positions only"),
    ("export-onto-a-file", ["export-hf", "{run}", "{empty_txt}"], "cannot create directory"),
    ("import-onto-a-file", ["import-hf", "{hf_no_weights}", "{empty_txt}"], "has no weights"),
    # sweep / fit / plot
    ("plan-unknown-target", ["plan", "nano", "--target", "v9z-4"], "unknown target 'v9z-4'"),
    ("submit-missing-config", ["submit", "{tmp}/nowhere.py", "--dry-run"], "does not exist"),
    ("sweep-missing-config", ["sweep", "{tmp}/nowhere.py"], "does not exist"),
    ("sweep-no-get-sweep", ["sweep", "{empty_py}"], "must define get_sweep()"),
    ("sweep-empty-axis", ["sweep", "{empty_axis_py}", "--dir", "{tmp}/sweep"], "is empty"),
    ("sweep-unknown-override", ["sweep", "{sweep_py}", "model.n_layerz=2"], "unknown config key"),
    ("fit-not-a-sweep", ["fit", "{empty_dir}"], "holds no sweep.json"),
    ("fit-bootstrap-not-int", ["fit", "{empty_dir}", "--bootstrap", "many"], "invalid int value"),
    ("plot-missing-path", ["plot", "{tmp}/nowhere"], "has no metrics.jsonl rows"),
    ("plot-empty-run", ["plot", "{empty_dir}"], "has no metrics.jsonl rows"),
    ("plot-corrupt-metrics", ["plot", "{corrupt_metrics_run}"], "has no metrics.jsonl rows"),
    # launch
    ("launch-zero-processes", ["launch", "--processes", "0", "--", "info", "nano"], "must be >= 1"),
    ("launch-nothing", ["launch", "--processes", "2"], "nothing to launch"),
    ("launch-processes-not-int", ["launch", "--processes", "two"], "invalid int value"),
    # eval / finetune / attention
    ("eval-missing-run", ["eval", "{tmp}/nowhere"], "does not exist"),
    ("eval-bad-split", ["eval", "{run}", "--split", "test"], "invalid choice: 'test'"),
    ("eval-missing-task", ["eval", "{run}", "--task", "{tmp}/nowhere.jsonl"], "nowhere.jsonl"),
    ("eval-bad-task-json", ["eval", "{run}", "--task", "{broken_jsonl}"], "is not valid JSON"),
    ("eval-shots-without-pool", ["eval", "{run}", "--task", "{task_jsonl}", "--shots", "2"], "--shots-from"),
    ("finetune-missing-config", ["finetune", "{tmp}/nowhere.py"], "does not exist"),
    ("finetune-unknown-key", ["finetune", "nope=1"], "unknown fine-tune config key"),
    ("attention-missing-run", ["attention", "{tmp}/nowhere", "--prompt", "hi"], "does not exist"),
    ("attention-empty-prompt", ["attention", "{run}", "--prompt", ""], "prompt is empty"),
    ("attention-no-prompt", ["attention", "{run}"], "required: --prompt"),
]
USAGE = {
    "no-command", "unknown-command", "info-unknown-option", "train-stop-at-not-int",
    "sample-temperature-not-float", "fit-bootstrap-not-int", "launch-processes-not-int", "eval-bad-split",
    "attention-no-prompt",
}
# fmt: on


def _write_params_run(run_dir, config):
    params = nnx.state(GPT(config.model, key=jax.random.key(0)), nnx.Param)
    return write_params_run(run_dir, config, params, tokenizer="bytes")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The bad inputs, plus a trained nano run and weights-only runs of other models."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    paths = {"tmp": tmp}
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef"], 200)))
    paths["corpus"] = corpus
    for name in ("empty_dir",):
        (tmp / name).mkdir()
        paths[name] = tmp / name
    files = {
        "empty_txt": ("empty.txt", b""),
        "tiny_txt": ("tiny.txt", b"hello"),
        "binary_txt": ("binary.txt", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "latin1_txt": ("latin1.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")),
        "nul_txt": ("nul.txt", b"text\x00\x00\x00 more text"),
        "bad_gz": ("bad.txt.gz", b"this is not gzip"),
        "bad_jsonl": ("bad.jsonl", b'{"text": "ok"}\n{"text": \n'),
        "number_jsonl": ("number.jsonl", b"5\n"),
        "broken_jsonl": ("broken.jsonl", b'{"context": \n'),
        "int_text_jsonl": ("int_text.jsonl", b'{"text": 5}\n'),
        "no_field_jsonl": ("no_field.jsonl", b'{"body": "x"}\n'),
        "task_jsonl": ("task.jsonl", b'{"context": "a", "choices": ["b", "c"], "label": 0}\n'),
        "odd_bin": ("odd_tokens.bin", b"\x01\x02\x03"),
        "empty_bin": ("empty_tokens.bin", b""),
        "garbage_npy": ("garbage.npy", b"\x93NUMPY garbage garbage"),
        "empty_py": ("empty.py", b""),
        "syntax_py": ("syntax.py", b"def get_config(:\n"),
        "binary_py": ("binary.py", b"\x00\xff\xfe garbage"),
        "wrong_return_py": ("wrong_return.py", b"def get_config():\n    return 5\n"),
        "blocker": ("blocker", b"a file where a directory should be"),
        "empty_axis_py": (
            "empty_axis.py",
            b"from gptjax.config import load_config\nfrom gptjax.scaling import Sweep\n"
            b"def get_sweep():\n    return Sweep(name='s', base=load_config('nano'), axes={'lr': []})\n",
        ),
        "sweep_py": (
            "sweep.py",
            b"from gptjax.config import load_config\nfrom gptjax.scaling import Sweep\n"
            b"def get_sweep():\n    return Sweep(name='s', base=load_config('nano'), axes={'lr': [1e-3]})\n",
        ),
    }
    for key, (name, content) in files.items():
        (tmp / name).write_bytes(content)
        paths[key] = tmp / name
    np.save(tmp / "floats.npy", np.zeros(100, np.float32))
    paths["float_npy"] = tmp / "floats.npy"
    hf = {
        "hf_bad_json": "{",
        "hf_list_json": "[1, 2]",
        "hf_llama": json.dumps({"model_type": "llama"}),
        "hf_no_weights": json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}),
        "hf_garbage_weights": json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}),
    }
    for key, config_json in hf.items():
        (tmp / key).mkdir()
        (tmp / key / "config.json").write_text(config_json)
        paths[key] = tmp / key
    (tmp / "hf_garbage_weights" / "model.safetensors").write_bytes(b"\xff" * 64)
    (tmp / "corrupt_metrics_run").mkdir()
    (tmp / "corrupt_metrics_run" / "metrics.jsonl").write_text('garbage\n{"step": 2, "lo')
    paths["corrupt_metrics_run"] = tmp / "corrupt_metrics_run"

    cache = tmp / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTJAX_CACHE_DIR", str(cache))
        argv = [a.format(**paths) for a in TRAIN]
        assert main(["train", *argv, "--run-dir", str(tmp / "run")]) == 0
    paths["run"] = tmp / "run"
    nano = load_config("nano", ["model.block_size=32"])
    paths["nano_weights"] = _write_params_run(tmp / "nano_weights", nano)
    rope = load_config("nano", ["model.block_size=32", "model.position=rope", "model.n_layer=1"])
    paths["rope_run"] = _write_params_run(tmp / "rope_run", rope)
    damaged = _write_params_run(tmp / "damaged_run", nano)
    for array_file in (damaged / "checkpoints" / "0" / "params").rglob("*"):
        if array_file.is_file() and "zarr" not in array_file.name:
            array_file.write_bytes(b"")
    paths["damaged_run"] = damaged
    return {k: str(v) for k, v in paths.items()}, cache


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors exit
        return e.code


@pytest.mark.parametrize(("argv", "fragment"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, assets, capsys, monkeypatch, request):
    paths, cache = assets
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(cache))
    monkeypatch.chdir(paths["tmp"])  # anything a bad row writes lands in the scratch folder
    command = argv[0] if argv else None
    commands = _build_parser()._subparsers._group_actions[0].choices
    if command is not None and command not in commands and not command.startswith("frob"):
        pytest.skip(f"gptjax has no {command!r} command yet")
    argv = [a.format(**paths) for a in argv]
    capsys.readouterr()
    code = _run(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}; stderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("gptjax"), lines[0]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    if request.node.callspec.id in USAGE:
        return
    with pytest.raises(GptjaxError):
        main(["--debug", *argv])


def test_at_least_forty_rows_cover_every_command():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    commands = _build_parser()._subparsers._group_actions[0].choices
    covered = {row[1][0] for row in ROWS if row[1]}
    assert set(commands) <= covered, f"commands without bad-input rows: {set(commands) - covered}"


def test_debug_shows_the_traceback_in_a_subprocess(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    plain = subprocess.run(
        [sys.executable, "-m", "gptjax.cli", "info", "nano", "model.n_layer=0"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    debug = subprocess.run(
        [sys.executable, "-m", "gptjax.cli", "--debug", "info", "nano", "model.n_layer=0"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1, plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "GptjaxError" in debug.stderr


@pytest.mark.parametrize("row", [row for row in ROWS if row[1][:1] == ["launch"]], ids=lambda row: row[0])
def test_launch_errors_name_the_command(row, capsys):
    capsys.readouterr()
    assert _run(row[1]) == 2
    assert capsys.readouterr().err.startswith("gptjax launch: error: ")


def test_launcher_names_the_process_that_failed_not_the_peer_that_noticed():
    """Seen in one poll: process 0 stopped because process 1 died (SIGKILL); name process 1."""
    from gptjax.errors import EXIT_PEER_LOST
    from gptjax.launch import _first_cause

    assert _first_cause([(0, EXIT_PEER_LOST), (1, -9)]) == (1, -9)
    assert _first_cause([(0, EXIT_PEER_LOST), (1, 2)]) == (1, 2)
    assert _first_cause([(0, EXIT_PEER_LOST), (1, EXIT_PEER_LOST)]) == (0, EXIT_PEER_LOST)
    assert _first_cause([(0, 1), (1, -9)]) == (0, 1)


def test_heartbeat_timeout_is_thirty_seconds_unless_set():
    from gptjax import peers
    from gptjax.errors import GptjaxError

    assert peers.heartbeat_timeout({}) == 30
    assert peers.heartbeat_timeout({"GPTJAX_HEARTBEAT_TIMEOUT": "120"}) == 120
    for bad in ("0", "-5", "1.5", "ten"):
        with pytest.raises(GptjaxError, match="GPTJAX_HEARTBEAT_TIMEOUT"):
            peers.heartbeat_timeout({"GPTJAX_HEARTBEAT_TIMEOUT": bad})


def test_gloo_connection_lines_are_dropped_and_the_rest_passes_through_as_written():
    """The stdout filter of multi-process runs (gptjax.peers): Gloo's "connected to N peer
    ranks" lines go, everything else arrives unchanged, partial lines (a bar's \\r updates)
    without waiting for a newline."""
    import os
    import threading

    from gptjax import peers

    read_in, write_in = os.pipe()
    read_out, write_out = os.pipe()
    thread = threading.Thread(target=peers._forward, args=(read_in, write_out, peers._stdout_line))
    thread.start()
    gloo = b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
    os.write(write_in, gloo)
    os.write(write_in, b"step 1/3\rstep 2/3")
    partial = os.read(read_out, 100)
    os.write(write_in, b"\n[Gl")
    os.write(write_in, b"oo] Rank 1 is connected to 1 peer ranks. Expected ...\ngptjax: done\n")
    os.close(write_in)
    thread.join(timeout=10)
    os.close(write_out)
    rest = b""
    while chunk := os.read(read_out, 1000):
        rest += chunk
    assert partial == b"step 1/3\rstep 2/3"
    assert partial + rest == b"step 1/3\rstep 2/3\ngptjax: done\n"


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_config_warnings_print_once_per_multi_process_run(monkeypatch, capsys, rank, lines):
    import warnings

    from gptjax import quiet
    from gptjax.errors import GptjaxWarning

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after
    monkeypatch.setenv("JAX_PROCESS_ID", rank)
    quiet.show_warnings_as_lines()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("warmup shortened", GptjaxWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.count("gptjax: warning: warmup shortened") == lines


def test_every_subcommand_has_a_function_and_every_function_a_subcommand():
    """The parser (cli_parser.py) and the dispatch table (cli.COMMANDS) name the same commands."""
    from gptjax.cli import COMMANDS

    assert set(_build_parser()._subparsers._group_actions[0].choices) == set(COMMANDS)
