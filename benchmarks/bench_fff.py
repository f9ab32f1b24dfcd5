"""FFF speed on CPU (in = out = 768): hard inference vs dense FF and vs the peer package.

Rows (each a ratio measured in this one run, medians of interleaved repeats under
torch.inference_mode after warm-up; each repeat times a ~5 ms block of back-to-back calls after
one untimed call, so caches are warm (steady-state repeated inference), except the "cold
caches" row, which times single calls each right after the other candidates' calls):
  * hard inference vs a dense FF of the same training width (2^d·ℓ, default d=9, ℓ=8 -> 4096),
    at batch 256 and batch 1;
  * hard inference vs ``fastfeedforward`` 0.2.1's eval forward at batch 256 (same weights, depth,
    leaf width and input; the outputs are checked equal, up to the leaf output bias the peer
    forgets, before timing), and the same for our tensor-op path without the compiled kernel;
  * soft training forward+backward vs the peer's training forward+backward at d=8, ℓ=8,
    batch 256 (the peer takes tens of seconds per step: it is timed --peer-train-repeats times);
  * UltraFFF (UltraFastBERT's tree, depth 11: 12 of 4095 neurons per sample) vs a dense
    FF of 4095 GELU neurons, at batch 256 and 1 (no goal: UltraFastBERT claims 78x on CPU);
  * the theoretical limit, dense multiply-adds / FFF multiply-adds per sample.
Peer rows are skipped with a message when the peer is not installed
(``pip install fastfeedforward==0.2.1 --no-deps``).

    python benchmarks/bench_fff.py [--repeats 30] [--threads N] [--no-train] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from topotorch.layers import FFF, UltraFFF
from topotorch.layers._cpu_kernel import kernel, kernel_error

WIDTH = 768


def _median_times(fns: dict[str, Callable[[], object]], repeats: int, inner: int | None = None,
                  block_s: float = 0.005) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved in rounds so machine noise hits all alike.

    Each round times a block of ``inner`` back-to-back calls per candidate after one untimed
    call (warm caches: the steady state of repeated inference). ``inner=None`` sizes each
    candidate's block to about ``block_s`` seconds; ``inner=1`` times single calls with no
    untimed call, each right after the other candidates ran (caches cold for the weights the
    others evicted)."""
    sizes = {}
    for k, f in fns.items():  # warm-up, and block sizes
        f()
        t = time.perf_counter()
        f()
        sizes[k] = inner or max(1, min(200, round(block_s / max(time.perf_counter() - t, 1e-7))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            if inner != 1:
                f()  # the block's untimed first call: it refills the caches the other candidates evicted
            t = time.perf_counter()
            for _ in range(sizes[k]):
                f()
            times[k].append((time.perf_counter() - t) / sizes[k])
    return {k: statistics.median(v) for k, v in times.items()}


def dense_ff(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))


def dense_flops(width: int, hidden: int) -> int:
    return 2 * width * hidden


def peer_cls():
    try:
        from fastfeedforward import FFF as PeerFFF
    except ImportError:
        return None
    return PeerFFF


def inference_rows(depth: int, leaf: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    hidden = 2**depth * leaf
    dense = dense_ff(WIDTH, hidden).eval()
    fff = FFF(WIDTH, leaf, WIDTH, depth).eval()
    theory = dense_flops(WIDTH, hidden) / fff.flops_per_sample(hard=True)
    Peer = peer_cls()
    rows = []
    with torch.inference_mode():
        for batch in (256, 1):
            x = torch.randn(batch, WIDTH)
            fns = {"fff": lambda: fff(x), "dense": lambda: dense(x)}
            t = _median_times(fns, repeats)
            rows.append({"row": f"hard vs dense FF (width {hidden})", "batch": batch, "depth": depth, "leaf": leaf,
                         "fff_ms": t["fff"] * 1e3, "other_ms": t["dense"] * 1e3, "speedup": t["dense"] / t["fff"],
                         "theory": theory, "goal": 5.0 if batch == 256 else 10.0})
        x = torch.randn(256, WIDTH)
        if Peer is None:
            print("peer rows skipped: fastfeedforward is not installed (pip install fastfeedforward==0.2.1 --no-deps)")
        else:
            peer = Peer(WIDTH, leaf, WIDTH, depth).eval()
            fff_p = FFF.from_peer(peer).eval()  # same weights, same depth / leaf width / input
            ops = FFF.from_peer(peer, hard_impl="gather").eval()  # our tensor-op path, no compiled kernel
            # Same function first: the peer's eval output plus the leaf output bias it forgets.
            leaves = fff_p.route(x)
            ref = peer(x) + peer.b2s[leaves]
            diff = max((fff_p(x) - ref).abs().max().item(), (ops(x) - ref).abs().max().item())
            same_leaves = bool(torch.equal(leaves, ops._route(x)))
            print(f"peer check, batch 256: same leaves {same_leaves}, max |ours - (peer + b2s)| = {diff:.1e} "
                  f"(max |y| = {ref.abs().max().item():.2f})")
            if not same_leaves or diff > 1e-5:
                raise SystemExit("our hard output differs from the peer's eval output")
            fns = {"fff": lambda: fff_p(x), "ops": lambda: ops(x), "peer": lambda: peer(x)}
            t = _median_times(fns, max(5, repeats // 2))
            cold = _median_times(fns, max(5, repeats // 2), inner=1)
            rows.append({"row": "hard vs peer eval", "batch": 256, "depth": depth, "leaf": leaf,
                         "fff_ms": t["fff"] * 1e3, "other_ms": t["peer"] * 1e3, "speedup": t["peer"] / t["fff"],
                         "theory": None, "goal": 20.0, "impl": fff_p.hard_impl_used(x)})
            rows.append({"row": "  same, tensor-op path (no kernel)", "batch": 256, "depth": depth, "leaf": leaf,
                         "fff_ms": t["ops"] * 1e3, "other_ms": t["peer"] * 1e3, "speedup": t["peer"] / t["ops"],
                         "theory": None, "goal": 1.0, "impl": "gather"})
            rows.append({"row": "  same, cold caches (single calls)", "batch": 256, "depth": depth, "leaf": leaf,
                         "fff_ms": cold["fff"] * 1e3, "other_ms": cold["peer"] * 1e3,
                         "speedup": cold["peer"] / cold["fff"], "theory": None, "goal": 1.0,
                         "impl": fff_p.hard_impl_used(x)})
    return rows


def ultra_rows(depth: int, repeats: int) -> list[dict]:
    """UltraFastBERT's tree (one GELU neuron per node, depth 11 -> 4095 neurons, 12 per token) vs dense FF."""
    torch.manual_seed(0)
    ultra = UltraFFF(WIDTH, WIDTH, depth).eval()
    hidden = ultra.training_width
    dense = nn.Sequential(nn.Linear(WIDTH, hidden), nn.GELU(), nn.Linear(hidden, WIDTH)).eval()
    theory = dense_flops(WIDTH, hidden) / ultra.flops_per_sample(hard=True)
    rows = []
    with torch.inference_mode():
        for batch in (256, 1):
            x = torch.randn(batch, WIDTH)
            t = _median_times({"fff": lambda: ultra(x), "dense": lambda: dense(x)}, repeats)
            rows.append({"row": f"UltraFFF hard vs dense ({hidden})", "batch": batch, "depth": depth, "leaf": 1,
                         "fff_ms": t["fff"] * 1e3, "other_ms": t["dense"] * 1e3, "speedup": t["dense"] / t["fff"],
                         "theory": theory, "goal": 1.0})
    return rows


def training_row(depth: int, leaf: int, repeats: int, peer_repeats: int) -> dict | None:
    Peer = peer_cls()
    if Peer is None:
        return None
    torch.manual_seed(0)
    x = torch.randn(256, WIDTH)
    peer = Peer(WIDTH, leaf, WIDTH, depth).train()
    fff = FFF.from_peer(peer).train()

    def step(m):
        def f():
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        return f

    t_fff = _median_times({"fff": step(fff)}, repeats, 1)["fff"]
    t_peer = _median_times({"peer": step(peer)}, peer_repeats, 1)["peer"] if peer_repeats > 1 else None
    if t_peer is None:  # a single timed step (its warm-up would double a ~minute of work)
        t0 = time.perf_counter()
        step(peer)()
        t_peer = time.perf_counter() - t0
    return {"row": "soft train fwd+bwd vs peer train", "batch": 256, "depth": depth, "leaf": leaf,
            "fff_ms": t_fff * 1e3, "other_ms": t_peer * 1e3, "speedup": t_peer / t_fff, "theory": None, "goal": 5.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=9)
    ap.add_argument("--leaf", type=int, default=8)
    ap.add_argument("--train-depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--peer-train-repeats", type=int, default=1)
    ap.add_argument("--ultra-depth", type=int, default=11)
    ap.add_argument("--no-ultra", action="store_true", help="skip the UltraFFF rows")
    ap.add_argument("--no-train", action="store_true", help="skip the (slow) training comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = inference_rows(args.depth, args.leaf, args.repeats)
    if not args.no_ultra:
        rows += ultra_rows(args.ultra_depth, args.repeats)
    if not args.no_train:
        r = training_row(args.train_depth, args.leaf, max(3, args.repeats // 5), args.peer_train_repeats)
        if r is None:
            print("training row skipped: fastfeedforward is not installed")
        else:
            rows.append(r)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    err = kernel_error()
    print("FFF hard path: " + ("compiled CPU kernel (topotorch.layers._cpu_kernel)" if kernel() is not None
                               else f"tensor ops (no kernel: {err or 'TOPOTORCH_NO_KERNEL set'})"))
    print(f"{'comparison':34s} {'batch':>5s} {'d':>2s} {'ℓ':>2s} {'FFF ms':>9s} {'other ms':>10s} "
          f"{'speed-up':>9s} {'theory':>7s} {'goal':>5s}")
    for r in rows:
        th = f"{r['theory']:7.0f}" if r["theory"] else f"{'-':>7s}"
        ok = ("ok" if r["speedup"] >= r["goal"] else "MISS") if r["goal"] > 1 else "-"
        print(f"{r['row']:34s} {r['batch']:5d} {r['depth']:2d} {r['leaf']:2d} {r['fff_ms']:9.3f} {r['other_ms']:10.3f} "
              f"{r['speedup']:8.1f}x {th} {r['goal']:4.0f}x {ok}".replace("    1x -", "     - -"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
