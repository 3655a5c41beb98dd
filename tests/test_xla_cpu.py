"""XLA:CPU compiler options: which YNNPACK library fusions DETR's programs get, and when none."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax import xla_cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _small_conv_with_group_norm(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y - y.mean(axis=(1, 2, 3), keepdims=True)


def _library_fusions(fn, *args):
    """The ops inside the compiled program's YNNPACK fusions (set of HLO opcodes)."""
    text = fn.lower(*args).compile().as_text()
    computations = {}
    for block in text.split("\n\n"):
        header = block.strip().splitlines()[0] if block.strip() else ""
        if header.startswith("%"):
            computations[header.split()[0][1:]] = block
    ops = set()
    for line in text.splitlines():
        if '"__ynn_fusion"' in line:
            body = computations[line.split("calls=%")[1].split(",")[0]]
            ops |= {op for op in ("convolution", "dot", "reduce") if f" {op}(" in body}
    return ops


@pytest.fixture
def conv_inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 50, 67, 64), np.float32)),
            jnp.asarray(rng.standard_normal((3, 3, 64, 32), np.float32)))


def test_model_programs_keep_library_dots_and_reductions_but_not_convolutions(conv_inputs):
    assert xla_cpu.compiler_options(xla_cpu.MODEL) == {
        xla_cpu.LIBRARY_FUSIONS_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    ops = _library_fusions(xla_cpu.jit(_small_conv_with_group_norm, xla_cpu.MODEL), *conv_inputs)
    assert "convolution" not in ops


def test_the_mask_head_program_keeps_library_dots_only(conv_inputs):
    assert xla_cpu.compiler_options(xla_cpu.MASK_HEAD) == {
        xla_cpu.LIBRARY_FUSIONS_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert _library_fusions(xla_cpu.jit(_small_conv_with_group_norm, xla_cpu.MASK_HEAD), *conv_inputs) == set()
    # the same program with every library fusion allowed does hand its ops to YNNPACK: the check can fail
    everything = xla_cpu.MODEL + (xla_cpu.CONVOLUTION,)
    assert "convolution" in _library_fusions(xla_cpu.jit(_small_conv_with_group_norm, everything), *conv_inputs)


def test_the_results_are_the_same_float32_arithmetic(conv_inputs):
    """Another summation order only: float32 rounding of sums of 576 products, relative to the scale."""
    default = np.asarray(jax.jit(_small_conv_with_group_norm)(*conv_inputs))
    for fusions in (xla_cpu.MODEL, xla_cpu.MASK_HEAD):
        np.testing.assert_allclose(xla_cpu.jit(_small_conv_with_group_norm, fusions)(*conv_inputs), default,
                                   rtol=0, atol=2e-6 * np.abs(default).max())


def test_xla_flags_of_the_user_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.LIBRARY_FUSIONS_OPTION}=")
    assert xla_cpu.compiler_options(xla_cpu.MODEL) is None


def test_options_this_xla_rejects_are_left_out():
    assert not xla_cpu._accepted(((xla_cpu.LIBRARY_FUSIONS_OPTION, "LIBRARY_FUSION_TYPE_NO_SUCH_THING"),))
    assert not xla_cpu._accepted((("xla_cpu_no_such_option", "true"),))
    assert xla_cpu.compiler_options(("LIBRARY_FUSION_TYPE_NO_SUCH_THING",)) is None


def test_a_pmap_is_compiled_with_the_options_once_per_signature(conv_inputs):
    """`jax.pmap` takes no compiler options: the train step is compiled through lower/compile."""
    x, k = (t[None] for t in conv_inputs)
    plain = jax.pmap(_small_conv_with_group_norm)
    step = xla_cpu.compiled_per_signature(jax.pmap(_small_conv_with_group_norm), xla_cpu.TRAIN_STEP)
    np.testing.assert_allclose(step(x, k), plain(x, k), rtol=0, atol=2e-6 * float(np.abs(plain(x, k)).max()))
    step(x + 1, k)
    assert len(step.programs) == 1
    step(x[:, :1], k)
    assert len(step.programs) == 2
    for program in step.programs.values():
        assert '"__ynn_fusion"' not in program.as_text()          # TRAIN_STEP: dots only, and there are none


def test_without_options_the_transformed_function_is_returned_as_is(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.LIBRARY_FUSIONS_OPTION}=")
    step = jax.pmap(lambda a: a + 1)
    assert xla_cpu.compiled_per_signature(step, xla_cpu.TRAIN_STEP) is step
