"""Every class of bad input issue 19 found, for every command that takes it: exit 2, one
line on stderr, no traceback. Then random overrides, arguments and file contents through
the commands (hypothesis): never a traceback, never exit 1.

Rows run in-process through ``gptjax.cli.main`` against one small trained run.
"""

import json
import os
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptjax.cli import main

TRAIN = [
    "nano",
    "data.source={corpus}",
    "data.val_fraction=0.1",
    "model.block_size=32",
    "train.steps=2",
    "train.batch_size=8",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.peak_flops=1e12",
    "optim.warmup_steps=1",
    "sample.num_samples=0",
]
SURROGATE = "caf\udce9"  # how Python decodes an argument with an invalid UTF-8 byte

# (id, argv); {name} fields are paths made by the ``assets`` fixture.
# fmt: off
ROWS = [
    # eval: batch size, shots, task files
    ("eval-batch-size-0", ["eval", "{run}", "--batch-size", "0"]),
    ("eval-batch-size-negative", ["eval", "{run}", "--batch-size", "-4"]),
    ("eval-shots-negative", ["eval", "{run}", "--task", "{task}", "--shots", "-1"]),
    ("eval-task-string-line", ["eval", "{run}", "--task", "{task_string}"]),
    ("eval-task-number-line", ["eval", "{run}", "--task", "{task_number}"]),
    ("eval-task-latin1", ["eval", "{run}", "--task", "{task_latin1}"]),
    ("eval-shots-from-latin1", ["eval", "{run}", "--task", "{task}", "--shots", "1",
                                "--shots-from", "{task_latin1}"]),
    ("eval-data-latin1", ["eval", "{run}", "--data", "{latin1_txt}"]),
    # prompts: invalid UTF-8 (lone surrogates)
    ("sample-surrogate-prompt", ["sample", "{run}", "--prompt", SURROGATE, "--max-new-tokens", "2"]),
    ("sample-latin1-prompt-file", ["sample", "{run}", "--prompt-file", "{latin1_txt}"]),
    ("attention-surrogate-prompt", ["attention", "{run}", "--prompt", SURROGATE, "--out", "{tmp}/a.png"]),
    ("prepare-surrogate-source", ["prepare", "--data", "{tmp}/" + SURROGATE]),
    ("train-surrogate-sample-prompt", ["train", *TRAIN, "sample.num_samples=1", f"sample.prompt={SURROGATE}",
                                       "--run-dir", "{tmp}/r_surrogate"]),
    # import-hf: config.json types, index files, tokenizer, existing runs
    ("import-config-wrong-types", ["import-hf", "{hf_wrong_types}", "{tmp}/imp1"]),
    ("import-config-string-layers", ["import-hf", "{hf_string_layers}", "{tmp}/imp2"]),
    ("import-broken-index", ["import-hf", "{hf_broken_index}", "{tmp}/imp3"]),
    ("import-index-missing-shard", ["import-hf", "{hf_index_missing_shard}", "{tmp}/imp4"]),
    ("import-unknown-tokenizer", ["import-hf", "{hf}", "{tmp}/imp5", "--tokenizer", "nope"]),
    ("import-into-a-run", ["import-hf", "{hf}", "{run}", "--tokenizer", "bytes"]),
    ("export-onto-its-run", ["export-hf", "{run}", "{run}"]),
    # --out: a file in the way, a directory, an unknown image suffix
    ("attention-out-is-dir", ["attention", "{run}", "--prompt", "hi", "--out", "{empty_dir}"]),
    ("attention-out-under-file", ["attention", "{run}", "--prompt", "hi", "--out", "{blocker}/a.png"]),
    ("attention-out-bad-suffix", ["attention", "{run}", "--prompt", "hi", "--out", "{tmp}/a.xyz"]),
    ("plot-out-is-file", ["plot", "{run}", "--out", "{blocker}"]),
    # sweeps: corrupt directories, budgets, axes
    ("fit-corrupt-sweep-json", ["fit", "{sweep_corrupt}"]),
    ("fit-sweep-json-not-object", ["fit", "{sweep_list}"]),
    ("plot-corrupt-sweep", ["plot", "{sweep_corrupt}"]),
    ("fit-budget-0", ["fit", "{sweep_corrupt}", "--budget", "0"]),
    ("fit-budget-nan", ["fit", "{sweep_corrupt}", "--budget", "nan"]),
    ("fit-bootstrap-negative", ["fit", "{sweep_corrupt}", "--bootstrap", "-1"]),
    ("sweep-axis-nan", ["sweep", "{sweep_nan}", "--dir", "{tmp}/s1"]),
    ("sweep-axis-inf", ["sweep", "{sweep_inf}", "--dir", "{tmp}/s2"]),
    ("sweep-axis-float-layers", ["sweep", "{sweep_float_layers}", "--dir", "{tmp}/s3"]),
    ("sweep-calls-sys-exit", ["sweep", "{exit_py_sweep}", "--dir", "{tmp}/s4"]),
    # finetune: data encodings, run directories
    ("finetune-latin1-data", ["finetune", "init_from={run}", "train_file={task_latin1}",
                              "run_dir={tmp}/ft1"]),
    ("finetune-run-dir-a-file", ["finetune", "init_from={run}", "train_file={task}", "run_dir={blocker}"]),
    ("finetune-calls-sys-exit", ["finetune", "{exit_py}"]),
    # train / info: seeds, attention kernels, cache directories, config files
    ("train-seed-beyond-64-bits", ["train", *TRAIN, "train.seed=99999999999999999999",
                                   "--run-dir", "{tmp}/r_seed"]),
    ("info-seed-beyond-64-bits", ["info", "nano", "train.seed=99999999999999999999"]),
    ("train-cudnn-on-cpu", ["train", *TRAIN, "model.attention=cudnn", "--run-dir", "{tmp}/r_cudnn"]),
    ("train-cache-dir-a-file", ["train", *TRAIN, "data.cache_dir={blocker}", "--run-dir", "{tmp}/r_cache"]),
    ("prepare-cache-dir-a-file", ["prepare", "--data", "{corpus}", "--cache-dir", "{blocker}"]),
    ("train-batch-larger-than-corpus", ["train", *TRAIN, "train.batch_size=100000000",
                                        "--run-dir", "{tmp}/r_batch"]),
    ("train-lr-inf-from-file", ["train", "{lr_inf_py}", "--run-dir", "{tmp}/r_lr"]),
    ("info-non-py-file", ["info", "{latin1_txt}"]),
    ("info-float-layers-from-file", ["info", "{float_layers_py}"]),
    ("info-calls-sys-exit", ["info", "{exit_py}"]),
    ("train-calls-sys-exit", ["train", "{exit_py}"]),
    ("prepare-negative-token-ids", ["prepare", "--data", "{negative_npy}"]),
    # a damaged run: the error line comes without orbax's warnings before it
    ("sample-damaged-run", ["sample", "{damaged_run}"]),
    ("eval-damaged-run", ["eval", "{damaged_run}"]),
]
# fmt: on


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    paths = {"tmp": tmp}
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef"], 200)))
    paths["corpus"] = corpus
    (tmp / "empty_dir").mkdir()
    paths["empty_dir"] = tmp / "empty_dir"
    task = {"context": "ab", "choices": [" cd", " ef"], "label": 0}
    recipe = "from gptjax.config import load_config\nfrom gptjax.scaling import Sweep\n"
    files = {
        "task": json.dumps(task) + "\n",
        "task_string": json.dumps(task) + '\n"just a string"\n',
        "task_number": "5\n",
        "task_latin1": b'{"context": "caf\xe9", "choices": ["a", "b"], "label": 0}\n',
        "latin1_txt": "caf\u00e9 cr\u00e8me\n".encode("latin-1"),
        "blocker": "a file where a directory should be",
        "exit_py": "import sys\nsys.exit(3)\n",
        "exit_py_sweep": "import sys\nsys.exit(0)\n",
        "lr_inf_py": "from gptjax.config import load_config, OptimConfig\nimport dataclasses\n"
        "def get_config():\n    c = load_config('nano')\n"
        "    return dataclasses.replace(c, optim=dataclasses.replace(c.optim, lr=float('inf')))\n",
        "float_layers_py": "from gptjax.config import load_config\nimport dataclasses\n"
        "def get_config():\n    c = load_config('nano')\n"
        "    return dataclasses.replace(c, model=dataclasses.replace(c.model, n_layer=2.5))\n",
        "sweep_nan": recipe + "def get_sweep():\n"
        "    return Sweep(name='s', base=load_config('nano'), axes={'lr': [float('nan')]})\n",
        "sweep_inf": recipe + "def get_sweep():\n"
        "    return Sweep(name='s', base=load_config('nano'), axes={'lr': [float('inf')]})\n",
        "sweep_float_layers": recipe + "def get_sweep():\n"
        "    return Sweep(name='s', base=load_config('nano'), axes={'model.n_layer': [1.5]})\n",
    }
    suffix = {"task": ".jsonl", "task_string": ".jsonl", "task_number": ".jsonl", "task_latin1": ".jsonl",
              "latin1_txt": ".txt", "blocker": ""}  # fmt: skip
    for key, content in files.items():
        path = tmp / (key + suffix.get(key, ".py"))
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        paths[key] = path
    np.save(tmp / "negative.npy", np.array([1, 2, -1, 3] * 50, np.int64))
    paths["negative_npy"] = tmp / "negative.npy"
    for key, content in {"sweep_corrupt": "{not json", "sweep_list": "[1, 2]"}.items():
        (tmp / key).mkdir()
        (tmp / key / "sweep.json").write_text(content)
        paths[key] = tmp / key
    cache = tmp / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTJAX_CACHE_DIR", str(cache))
        mp.chdir(tmp)
        assert main(["train", *_fill(TRAIN, {"corpus": str(corpus)}), "--run-dir", str(tmp / "run")]) == 0
        paths["run"] = tmp / "run"
        assert main(["export-hf", str(tmp / "run"), str(tmp / "hf")]) == 0
    paths["hf"] = tmp / "hf"
    hf_config = json.loads((tmp / "hf" / "config.json").read_text())
    variants = {
        "hf_wrong_types": {**hf_config, "n_layer": [2], "n_embd": "wide"},
        "hf_string_layers": {**hf_config, "n_layer": "2"},
        "hf_broken_index": hf_config,
        "hf_index_missing_shard": hf_config,
    }
    for key, config_json in variants.items():
        (tmp / key).mkdir()
        (tmp / key / "config.json").write_text(json.dumps(config_json))
        paths[key] = tmp / key
    (tmp / "hf_broken_index" / "model.safetensors.index.json").write_text('{"weight_map": [')
    (tmp / "hf_index_missing_shard" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "nowhere.safetensors"}})
    )
    import shutil

    shutil.copytree(tmp / "run", tmp / "damaged_run")
    for f in (tmp / "damaged_run" / "checkpoints").rglob("*"):
        if f.is_file() and "params" in f.parts and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[:8])
    paths["damaged_run"] = tmp / "damaged_run"
    return {k: str(v) for k, v in paths.items()}, cache


