"""Small linen models shared by the tests."""

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    hidden: int = 16
    out: int = 4
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = nn.relu(nn.Dense(self.hidden, name="fc1", **kw)(x))
        x = nn.relu(nn.Dense(self.hidden, name="fc2", **kw)(x))
        return nn.Dense(self.out, name="head", **kw)(x)


class Block(nn.Module):
    """Attention (DenseGeneral q/k/v/out), an Einsum MLP and a LayerNorm."""

    d: int = 16
    heads: int = 2
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=self.heads, dtype=self.dtype, param_dtype=self.param_dtype, name="attn"
        )(h)
        up = nn.Einsum(
            (self.d, 2, self.d),
            "btd,dnf->btnf",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="up",
        )(x)
        down = nn.Einsum(
            (2, self.d, self.d),
            "btnf,nfd->btd",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="down",
        )(nn.gelu(up))
        return x + down


class Encoder(nn.Module):
    layers: int = 2
    d: int = 16
    remat: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        for i in range(self.layers):
            x = block(d=self.d, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer_{i}")(
                x
            )
        return nn.Dense(8, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
