"""Loading a GGUF leaves nothing mapped: no array handed out is a view into the reader's
memmap, so once the reader and the HF tensors are dropped the file is unmapped (otherwise its
pages stay in the process's RSS for as long as the model lives)."""

import gc
import os

import _lm
import jax
import numpy as np
import pytest

from jax_lora.lm import llama

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc")


def _mapped(path: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(os.path.realpath(path)) for line in f)


@pytest.mark.parametrize("qtype", [None, "q8_0"])  # None: fp32 tensors, stored as is
def test_params_do_not_keep_the_gguf_mapped(tmp_path, qtype):
    path = _lm.write_gguf(str(tmp_path / "tiny.gguf"), qtype=qtype)
    cfg, tensors, reader = llama.read_gguf(path)
    assert _mapped(path)  # the reader maps the file
    params = llama.params_from_hf(tensors, cfg)
    want = {k: np.array(v) for k, v in tensors.items()}
    del tensors, reader
    gc.collect()
    assert not _mapped(path)
    # the values survive the unmapping: the embedding and the first q kernel (HF (out, in))
    emb = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.asarray(emb), want["model.embed_tokens.weight"])
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(q), want["model.layers.0.self_attn.q_proj.weight"].T)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
