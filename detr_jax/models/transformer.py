"""The DETR encoder-decoder transformer (post-norm by default, pre-norm optional).

Tokens are [B, N, C].  Position embeddings are added to queries and keys, never to values;
the decoder's learned `query_pos` is added to the queries and keys of self-attention and to the
queries of cross-attention, and its input starts at zeros.  Masks are True on valid tokens.
Names mirror PyTorch (`encoder/layers_0/self_attn/q_proj`, `linear1`, `norm1`, `decoder/norm`).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


ATTENTION_QUERY_CHUNK = 512   # queries of one head per block (blocked attention)
BLOCKED_ABOVE = 256           # blocked attention: query sequences longer than this run in blocks


def query_blocks(num_queries: int, limit: int) -> Tuple[int, int]:
    """(blocks, block size) covering `num_queries` with blocks of at most `limit`, padding least."""
    blocks = -(-num_queries // limit)
    return blocks, -(-num_queries // blocks)


def map_blocks(fn, xs):
    """`lax.map(fn, xs)`: the blocked attention's loop (bench/common.py counts its FLOPs by
    swapping it for a vmap: XLA's cost analysis counts a loop's body once)."""
    return jax.lax.map(fn, xs)


def dense_attention(q, k, v, key_valid=None, *, attention_mask=None, dropout: float = 0.0, rng=None,
                    dtype: Any = jnp.float32):
    """softmax(q k^T) v with dropout on the weights, over the whole batch and all heads at once.

    q [B, Nq, H, D] (already scaled), k and v [B, Nk, H, D], key_valid bool [B, Nk] (False =
    padding, weight 0) -> [B, Nq, H, D].  `attention_mask` bool [Nq, Nk] or [B, Nq, Nk] (optional):
    query i attends to key j only where True (every query must keep at least one key); it combines
    with `key_valid`.  `rng`: dropout key (None: no dropout).  Logits and the softmax in float32
    whatever `dtype`.  One expression of einsums that XLA fuses on every backend: the default
    implementation (`ModelConfig.attention="dense"`).
    """
    return _attention_core(q, k, v, key_valid, attention_mask, dropout=dropout, rng=rng, query_chunk=None,
                           dtype=dtype)


def blocked_attention(q, k, v, key_valid=None, *, attention_mask=None, dropout: float = 0.0, rng=None,
                      query_chunk: int = ATTENTION_QUERY_CHUNK, dtype: Any = jnp.float32):
    """`dense_attention`'s values, computed to keep memory low on a CPU (`attention="blocked"`).

    Long query sequences (more than `BLOCKED_ABOVE`: the encoder's thousands of tokens) run as a
    sequential loop over blocks of at most `query_chunk` queries of ONE head, each block under
    `jax.checkpoint`: only one block's [block, Nk] weights are ever live, at inference and in
    training (the backward pass recomputes a block's weights instead of storing [B, H, Nq, Nk]
    weights and dropout masks per layer).  Dropout then draws per block (a key of its own per
    block).  When every key is valid (an unpadded image) and there is no `attention_mask`, the loop
    skips the masking select (`lax.cond`), with the same values.  An `attention_mask` is cut into
    the same query blocks.  Shorter sequences (the decoder's) run as `dense_attention`.
    BENCHMARKS.md has the block sizes measured on the CPU.
    """
    blocked = q.shape[1] > BLOCKED_ABOVE
    core = functools.partial(_attention_core, dropout=dropout, rng=rng, query_chunk=query_chunk if blocked else None,
                             dtype=dtype)
    if blocked and key_valid is not None and attention_mask is None:     # an unpadded image: no masking pass
        return jax.lax.cond(jnp.all(key_valid), lambda q, k, v, _: core(q, k, v), core, q, k, v, key_valid)
    return core(q, k, v, key_valid, attention_mask)


ATTENTION_IMPLEMENTATIONS = {"dense": dense_attention, "blocked": blocked_attention}


def attention_implementation(name: str):
    """The attention core named `name` (a key of `ATTENTION_IMPLEMENTATIONS`)."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; known: {sorted(ATTENTION_IMPLEMENTATIONS)}")
    return ATTENTION_IMPLEMENTATIONS[name]


def _attention_core(q, k, v, key_valid=None, attention_mask=None, *, dropout: float, rng,
                    query_chunk: Optional[int], dtype: Any):
    """softmax(q k^T) v per (image, head) row ([B * H, N, D]), in blocks of `query_chunk` queries
    of one head (None: all at once), always masked by `key_valid` and `attention_mask` when given.

    The softmax is normalized after the product with v: exp(l - max) v / sum(exp(l - max))
    divides [Nq, D] values instead of [Nq, Nk] weights, one pass less over the largest tensor
    (the same values up to float rounding; dropout commutes with the division).
    """
    b, nq, heads, d = q.shape
    rows = lambda t: jnp.swapaxes(t, 1, 2).reshape(b * heads, t.shape[1], d)  # noqa: E731  [B*H, N, D]
    q, k, v = rows(q), rows(k), rows(v)
    valid = None if key_valid is None else jnp.repeat(key_valid, heads, axis=0)   # [B*H, Nk]
    # [1 or B, Nq, Nk]: the mask of row r is mask[r // heads] (or mask[0], shared by the batch)
    mask = None if attention_mask is None else attention_mask.reshape((-1,) + attention_mask.shape[-2:]).astype(bool)

    # qb [..., n, D], kb and vb [..., Nk, D], valid [..., Nk], allowed [..., n, Nk] (or None each)
    def block(qb, kb, vb, valid, allowed, rng):
        logits = jnp.einsum("...qd,...kd->...qk", qb, kb).astype(jnp.float32)
        if valid is not None:
            logits = jnp.where(valid[..., None, :], logits, -jnp.inf)
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
        total = unnormalized.sum(axis=-1, keepdims=True)
        weights = unnormalized.astype(dtype)
        if rng is not None and dropout > 0.0:
            keep = jax.random.bernoulli(rng, 1.0 - dropout, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - dropout), jnp.zeros((), dtype))
        out = jnp.einsum("...qk,...kd->...qd", weights, vb)
        return (out.astype(jnp.float32) / total).astype(dtype)

    if query_chunk is None:
        allowed = mask if mask is None or mask.shape[0] == 1 else jnp.repeat(mask, heads, axis=0)  # [B*H or 1, Nq, Nk]
        out = block(q, k, v, valid, allowed, rng)
    else:
        blocks, size = query_blocks(nq, query_chunk)
        stacked = jnp.pad(q, ((0, 0), (0, blocks * size - nq), (0, 0))).reshape(b * heads * blocks, size, d)
        keys = None if rng is None else jax.random.split(rng, b * heads * blocks)
        if mask is not None:   # [1 or B, blocks, size, Nk]; padded queries may see every key
            mask = jnp.pad(mask, ((0, 0), (0, blocks * size - nq), (0, 0)), constant_values=True)
            mask = mask.reshape(mask.shape[0], blocks, size, mask.shape[-1])

        def one_block(args):
            qb, index, rng = args
            row = index // blocks
            allowed = None if mask is None else mask[row // heads if mask.shape[0] > 1 else 0, index % blocks]
            return jax.checkpoint(block)(qb, k[row], v[row], None if valid is None else valid[row], allowed, rng)
        out = map_blocks(one_block, (stacked, jnp.arange(b * heads * blocks), keys))
        out = out.reshape(b * heads, blocks * size, d)[:, :nq]
    return jnp.swapaxes(out.reshape(b, heads, nq, d), 1, 2)


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention` (batch first): separate q/k/v projections and `out_proj`.

    `key_valid` bool [B, Nk] marks keys that may be attended to (False = padding);
    `attention_mask` bool [Nq, Nk] or [B, Nq, Nk] (optional) restricts which keys each query
    attends to (True = allowed; None: all, the same arithmetic as before).  The core is
    the implementation named by `attention` ("dense" or "blocked", `ATTENTION_IMPLEMENTATIONS`):
    the same values and gradients, computed differently.
    """

    dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention: str = "dense"

    @nn.compact
    def __call__(self, query, key, value, key_valid: Optional[jnp.ndarray] = None, deterministic: bool = True,
                 attention_mask: Optional[jnp.ndarray] = None):
        head_dim = self.dim // self.num_heads
        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, head_dim)  # noqa: E731
        q = split(dense("q_proj")(query)) * jnp.asarray(head_dim ** -0.5, self.dtype)
        k = split(dense("k_proj")(key))
        v = split(dense("v_proj")(value))
        rng = None if deterministic or self.dropout == 0.0 else self.make_rng("dropout")
        core = attention_implementation(self.attention)
        out = core(q, k, v, key_valid, attention_mask=attention_mask, dropout=self.dropout, rng=rng, dtype=self.dtype)
        return dense("out_proj")(out.reshape(*query.shape[:2], self.dim))


def feed_forward(layer: nn.Module, x, deterministic: bool):
    """`linear2(dropout(relu(linear1(x))))`, its Dense layers owned by `layer` (called in its compact)."""
    x = nn.relu(nn.Dense(layer.dim_feedforward, dtype=layer.dtype, name="linear1")(x))
    x = nn.Dropout(layer.dropout)(x, deterministic=deterministic)
    return nn.Dense(layer.dim, dtype=layer.dtype, name="linear2")(x)


def with_pos(x, pos):
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    dim: int
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: Any = jnp.float32
    attention: str = "dense"

    @nn.compact
    def __call__(self, src, valid, pos, deterministic: bool = True):
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=deterministic)  # noqa: E731
        attn = MultiheadAttention(self.dim, self.num_heads, self.dropout, self.dtype, self.attention,
                                  name="self_attn")
        ffn = lambda t, det: feed_forward(self, t, det)  # noqa: E731
        norm1, norm2 = layer_norm("norm1", self.dtype), layer_norm("norm2", self.dtype)
        if self.pre_norm:
            y = norm1(src)
            src = src + drop(attn(with_pos(y, pos), with_pos(y, pos), y, valid, deterministic))
            return src + drop(ffn(norm2(src), deterministic))
        src = norm1(src + drop(attn(with_pos(src, pos), with_pos(src, pos), src, valid, deterministic)))
        return norm2(src + drop(ffn(src, deterministic)))


class DecoderLayer(nn.Module):
    """One decoder layer.  `self_attention_mask` bool [Q, Q] or [B, Q, Q] (optional): query i
    attends to query j in self-attention only where True (None: every query sees every query)."""

    dim: int
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: Any = jnp.float32
    attention: str = "dense"

    @nn.compact
    def __call__(self, tgt, memory, memory_valid, pos, query_pos, deterministic: bool = True,
                 self_attention_mask: Optional[jnp.ndarray] = None):
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=deterministic)  # noqa: E731
        self_attn = MultiheadAttention(self.dim, self.num_heads, self.dropout, self.dtype, self.attention,
                                       name="self_attn")
        cross_attn = MultiheadAttention(self.dim, self.num_heads, self.dropout, self.dtype, self.attention,
                                        name="multihead_attn")
        ffn = lambda t, det: feed_forward(self, t, det)  # noqa: E731
        norm1, norm2, norm3 = (layer_norm(f"norm{i}", self.dtype) for i in (1, 2, 3))
        if self.pre_norm:
            y = norm1(tgt)
            tgt = tgt + drop(self_attn(with_pos(y, query_pos), with_pos(y, query_pos), y, None, deterministic,
                                       self_attention_mask))
            y = norm2(tgt)
            tgt = tgt + drop(cross_attn(with_pos(y, query_pos), with_pos(memory, pos), memory, memory_valid,
                                        deterministic))
            return tgt + drop(ffn(norm3(tgt), deterministic))
        q = with_pos(tgt, query_pos)
        tgt = norm1(tgt + drop(self_attn(q, q, tgt, None, deterministic, self_attention_mask)))
        tgt = norm2(tgt + drop(cross_attn(with_pos(tgt, query_pos), with_pos(memory, pos), memory, memory_valid,
                                          deterministic)))
        return norm3(tgt + drop(ffn(tgt, deterministic)))


class Encoder(nn.Module):
    num_layers: int
    dim: int
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: Any = jnp.float32
    attention: str = "dense"

    @nn.compact
    def __call__(self, src, valid, pos, deterministic: bool = True):
        args = (self.dim, self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                self.attention)
        for i in range(self.num_layers):
            src = EncoderLayer(*args, name=f"layers_{i}")(src, valid, pos, deterministic)
        return layer_norm("norm", self.dtype)(src) if self.pre_norm else src


class Decoder(nn.Module):
    """Returns every layer's output after the final LayerNorm `norm`: [L, B, Q, C].
    `self_attention_mask` (optional) as `DecoderLayer`'s, the same in every layer."""

    num_layers: int
    dim: int
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: Any = jnp.float32
    attention: str = "dense"

    @nn.compact
    def __call__(self, tgt, memory, memory_valid, pos, query_pos, deterministic: bool = True,
                 self_attention_mask: Optional[jnp.ndarray] = None):
        args = (self.dim, self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                self.attention)
        norm = layer_norm("norm", self.dtype)
        hs = []
        for i in range(self.num_layers):
            tgt = DecoderLayer(*args, name=f"layers_{i}")(tgt, memory, memory_valid, pos, query_pos, deterministic,
                                                          self_attention_mask)
            hs.append(norm(tgt))
        return jnp.stack(hs)


class Transformer(nn.Module):
    """Encoder over the image tokens, decoder over the object queries.

    Returns `(hs, memory)`: hs [L, B, Q, C], every decoder layer's output after the final
    decoder LayerNorm; memory [B, N, C], the encoder output.
    """

    dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1
    pre_norm: bool = False
    dtype: Any = jnp.float32
    attention: str = "dense"      # "dense" or "blocked" (see ATTENTION_IMPLEMENTATIONS)

    @nn.compact
    def __call__(self, src, valid, pos, query_embed, deterministic: bool = True, *,
                 query_content: Optional[jnp.ndarray] = None, self_attention_mask: Optional[jnp.ndarray] = None
                 ) -> Tuple[jnp.ndarray, jnp.ndarray]:
        """src, pos: [B, N, C]; valid: bool [B, N]; query_embed: the queries' positions (`query_pos`)
        [Q, C], or [B, Q, C] per image.  query_content [B, Q, C] (optional): the decoder's input,
        zeros when None (DETR's object queries).  self_attention_mask: `DecoderLayer`'s."""
        args = (self.dim, self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                self.attention)
        memory = Encoder(self.enc_layers, *args, name="encoder")(src, valid, pos, deterministic)
        query_pos = jnp.broadcast_to(query_embed.astype(self.dtype), (src.shape[0], *query_embed.shape[-2:]))
        tgt = jnp.zeros_like(query_pos) if query_content is None else query_content.astype(self.dtype)
        hs = Decoder(self.dec_layers, *args, name="decoder")(tgt, memory, valid, pos, query_pos, deterministic,
                                                              self_attention_mask)
        return hs, memory
