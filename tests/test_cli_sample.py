"""``gptjax sample`` on a run directory written by ``gptjax train``."""

import json

import numpy as np
import pytest

from gptjax import load
from gptjax.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    corpus = root / "text"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        (corpus / f"{i}.py").write_text(
            "\n".join(f"def f{j}(x):\n    return x + {j}" for j in rng.integers(0, 9, 40))
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTJAX_CACHE_DIR", str(root / "cache"))
        code = main(
            [
                "train",
                "nano",
                f"data.source={corpus}",
                "data.val_fraction=0.1",
                "train.steps=20",
                "train.batch_size=8",
                "train.eval_every=0",
                "train.eval_max_batches=1",
                "train.checkpoint_every=0",
                "optim.warmup_steps=2",
                "sample.num_samples=0",  # the tests sample from the run themselves
                "--run-dir",
                str(root / "run"),
            ]
        )
    assert code == 0
    return root / "run"


def test_sample_prints_text(run_dir, capsys):
    assert (
        main(["sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12", "--num-samples", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert out.count("def ") >= 2


def test_sample_json_parses_and_matches_the_api(run_dir, capsys):
    args = [
        "sample",
        str(run_dir),
        "--prompt",
        "def",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    ]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    (row,) = record["samples"]
    assert row["prompt"] == "def"
    assert len(row["tokens"]) == len(row["logprobs"]) <= 8
    assert all(lp <= 0 for lp in row["logprobs"])
    model, config, tokenizer = load(run_dir)
    assert config.model.n_layer == 2 and tokenizer.name == "bytes"
    assert row["text"] == tokenizer.decode(row["tokens"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "-2"], "top_k"),
        (["--top-p", "1.5"], "top_p"),
        (["--prompt", "x" * 100], "64"),
    ],
)
def test_sample_bad_input_is_one_line_exit_2(run_dir, capsys, args, message):
    assert main(["sample", str(run_dir), "--max-new-tokens", "4", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_sample_missing_run_dir(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
