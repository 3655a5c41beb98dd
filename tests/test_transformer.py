"""The attention cores: dense, and blocked (blocks of queries, key masks and the unpadded shortcut)
compute softmax(q k^T) v with the same values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.models.transformer import blocked_attention, dense_attention


def reference_attention(q, k, v, key_valid, attention_mask=None):
    """float64 softmax(q k^T) v per head, invalid keys (and keys outside `attention_mask` [Nq, Nk]
    or [B, Nq, Nk]) left out.  q [B, Nq, H, D], k/v [B, Nk, H, D]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    logits = np.where(key_valid[:, None, None, :], logits, -np.inf)
    if attention_mask is not None:
        mask = np.asarray(attention_mask).reshape((-1, 1) + np.shape(attention_mask)[-2:])  # [1 or B, 1, Nq, Nk]
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def random_qkv(n=600, heads=2, d=8, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, n, heads, d)).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("padded", [False, True])
def test_blocked_attention_is_softmax_attention(padded):
    q, k, v = random_qkv()                         # 600 queries: 5 blocks of 120
    key_valid = np.ones((2, 600), bool)
    if padded:
        key_valid[1, 450:] = False                 # the second image's last keys are padding
        k[1, 450:] += 50.0                         # large logits there must not matter
    out = jax.jit(lambda *a: blocked_attention(*a, query_chunk=128))(q, k, v, key_valid)
    np.testing.assert_allclose(out, reference_attention(q, k, v, key_valid), atol=2e-6)


def test_an_unpadded_batch_skips_the_key_mask_with_the_same_values():
    q, k, v = random_qkv()
    every = np.ones((2, 600), bool)
    core = jax.jit(lambda *a: blocked_attention(*a, query_chunk=128))
    np.testing.assert_array_equal(core(q, k, v, every), core(q, k, v, None))
    assert "cond" in str(jax.make_jaxpr(lambda *a: blocked_attention(*a, query_chunk=128))(q, k, v, every))
    one_padded = every.copy()
    one_padded[0, -1] = False
    assert not np.array_equal(core(q, k, v, one_padded), core(q, k, v, None))


def test_blocked_attention_gradients_equal_dense_attention():
    q, k, v = random_qkv(n=300, batch=1)
    key_valid = np.ones((1, 300), bool)
    key_valid[0, 280:] = False

    def loss(core):
        return lambda q, k, v: jnp.sum(jnp.sin(core(q, k, v, key_valid)))

    blocked = jax.grad(loss(lambda *a: blocked_attention(*a, query_chunk=64)), argnums=(0, 1, 2))(q, k, v)
    whole = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
    for b, w in zip(blocked, whole):
        np.testing.assert_allclose(b, w, rtol=1e-5, atol=1e-5)   # float32 sums over 300 keys in another order
    assert np.abs(np.asarray(whole[1])[0, 280:]).max() == 0     # padded keys get no gradient


def block_diagonal_mask(n, groups):
    """bool [n, n]: query i sees key j only within its own group of n // groups."""
    group = np.arange(n) // (n // groups)
    return group[:, None] == group[None, :]


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("n", [60, 600])       # 600 queries: the blocked core loops over 5 blocks
def test_an_attention_mask_restricts_each_query_to_its_allowed_keys_in_both_cores(n, per_image):
    q, k, v = random_qkv(n=n)
    key_valid = np.ones((2, n), bool)
    key_valid[1, -n // 6:] = False                 # padding combines with the mask
    mask = block_diagonal_mask(n, 3)
    if per_image:                                  # image 1 also hides its first key from everyone but itself
        mask = np.stack([mask, mask])
        mask[1, :, 0] = False
        mask[1, 0, 0] = True
    expected = reference_attention(q, k, v, key_valid, mask)
    for core in (dense_attention, lambda *a, **kw: blocked_attention(*a, query_chunk=128, **kw)):
        out = jax.jit(lambda q, k, v, valid, m: core(q, k, v, valid, attention_mask=m))(q, k, v, key_valid, mask)
        np.testing.assert_allclose(out, expected, atol=2e-6)


def test_masked_keys_get_no_gradient_in_the_blocked_core():
    q, k, v = random_qkv(n=300, batch=1)
    mask = block_diagonal_mask(300, 2)
    first_half = lambda k: jnp.sum(jnp.sin(blocked_attention(q, k, v, attention_mask=mask, query_chunk=64)[:, :150]))  # noqa: E731
    grad = np.asarray(jax.grad(first_half)(k))
    assert np.abs(grad[0, 150:]).max() == 0 and np.abs(grad[0, :150]).max() > 0
