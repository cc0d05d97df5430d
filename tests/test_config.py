"""Config validation, overrides, config files and presets."""

import dataclasses
import textwrap

import pytest

from gptjax.config import (
    MODEL_PRESETS,
    Config,
    ModelConfig,
    OptimConfig,
    apply_overrides,
    load_config,
    quickstart,
)
from gptjax.errors import GptjaxError

# (overrides applied to the quickstart config, a word the error message must contain).
INVALID_OVERRIDES = [
    (["model.n_head=5"], "n_embd"),  # 128 % 5 != 0
    (["model.n_layer=0"], "n_layer"),
    (["model.n_embd=-8"], "n_embd"),
    (["model.vocab_size=0"], "vocab_size"),
    (["model.block_size=0"], "block_size"),
    (["model.mlp_ratio=0"], "mlp_ratio"),
    (["model.attn_dropout=1.0"], "attn_dropout"),
    (["model.resid_dropout=-0.1"], "resid_dropout"),
    (["model.embd_dropout=1.5"], "embd_dropout"),
    (["model.layer_norm_epsilon=0"], "layer_norm_epsilon"),
    (["model.position=rope", "model.n_embd=30", "model.n_head=2"], "n_embd/n_head"),
    (["model.vocab_size=200"], "vocab_size"),  # the byte tokenizer needs 257
    (["data.tokenizer=gpt2", "model.vocab_size=300"], "vocab_size"),  # 300 rows cannot hold 50257 tokens
    (["optim.warmup_steps=801"], "warmup_steps"),  # quickstart trains for 800 steps
    (["optim.lr=0"], "lr"),
    (["optim.min_lr=1"], "min_lr"),  # above lr
    (["optim.lr=nan"], "optim.lr"),
    (["optim.beta2=1.0"], "beta2"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["optim.accum_steps=3"], "accum_steps"),  # batch 16 is not divisible by 3
    (["model.n_layers=4"], "model.n_layers"),  # unknown field
    (["models.n_layer=4"], "models.n_layer"),  # unknown section
    (["n_layer=4"], "n_layer"),  # no section at all
    (["model.n_layer"], "model.n_layer"),  # no value
    (["model.n_layer=abc"], "model.n_layer"),
    (["model.n_layer=2.5"], "model.n_layer"),
    (["optim.lr=fast"], "optim.lr"),
    (["model.position=alibi"], "model.position"),
    (["model.remat=some"], "model.remat"),
    (["model.bias=maybe"], "model.bias"),
    (["sample.top_p=0"], "top_p"),
    (["sample.top_p=1.5"], "top_p"),
    (["sample.temperature=-1"], "temperature"),
    (["mesh.data=0"], "mesh.data"),
    (["mesh.tensor=-2"], "mesh.tensor"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "fsdp"),
    (["train.steps=0"], "steps"),
    (["train.batch_size=0"], "batch_size"),
    (["data.val_fraction=1"], "val_fraction"),
]


@pytest.mark.parametrize(("overrides", "field_name"), INVALID_OVERRIDES, ids=lambda v: " ".join(v))
def test_invalid_override_names_the_field(overrides, field_name):
    with pytest.raises(GptjaxError, match=field_name):
        load_config("quickstart", overrides)


@pytest.mark.parametrize(
    ("section_cls", "kwargs", "field_name"),
    [
        (ModelConfig, {"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
        (ModelConfig, {"position": "alibi"}, "position"),
        (ModelConfig, {"dtype": "fp16"}, "dtype"),
        (ModelConfig, {"attention": "flash"}, "attention"),
        (ModelConfig, {"remat": "all"}, "remat"),
        (OptimConfig, {"schedule": "linear"}, "schedule"),
    ],
)
def test_invalid_section_constructed_directly(section_cls, kwargs, field_name):
    """Config files build dataclasses directly, so validation cannot live in the override parser."""
    with pytest.raises(GptjaxError, match=field_name):
        section_cls(**kwargs)


def test_overrides_apply_and_parse_types():
    config = load_config(
        "quickstart",
        [
            "model.n_layer=3",
            "model.bias=false",
            "model.position=rope",
            "optim.lr=1e-3",
            "train.steps=1_000",
            "--sample.prompt=Once upon",
            "name=mine",
        ],
    )
    assert config.name == "mine"
    assert config.model.n_layer == 3 and config.model.bias is False and config.model.position == "rope"
    assert config.optim.lr == 1e-3 and config.train.steps == 1000
    assert config.sample.prompt == "Once upon"
    # Untouched fields keep the preset's values.
    assert config.model.n_embd == quickstart().model.n_embd
    assert config.optim.warmup_steps == quickstart().optim.warmup_steps


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("1", True), ("Yes", True), ("False", False), ("0", False)]
)
def test_bool_override_parsing(raw, value):
    assert apply_overrides(quickstart(), [f"model.bias={raw}"]).model.bias is value


def test_overrides_are_validated_together():
    # Each alone would be invalid against the preset; together they are consistent.
    config = load_config("quickstart", ["model.n_embd=64", "model.n_head=4"])
    assert config.model.head_dim == 16
    config = load_config("quickstart", ["train.steps=20", "optim.warmup_steps=10"])
    assert config.train.steps == 20


def test_config_file_with_get_config(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(
        textwrap.dedent(
            """
            from gptjax import Config, ModelConfig, TrainConfig

            def get_config():
                return Config(
                    name="tiny",
                    model=ModelConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(steps=200, batch_size=4),
                )
            """
        )
    )
    config = load_config(str(path))
    assert config.name == "tiny" and config.model.n_layer == 1 and config.train.batch_size == 4
    config = load_config(str(path), ["model.n_layer=2", "train.batch_size=8"])
    assert config.model.n_layer == 2 and config.train.batch_size == 8 and config.model.n_embd == 16


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x = 1\n", "get_config"),
        ("def get_config():\n    return {'model': {}}\n", "not a gptjax Config"),
        ("import no_such_module_here\n", "ModuleNotFoundError"),
        (
            "from gptjax import ModelConfig\nMODEL = ModelConfig(n_embd=10, n_head=3)\n",
            r"n_embd \(10\) must be divisible",
        ),
    ],
)
def test_bad_config_file(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(GptjaxError, match=message):
        load_config(str(path))


def test_missing_config_file_and_unknown_preset(tmp_path):
    with pytest.raises(GptjaxError, match="does not exist"):
        load_config(str(tmp_path / "absent.py"))
    with pytest.raises(GptjaxError, match="unknown config 'gpt5'.*gpt2"):
        load_config("gpt5")


def test_presets():
    assert load_config().name == "quickstart"
    gpt2 = load_config("gpt2")
    assert gpt2.model == MODEL_PRESETS["gpt2"] and gpt2.data.tokenizer == "gpt2"
    assert load_config("gpt1").data.tokenizer == "bytes"
    assert load_config("nano").model.vocab_size == 257


def test_dict_round_trip_and_unknown_keys():
    config = load_config("quickstart", ["model.position=rope", "optim.schedule=wsd"])
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(GptjaxError, match="unknown config section 'modle'"):
        Config.from_dict({"modle": {}})
    with pytest.raises(GptjaxError, match="n_layers"):
        Config.from_dict({"model": {"n_layers": 2}})


def test_configs_are_frozen_and_keyword_only():
    config = quickstart()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.n_layer = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelConfig(257)  # type: ignore[misc]