def _fill(argv, paths):
    """``{name}`` fields replaced by paths (and nothing else: random text may hold braces)."""
    out = []
    for arg in argv:
        for key, value in paths.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def _run(argv, capsys):
    """(exit code, stderr, traceback text or ''), in-process."""
    capsys.readouterr()
    escaped = ""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException:  # what a user would see as a traceback
        code, escaped = 1, traceback.format_exc()
    return code, capsys.readouterr().err, escaped


def _classify(code, err, escaped):
    """``clean`` (exit 2, one line), ``traceback``, or ``accepted`` (exit 0: harmful input taken)."""
    if escaped or "Traceback" in err:
        return "traceback"
    if code == 0:
        return "accepted"
    lines = err.strip().splitlines()
    return "clean" if code == 2 and len(lines) == 1 and lines[0].startswith("gptjax") else f"exit {code}"


@pytest.mark.parametrize("argv", [row[1] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_and_exit_2(argv, assets, capsys, monkeypatch):
    paths, cache = assets
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(cache))
    monkeypatch.chdir(paths["tmp"])
    code, err, escaped = _run(_fill(argv, paths), capsys)
    assert _classify(code, err, escaped) == "clean", f"exit {code}; stderr:\n{err}{escaped}"


# --------------------------------------------------------------------------------------
# Random input through every command

FUZZ = settings(
    deadline=None, database=None, max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
texts = st.text(max_size=12)
numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats().map(repr),
    st.sampled_from(["nan", "-inf", "0", "-1"]),
)
values = st.one_of(numbers, texts, st.sampled_from(["", "true", "rope", "cudnn", "gpt2", "{blocker}"]))
keys = st.sampled_from(["model.n_layer", "model.n_head", "model.attention", "model.block_size",
                        "optim.lr", "optim.accum_steps", "train.seed", "train.batch_size",
                        "data.tokenizer", "data.cache_dir", "sample.temperature", "sample.top_p",
                        "sample.prompt", "mesh.data"])  # fmt: skip
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, values), max_size=3)
small_ints = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["10**3", "1.5", "", "x"]))
floats = st.one_of(st.floats().map(repr), st.sampled_from(["nan", "-inf", "1e400", "", "x"]))
# Commands that load the trained run: their options and values (sizes kept small enough
# that an accepted value finishes in seconds).
OPTIONS = {
    "sample": {"--prompt": texts, "--max-new-tokens": small_ints, "--temperature": floats,
               "--top-k": small_ints, "--top-p": floats, "--min-p": floats, "--seed": numbers,
               "--num-samples": small_ints},
    "eval": {"--batch-size": small_ints, "--max-batches": small_ints, "--shots": small_ints,
             "--seed": numbers, "--split": st.sampled_from(["val", "train", "all", "test"]), "--data": texts},
    "attention": {"--prompt": texts, "--layer": small_ints,
                  "--out": st.sampled_from(["a.png", "a", "a.PDF", "."])},
    "fit": {"--budget": floats, "--bootstrap": small_ints},
}  # fmt: skip


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(["info", "sample", "eval", "attention", "fit", "prepare", "file"]))
    if command == "info":
        return ["info", "nano", *draw(overrides)]
    if command == "prepare":
        return ["prepare", "--data", "{fuzz_file}", "--tokenizer", draw(st.sampled_from(["bytes", "gpt2"]))]
    if command == "file":
        return [draw(st.sampled_from(["info", "sweep", "finetune"])), "{fuzz_file}"]
    target = "{sweep_corrupt}" if command == "fit" else "{run}"
    argv = [command, target]
    if command == "attention":
        argv += ["--prompt", draw(texts)]
    for option in draw(st.lists(st.sampled_from(sorted(OPTIONS[command])), max_size=3, unique=True)):
        argv += [option, draw(OPTIONS[command][option])]
    if command == "sample" and "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "2"]
    return argv


