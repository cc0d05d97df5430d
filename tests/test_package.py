"""The package's public names: what the README lists is reachable after ``import gptjax``."""

import types

import gptjax


def test_readme_entry_points_are_attributes():
    assert callable(gptjax.evaluate.lm_metrics)
    assert callable(gptjax.finetune.finetune)


def test_train_is_the_module_and_calling_it_trains():
    import gptjax.train as train_module

    assert isinstance(gptjax.train, types.ModuleType) and gptjax.train is train_module
    assert callable(gptjax.train.build) and callable(gptjax.train)
    # Calling the module is calling the function (same signature, same result type).
    assert gptjax.train.__call__.__annotations__["return"] in ("TrainResult", gptjax.train.TrainResult)


def test_sampling_knobs_have_one_definition_and_one_validation():
    import math

    import pytest

    from gptjax.config import SampleConfig
    from gptjax.sample import SamplingParams

    assert SampleConfig().sampling_params == SamplingParams()  # the same defaults
    for bad in ({"temperature": math.inf}, {"top_k": -1}, {"top_p": 0.0}, {"min_p": 1.0}):
        with pytest.raises(gptjax.GptjaxError) as from_config:
            SampleConfig(**bad)
        with pytest.raises(gptjax.GptjaxError) as from_params:
            SamplingParams(**bad)
        assert str(from_config.value) == str(from_params.value)


def test_library_calls_leave_the_allocator_alone():
    """gptjax.generate (like gptjax.train) does not set glibc's malloc options; entry points may."""
    import subprocess
    import sys

    code = (
        "import jax, gptjax, gptjax.host as host\n"
        "from gptjax.config import MODEL_PRESETS\n"
        "model = gptjax.GPT(MODEL_PRESETS['nano'], key=jax.random.key(0))\n"
        "gptjax.generate(model, [[1, 2]], max_new_tokens=2)\n"
        "print(host._applied)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None"
