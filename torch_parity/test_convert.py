"""Layout converters: exact round trips and shape checks."""

import numpy as np
import pytest

from torch_parity import convert

rng = np.random.default_rng(0)


def test_linear_weight_round_trip_and_meaning():
    w = rng.normal(size=(6, 4)).astype(np.float32)  # torch (out, in)
    k = convert.kernel_from_torch(w, (4,), (6,))
    x = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(x @ k, x @ w.T, rtol=1e-6)  # same linear map
    np.testing.assert_array_equal(convert.kernel_to_torch(k), w)


def test_multi_head_kernel_round_trip():
    w = rng.normal(size=(2 * 3, 5)).astype(np.float32)  # Linear(5, heads*head_dim)
    k = convert.kernel_from_torch(w, (5,), (2, 3))
    assert k.shape == (5, 2, 3)
    np.testing.assert_array_equal(convert.kernel_to_torch(k, n_in=1), w)
    wo = rng.normal(size=(5, 6)).astype(np.float32)  # Linear(heads*head_dim, 5)
    ko = convert.kernel_from_torch(wo, (2, 3), (5,))
    assert ko.shape == (2, 3, 5)
    np.testing.assert_array_equal(convert.kernel_to_torch(ko, n_in=2), wo)


def test_factor_round_trips_and_product():
    lora_a = rng.normal(size=(4, 6)).astype(np.float32)  # PEFT (r, in)
    lora_b = rng.normal(size=(10, 4)).astype(np.float32)  # PEFT (out, r)
    a = convert.a_from_peft(lora_a, (6,))
    b = convert.b_from_peft(lora_b, (2, 5))
    assert a.shape == (6, 4) and b.shape == (4, 2, 5)
    np.testing.assert_array_equal(convert.a_to_peft(a), lora_a)
    np.testing.assert_array_equal(convert.b_to_peft(b), lora_b)
    # delta W in both layouts is the same map: kernel (in, out) = (B A)^T
    np.testing.assert_allclose(
        np.tensordot(a, b, 1).reshape(6, 10), (lora_b @ lora_a).T, rtol=1e-5, atol=1e-6
    )


def test_shape_errors():
    with pytest.raises(ValueError, match=r"Linear.weight: expected shape \(6, 4\), got \(4, 6\)"):
        convert.kernel_from_torch(np.zeros((4, 6)), (4,), (6,))
    with pytest.raises(ValueError, match="lora_B.weight"):
        convert.b_from_peft(np.zeros((9, 4)), (10,))