file_contents = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"import sys\nsys.exit(1)\n", b"def get_config():\n    return None\n", b"\xff\xfe",
                     b"x = 1/0\n"]),
)  # fmt: skip


@FUZZ
@given(argv=command_lines(), content=file_contents)
def test_random_input_never_shows_a_traceback(argv, content, assets, capsys, monkeypatch):
    paths, cache = assets
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(cache))
    monkeypatch.chdir(paths["tmp"])
    fuzz_file = os.path.join(paths["tmp"], "fuzz.py" if argv[0] != "prepare" else "fuzz.txt")
    with open(fuzz_file, "wb") as f:
        f.write(content)
    code, err, escaped = _run(_fill(argv, {**paths, "fuzz_file": fuzz_file}), capsys)
    verdict = _classify(code, err, escaped)
    assert verdict in ("clean", "accepted"), f"{argv}: exit {code}; stderr:\n{err}{escaped}"


bad_counts = st.sampled_from(["0", "-1", "x", "", "1.5", "10**3"])
sources = st.sampled_from(["{run}", "{damaged_run}", "{fuzz_file}", "{empty_dir}", "{tmp}/missing"])
targets = st.sampled_from(["{out}", "{fuzz_file}", "{run}", "{tmp}"])


@st.composite
def train_convert_and_launch_lines(draw):
    command = draw(st.sampled_from(["train", "train-file", "import-hf", "export-hf", "launch"]))
    if command == "train":  # the resolved config only: the overrides are what is fuzzed
        stop_at = [a for value in draw(st.lists(small_ints, max_size=1)) for a in ("--stop-at", value)]
        return ["train", "nano", "data.source={corpus}", *draw(overrides), *stop_at, "--print-config"]
    if command == "train-file":
        return ["train", "{fuzz_file}", "--print-config"]
    if command == "import-hf":  # the fuzzed file is the Hugging Face config.json
        return ["import-hf", draw(st.sampled_from(["{fuzz_dir}", "{hf}", "{fuzz_file}"])), "{out}",
                "--tokenizer", draw(st.one_of(texts, st.sampled_from(["gpt2", "bytes"])))]  # fmt: skip
    if command == "export-hf":
        return ["export-hf", draw(sources), draw(targets)]
    processes = draw(st.one_of(bad_counts, st.just("1")))
    tail = ["--", "info", "nano", *draw(overrides)] if processes != "1" else []  # never starts one
    return ["launch", "--processes", processes, "--devices-per-process", draw(bad_counts), *tail]


@pytest.mark.slow
@settings(FUZZ, max_examples=40)
@given(argv=train_convert_and_launch_lines(), content=file_contents, n=st.integers(0, 10**9))
def test_random_input_to_train_convert_and_launch_never_shows_a_traceback(
    argv, content, n, assets, capsys, monkeypatch
):
    paths, cache = assets
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(cache))
    monkeypatch.chdir(paths["tmp"])
    fuzz_dir = os.path.join(paths["tmp"], f"fuzz-hf-{n}")
    os.makedirs(fuzz_dir, exist_ok=True)
    with open(os.path.join(fuzz_dir, "config.json"), "wb") as f:
        f.write(content)
    fuzz_file = os.path.join(paths["tmp"], "fuzz.py")
    with open(fuzz_file, "wb") as f:
        f.write(content)
    out = os.path.join(paths["tmp"], f"out-{n}")
    filled = _fill(argv, {**paths, "fuzz_file": fuzz_file, "fuzz_dir": fuzz_dir, "out": out})
    code, err, escaped = _run(filled, capsys)
    verdict = _classify(code, err, escaped)
    assert verdict in ("clean", "accepted"), f"{filled}: exit {code}; stderr:\n{err}{escaped}"
