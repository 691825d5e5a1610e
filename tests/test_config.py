import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora
from jax_lora import LoraConfig


def test_defaults_and_scale():
    cfg = LoraConfig(rank=8)
    assert cfg.alpha == 8.0 and cfg.scale == 1.0
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert LoraConfig(rank=16, alpha=8, rslora=True).scale == pytest.approx(8 / math.sqrt(16))
    assert cfg.param_dtype == np.float32
    assert LoraConfig(rank=2, param_dtype=jnp.bfloat16).param_dtype == jnp.bfloat16


def test_targets_normalised_and_input_untouched():
    targets = [r".*/query", r".*/value"]
    cfg = LoraConfig(rank=2, targets=targets, exclude="head")
    assert cfg.targets == (r".*/query", r".*/value")
    assert cfg.exclude == ("head",)
    assert targets == [r".*/query", r".*/value"]
    hash(cfg)  # usable as a linen module attribute


@pytest.mark.parametrize(
    "kwargs, err, text",
    [
        ({"rank": 0}, ValueError, "`rank` must be >= 1"),
        ({"rank": -3}, ValueError, "`rank` must be >= 1"),
        ({"rank": 2.0}, TypeError, "`rank` must be an int"),
        ({"rank": True}, TypeError, "`rank` must be an int"),
        ({"rank": 2, "alpha": 0}, ValueError, "`alpha`"),
        ({"rank": 2, "alpha": float("nan")}, ValueError, "`alpha`"),
        ({"rank": 2, "dropout": -0.1}, ValueError, "`dropout` must be in [0, 1)"),
        ({"rank": 2, "dropout": 1.0}, ValueError, "`dropout` must be in [0, 1)"),
        ({"rank": 2, "init": "kaiming"}, ValueError, "`init` must be one of"),
        ({"rank": 2, "init": 3}, TypeError, "`init` must be one of"),
        ({"rank": 2, "targets": "(unclosed"}, ValueError, "`targets` pattern '(unclosed'"),
        ({"rank": 2, "targets": [1]}, TypeError, "`targets` entries"),
        ({"rank": 2, "exclude": 5}, TypeError, "`exclude`"),
        ({"rank": 2, "param_dtype": jnp.int32}, TypeError, "`param_dtype`"),
    ],
)
def test_bad_config(kwargs, err, text):
    with pytest.raises(err, match=__import__("re").escape(text)):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rslora": "false"}, "`rslora`"),
        ({"rslora": "True"}, "`rslora`"),
        ({"rslora": 1}, "`rslora`"),
        ({"rslora": None}, "`rslora`"),
        ({"param_dtype": None}, "`param_dtype`"),
        ({"param_dtype": "float32"}, None),  # a dtype name is not ambiguous: accepted
        ({"dropout": "0.1"}, "`dropout`"),
        ({"dropout": None}, "`dropout`"),
        ({"dropout": True}, "`dropout`"),
        ({"alpha": "8"}, "`alpha`"),
    ],
)
def test_ambiguous_types_refused_naming_the_field(kwargs, field):
    if field is None:
        assert LoraConfig(rank=2, **kwargs).param_dtype == np.float32
        return
    with pytest.raises(TypeError, match=field):
        LoraConfig(rank=2, **kwargs)


def test_numpy_scalars_accepted_and_normalised():
    cfg = LoraConfig(
        rank=np.int64(4),
        alpha=np.float32(8.0),
        dropout=np.float32(0.25),
        rslora=np.bool_(True),
        param_dtype=jnp.bfloat16,
    )
    assert type(cfg.rank) is int and cfg.rank == 4
    assert type(cfg.alpha) is float and cfg.alpha == 8.0
    assert type(cfg.dropout) is float and cfg.dropout == 0.25
    assert cfg.rslora is True and cfg.scale == 8.0 / 2.0
    assert cfg.param_dtype == jnp.bfloat16
    assert LoraConfig(rank=2, rslora=np.bool_(False)).rslora is False
    assert LoraConfig(rank=2, dropout=0).dropout == 0.0
    hash(LoraConfig(rank=2, rslora=np.bool_(True)))


class _FcMLP(nn.Module):
    """Two layers whose names are prefixes of each other: ``fc`` and ``fc1``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="fc1")(nn.relu(nn.Dense(5, name="fc")(x)))


def _adapted(**kwargs):
    wrapped = jax_lora.wrap(_FcMLP(), LoraConfig(rank=2, **kwargs))
    v = wrapped.init(jax.random.key(0), jnp.ones((1, 4)))
    return {k: (v["a"].shape, v["b"].shape) for k, v in v["lora"].items()}


def test_targets_and_exclude_fullmatch():
    assert _adapted() == {"fc": ((4, 2), (2, 5)), "fc1": ((5, 2), (2, 3))}
    assert _adapted(targets="fc") == {"fc": ((4, 2), (2, 5))}  # not fc1: re.fullmatch
    assert _adapted(exclude="fc") == {"fc1": ((5, 2), (2, 3))}  # fc1 stays adapted
    assert _adapted(targets="fc1") == {"fc1": ((5, 2), (2, 3))}


def test_empty_targets_message():
    with pytest.raises(ValueError) as e:
        _adapted(targets=[])
    msg = str(e.value)
    assert "`targets` is empty" in msg and "exclude" not in msg


def test_excluded_target_message():
    with pytest.raises(ValueError) as e:
        _adapted(targets="fc1", exclude="fc1")
    msg = str(e.value)
    assert "'fc1'" in msg and "excluded by `exclude` pattern 'fc1'" in msg
    assert "matches no supported layer" not in msg


def test_exclude_everything_message():
    with pytest.raises(ValueError) as e:
        _adapted(exclude="fc.*")
    msg = str(e.value)
    assert "`exclude` pattern 'fc.*' excludes every supported layer" in msg
    assert "fc1" in msg  # lists what was excluded
