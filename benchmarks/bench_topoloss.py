"""TopoLoss speed: ours vs the peer ``topoloss`` 0.0.2 on a NanoGPT-shaped stack of ``c_fc`` layers.

Forward + backward of the loss over all layers (default: 12 layers of 3072x768, φ = 4, bilinear),
best of ``--repeat`` runs each, printed as one ratio. Also checks both give the same value.

    .venv/bin/python benchmarks/bench_topoloss.py --json results/bench_topoloss.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from topotorch.objectives.topoloss import TopoLoss


class Stack(nn.Module):
    def __init__(self, layers: int, d_model: int, d_mlp: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"c_fc": nn.Linear(d_model, d_mlp)}) for _ in range(layers))


def _time(fn, params, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        for p in params:
            p.grad = None
        t = time.perf_counter()
        fn().backward()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-mlp", type=int, default=3072)
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Stack(a.layers, a.d_model, a.d_mlp)
    params = list(model.parameters())
    ours = TopoLoss(model, "*.c_fc", factor=a.factor)
    result = {"layers": a.layers, "shape": [a.d_mlp, a.d_model], "factor": a.factor,
              "threads": torch.get_num_threads()}
    t_ours = _time(ours, params, a.repeat)
    result["ours_s"] = round(t_ours, 4)
    try:
        from topoloss import LaplacianPyramid
        from topoloss import TopoLoss as PeerLoss
    except ImportError as e:
        print(f"peer topoloss not installed ({e}); ours: {t_ours * 1e3:.1f} ms")
    else:
        peer = PeerLoss([LaplacianPyramid(f"blocks.{i}.c_fc", a.factor, a.factor) for i in range(a.layers)])
        t_peer = _time(lambda: peer.compute(model), params, a.repeat)
        with torch.no_grad():
            diff = abs(float(ours()) - float(peer.compute(model)))
        result.update(peer_s=round(t_peer, 4), speedup=round(t_peer / t_ours, 2), abs_diff=diff)
        print(f"TopoLoss fwd+bwd over {a.layers} x {a.d_mlp}x{a.d_model}, φ={a.factor:g}: ours {t_ours * 1e3:.1f} ms, "
              f"peer {t_peer * 1e3:.1f} ms -> {t_peer / t_ours:.2f}x faster (|Δ value| = {diff:.1e})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
