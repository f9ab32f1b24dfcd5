"""FFF hard inference on GPU: the Triton kernels against a cuBLAS dense FF of the same training width.

in = out = 768, depth 9, leaf width 8 (training width 4096), float32 (``--dtype`` for
bfloat16/float16). For each batch size, the median of CUDA-event-timed calls of:
dense (``addmm -> ReLU -> addmm``, i.e. cuBLAS), FFF hard with the Triton kernels, and FFF hard
with the tensor-op path (gather / grouped ``bmm``). Outputs are checked equal (Triton vs tensor
ops) before timing. Prints the ratios and the theoretical limit (dense FLOPs / FFF FLOPs).

    python benchmarks/bench_fff_gpu.py [--batches 1,256,4096,65536] [--json out.json]

Without CUDA it exits with a message. ``TRITON_INTERPRET=1 python benchmarks/bench_fff_gpu.py
--smoke`` runs the script end to end on CPU through Triton's interpreter (tiny sizes; the
times are meaningless there) so the script itself can be checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from topotorch.layers import FFF


def time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (CUDA events; wall clock on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=768, help="input = output width")
    ap.add_argument("--depth", type=int, default=9)
    ap.add_argument("--leaf", type=int, default=8)
    ap.add_argument("--batches", default="1,256,4096,65536")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run through TRITON_INTERPRET=1 (no timing claims)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from topotorch.layers import _triton_kernel

    if args.smoke:
        if not _triton_kernel.interpreting():
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment")
        device, args.width, args.depth, args.batches, args.repeats = torch.device("cpu"), 32, 3, "1,40", 2
    elif not torch.cuda.is_available():
        sys.exit("bench_fff_gpu.py needs a CUDA GPU (the CPU figures are in benchmarks/bench_fff.py)")
    else:
        device = torch.device("cuda")
    if _triton_kernel.triton is None:
        sys.exit("bench_fff_gpu.py needs triton (pip install triton)")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    width, hidden = args.width, (2**args.depth) * args.leaf
    fff = FFF(width, args.leaf, width, args.depth, device=device, dtype=dtype).eval()
    dense_w1 = torch.randn(width, hidden, device=device, dtype=dtype) / width**0.5
    dense_b1 = torch.zeros(hidden, device=device, dtype=dtype)
    dense_w2 = torch.randn(hidden, width, device=device, dtype=dtype) / hidden**0.5
    dense_b2 = torch.zeros(width, device=device, dtype=dtype)
    limit = (2 * width * hidden) / fff.flops_per_sample(hard=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(
        f"{name}; in = out = {width}, depth {args.depth}, leaf {args.leaf} (training width {hidden}), "
        f"{args.dtype}; theoretical limit {limit:.0f}x"
    )
    print(
        f"{'batch':>7} {'dense ms':>9} {'triton ms':>10} {'tensor ms':>10} {'dense/triton':>13} {'tensor/triton':>14}"
    )
    rows = []
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, width, device=device, dtype=dtype)
            fff.hard_impl = "triton"
            y_triton = fff(x)
            fff.hard_impl = "gather" if batch < 16 * fff.n_leaves else "grouped"
            y_tensor = fff(x)
            err = (y_triton.float() - y_tensor.float()).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            if err > tol * max(1.0, y_tensor.float().abs().max().item()):
                sys.exit(f"batch {batch}: Triton and tensor-op outputs differ by {err:.3g}")
            t_dense = time_ms(
                lambda x=x: torch.addmm(dense_b2, torch.relu(torch.addmm(dense_b1, x, dense_w1)), dense_w2),
                args.repeats,
                device,
            )
            t_tensor = time_ms(lambda x=x: fff(x), args.repeats, device)
            fff.hard_impl = "triton"
            t_triton = time_ms(lambda x=x: fff(x), args.repeats, device)
            row = {
                "batch": batch,
                "dense_ms": t_dense,
                "triton_ms": t_triton,
                "tensor_ms": t_tensor,
                "speedup_vs_dense": t_dense / t_triton,
                "speedup_vs_tensor_ops": t_tensor / t_triton,
                "max_abs_diff_vs_tensor_ops": err,
            }
            rows.append(row)
            print(
                f"{batch:7d} {t_dense:9.3f} {t_triton:10.3f} {t_tensor:10.3f} {t_dense / t_triton:12.1f}x "
                f"{t_tensor / t_triton:13.1f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "width": width,
                    "depth": args.depth,
                    "leaf": args.leaf,
                    "dtype": args.dtype,
                    "theoretical_limit": limit,
                    "smoke": args.smoke,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
