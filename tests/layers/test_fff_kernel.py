"""The compiled CPU kernel for the FFF hard forward: same outputs as the tensor-op paths, fallbacks."""

import pytest
import torch

from topotorch.layers import FFF, _cpu_kernel

needs_kernel = pytest.mark.skipif(
    _cpu_kernel.kernel() is None, reason=f"no FFF CPU kernel here ({_cpu_kernel.kernel_error() or 'disabled'})"
)


def _pair(depth, i, l, o, activation="relu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = FFF(i, l, o, depth, activation=activation, dtype=dtype).eval()
    return layer


@needs_kernel
@pytest.mark.parametrize("leaf_width", [1, 2, 3, 4, 8, 16, 24, 32, 64, 256])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity", "silu", "tanh"])
def test_kernel_equals_soft_forward_with_rounded_decisions(leaf_width, activation):
    layer = _pair(5, 37, leaf_width, 19, activation)  # widths that are not multiples of the vector width
    x = torch.randn(70, 37)
    with torch.no_grad():
        ref = layer.soft_forward(x, hard_decisions=True)
        layer.hard_impl = "kernel"
        assert (layer(x) - ref).abs().max() <= 1e-5
        assert torch.equal(layer.route(x), layer._route(x))
        layer.hard_impl = "gather"
        assert (layer(x) - ref).abs().max() <= 1e-5


@needs_kernel
@pytest.mark.parametrize("depth", [0, 1, 9, 12])
@pytest.mark.parametrize("batch", [1, 5, 64, 1000])
def test_kernel_depths_and_batches_float64(depth, batch):
    layer = _pair(depth, 24, 8, 16, dtype=torch.float64)
    x = torch.randn(batch, 24, dtype=torch.float64)
    with torch.no_grad():
        ref = layer.soft_forward(x, hard_decisions=True)
        layer.hard_impl = "kernel"
        y = layer(x)
    assert y.dtype == torch.float64 and (y - ref).abs().max() <= 1e-12


@needs_kernel
def test_kernel_uses_threads_and_leaf_order_on_large_batches():
    layer = _pair(3, 64, 16, 32)  # 8 leaves, 4000 samples: counting sort by leaf in every thread
    x = torch.randn(4000, 64)
    old = torch.get_num_threads()
    try:
        with torch.no_grad():
            ref = layer.soft_forward(x, hard_decisions=True)
            for threads in (1, 3):
                torch.set_num_threads(threads)
                assert (layer(x) - ref).abs().max() <= 1e-5
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_kernel_relu_skips_zero_rows_exactly():
    layer = _pair(2, 16, 8, 8)
    with torch.no_grad():
        layer.b1s.fill_(-100.0)  # every hidden unit is 0 after ReLU: the output is the leaf bias
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.b2s[layer.route(x)])


def test_auto_falls_back_when_gradients_are_wanted_or_kernel_disabled(monkeypatch):
    layer = _pair(3, 12, 4, 5)
    x = torch.randn(8, 12)
    y = layer(x)  # eval, grad enabled, parameters require grad: tensor ops keep the graph
    assert y.grad_fn is not None
    y.sum().backward()
    assert layer.w1s.grad.abs().sum() > 0
    monkeypatch.setenv("TOPOTORCH_NO_KERNEL", "1")
    assert _cpu_kernel.kernel() is None
    with torch.no_grad():
        assert (layer(x) - layer.soft_forward(x, hard_decisions=True)).abs().max() <= 1e-6
        layer.hard_impl = "kernel"
        with pytest.raises(RuntimeError, match="unavailable"):
            layer(x)


def test_kernel_refuses_bfloat16_when_asked_for_explicitly():
    layer = FFF(8, 2, 3, 2, dtype=torch.bfloat16, hard_impl="kernel").eval()
    with pytest.raises(ValueError, match="float32/float64"):
        with torch.no_grad():
            layer(torch.randn(4, 8, dtype=torch.bfloat16))
    layer.hard_impl = "auto"
    with torch.no_grad():
        assert layer(torch.randn(4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_kernel_source_compiles_to_a_cached_library(tmp_path, monkeypatch):
    if _cpu_kernel.kernel() is None:
        pytest.skip(f"no C compiler here ({_cpu_kernel.kernel_error()})")
    monkeypatch.setenv("TOPOTORCH_CACHE", str(tmp_path))
    lib = _cpu_kernel._build()
    assert hasattr(lib, "fff_hard_f32") and hasattr(lib, "fff_hard_f64")
    assert len(list((tmp_path / "kernels").glob("fff_cpu_*.so"))) == 1


def test_kernel_build_falls_back_to_portable_flags(tmp_path, monkeypatch):
    if _cpu_kernel.kernel() is None:
        pytest.skip(f"no C compiler here ({_cpu_kernel.kernel_error()})")
    portable = _cpu_kernel._flag_sets()[-1]
    monkeypatch.setattr(_cpu_kernel, "_flag_sets", lambda: [portable + ["-fno-such-flag-here"], portable])
    monkeypatch.setenv("TOPOTORCH_CACHE", str(tmp_path))
    assert hasattr(_cpu_kernel._build(), "fff_hard_f32")
    monkeypatch.setattr(_cpu_kernel, "_flag_sets", lambda: [portable + ["-fno-such-flag-here"]])
    monkeypatch.setenv("TOPOTORCH_CACHE", str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match="no-such-flag"):
        _cpu_kernel._build()


@needs_kernel
def test_kernel_vector_width_fits_the_register_file():
    """A 64-byte vector on an AVX2 machine (16 registers of 32 bytes) spilled the routing
    accumulators to memory: routing at batch 256 ran ~8x slower. The width follows the ISA."""
    flags = _cpu_kernel._cpu_signature().split()
    width = _cpu_kernel.kernel().fff_vector_width_f32()
    if "avx512f" in flags and any(f.startswith("-march=native") for f in _cpu_kernel._flag_sets()[0]):
        assert width in (8, 16)  # 16 unless the compiler fell back to the portable flags
    elif "avx" in flags or "avx2" in flags:
        assert width in (4, 8)
    else:
        assert width == 4


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_sample_gets_the_same_output_alone_or_in_a_batch(dtype):
    """Every routing dot product sums in one order (alone, four samples interleaved, batch
    chunks), so a sample's path and output do not depend on the batch around it: bit-equal."""
    layer = _pair(9, 100, 8, 30, dtype=dtype, seed=1)  # 100: not a multiple of the vector width
    x = torch.randn(203, 100, dtype=dtype)
    with torch.no_grad():
        layer.hard_impl = "kernel"
        yb, lb = layer(x), layer.route(x)
        for i in range(x.shape[0]):
            assert torch.equal(layer.route(x[i : i + 1]), lb[i : i + 1])
            assert torch.equal(layer(x[i : i + 1]), yb[i : i + 1])
