"""The FFF Triton kernels: checked on CPU through Triton's interpreter, and on CUDA when present.

The interpreter (``TRITON_INTERPRET=1``) must be on before triton's decorators run, so the CPU
checks run in a fresh interpreter process. Both skip with a reason when ``triton`` is missing
(CI's CPU install does not have it; ``pip install triton`` or CUDA builds of torch do).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from topotorch.layers import FFF, _triton_kernel

CHECK = textwrap.dedent("""
    import torch
    from topotorch.layers import FFF
    torch.manual_seed(0)
    cases = [  # depth, leaf width, activation, dtype, batch, tolerance
        (0, 3, "relu", torch.float32, 5, 1e-5), (1, 1, "relu", torch.float32, 1, 1e-5),
        (3, 8, "relu", torch.float32, 41, 1e-5), (5, 5, "gelu", torch.float64, 33, 1e-12),
        (4, 1, "tanh", torch.float32, 17, 1e-5), (2, 16, "identity", torch.float64, 20, 1e-12),
        (6, 8, "gelu", torch.float32, 70, 1e-5), (3, 4, "relu", torch.bfloat16, 9, 3e-2),
        (2, 100, "relu", torch.float32, 19, 1e-5),
        (2, 5, torch.nn.PReLU(dtype=torch.bfloat16), torch.bfloat16, 9, 3e-2),
    ]
    for depth, lw, act, dtype, batch, tol in cases:
        layer = FFF(37, lw, 70, depth, activation=act, dtype=dtype).eval()
        x = torch.randn(batch, 37, dtype=dtype)
        with torch.no_grad():
            ref = layer.hard_forward(x)  # tensor ops / C kernel
            layer.hard_impl = "triton"
            assert layer.hard_impl_used(x) == "triton"
            got = layer(x.view(batch, 1, 37)).view(batch, 70)
        err = (got.double() - ref.double()).abs().max().item()
        assert err <= tol * max(1.0, ref.double().abs().max().item()), (depth, lw, act, dtype, err)
        print("ok", depth, lw, dtype, err)
    with torch.no_grad():
        assert layer(torch.zeros(0, 37, dtype=torch.bfloat16)).shape == (0, 70)
""")


def test_triton_kernels_match_the_tensor_path_in_the_interpreter():
    pytest.importorskip("triton", reason="the Triton kernels need `pip install triton` (in the test extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 10


def test_forcing_triton_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("a GPU (or the interpreter) is present: forcing triton is legal here")
    layer = FFF(4, 2, 3, 2, hard_impl="triton").eval()
    with pytest.raises(RuntimeError, match="needs the triton package and a CUDA input"):
        layer(torch.randn(3, 4))
    assert FFF(4, 2, 3, 2).eval().hard_impl_used(torch.randn(3, 4)) != "triton"  # auto never picks it on CPU
    assert not _triton_kernel.available(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("depth", [0, 1, 4, 9, 12])
def test_cuda_auto_path_is_triton_and_matches_rounded_soft_forward(depth):
    torch.manual_seed(depth)
    layer = FFF(96, 8, 80, depth).cuda().eval()
    x = torch.randn(300, 96, device="cuda")
    with torch.no_grad():
        assert layer.hard_impl_used(x) == "triton"
        got = layer(x)
        ref = layer.soft_forward(x, hard_decisions=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
