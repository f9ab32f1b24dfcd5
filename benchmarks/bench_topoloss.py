"""TopoLoss speed: ours vs the peer ``topoloss`` 0.0.2, forward + backward, side by side in one process.

Cases (each at every ``--threads`` value and ``--dtypes``): 12 NanoGPT ``c_fc`` layers of 3072x768
(48x64 sheets) at φ = 3 and 4, and four Conv2d(64, 64, 3) (8x8 sheets, E = 576) at φ = 4. Both sides
run interleaved with the same repeats after a warm-up (:func:`topotorch.timing.compare`); gradients
are set to None before every call, as ``optimizer.zero_grad()`` does. Values are checked equal first.

The memory limit: forward + backward has to read every weight once and write every gradient once,
2 x (weight bytes). The machine's bandwidth is measured in the same process, interleaved with the
loss, as a copy of a buffer of the same size into an already-touched one (read + write) and into a
fresh one (read + write + page faults, as a fresh gradient is); the fraction of the limit reached is
(2 x weight bytes / our median) / copy bandwidth.

    .venv/bin/python benchmarks/bench_topoloss.py --json results/bench_topoloss.json
    .venv/bin/python benchmarks/bench_topoloss.py --threads 1 --dtypes float32 --cases gpt4 --reps 5   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from topotorch.objectives.topoloss import TopoLoss
from topotorch.timing import compare, conditions


class Stack(nn.Module):
    def __init__(self, layers: int, d_model: int, d_mlp: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"c_fc": nn.Linear(d_model, d_mlp)}) for _ in range(layers))


class Convs(nn.Module):
    def __init__(self, layers: int = 4, ch: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"c_fc": nn.Conv2d(ch, ch, 3)}) for _ in range(layers))


CASES = {  # name: (model builder, φ)
    "gpt3": (lambda: Stack(12, 768, 3072), 3.0),
    "gpt4": (lambda: Stack(12, 768, 3072), 4.0),
    "conv4": (lambda: Convs(4, 64), 4.0),
}


def run_case(name: str, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    build, factor = CASES[name]
    model = build().to(dtype)
    n_layers = len(model.blocks)
    weights = [b["c_fc"].weight for b in model.blocks]
    params = list(model.parameters())
    ours = TopoLoss(model, "*.c_fc", factor=factor)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    fns = {"ours": lambda: ours().backward()}
    res = {
        "case": name,
        "layers": n_layers,
        "weight_shape": list(weights[0].shape),
        "factor": factor,
        "dtype": str(dtype).replace("torch.", ""),
        "weight_bytes": nbytes,
    }
    try:
        from topoloss import LaplacianPyramid
        from topoloss import TopoLoss as PeerLoss
    except ImportError as e:
        res["peer"] = f"not installed ({e}); pip install -e '.[peers]'"
        peer = None
    else:
        peer = PeerLoss([LaplacianPyramid(f"blocks.{i}.c_fc", factor, factor) for i in range(n_layers)])
        with torch.no_grad():
            a, b = float(ours()), float(peer.compute(model))
        res.update(value_ours=a, value_peer=b, rel_diff=abs(a - b) / max(abs(b), 1e-30))
        fns["peer"] = lambda: peer.compute(model).backward()
    # the memory limit, measured alongside: copy the same number of bytes (read + write)
    flat = torch.randn(nbytes // 4)
    hot = torch.empty_like(flat)
    fns["copy_hot"] = lambda: hot.copy_(flat)
    fns["copy_fresh"] = lambda: torch.empty_like(flat).copy_(flat)

    def setup(_):
        for p in params:
            p.grad = None

    c = compare(fns, reps=reps, warmup=warmup, setup=setup)
    res["timing"] = c.as_dict()
    t_ours = c.median("ours")
    bw_hot = 2 * nbytes / c.median("copy_hot")
    bw_fresh = 2 * nbytes / c.median("copy_fresh")
    res.update(
        ours_ms=round(t_ours * 1e3, 3),
        copy_GBps=round(bw_hot / 1e9, 2),
        copy_fresh_GBps=round(bw_fresh / 1e9, 2),
        limit_ms=round(2 * nbytes / bw_hot * 1e3, 3),
        bandwidth_fraction=round(2 * nbytes / t_ours / bw_hot, 3),
        bandwidth_fraction_fresh=round(2 * nbytes / t_ours / bw_fresh, 3),
    )
    line = (
        f"{name:6s} {res['dtype']:8s} {c.threads} thr: ours {t_ours * 1e3:8.1f} ms "
        f"[IQR {c.sides['ours'].spread['q1'] * 1e3:.1f}–{c.sides['ours'].spread['q3'] * 1e3:.1f}]"
    )
    if peer is not None:
        sp = c.sides["peer"].spread
        lo, hi = c.ratio_range("peer", "ours")
        res.update(
            peer_ms=round(c.median("peer") * 1e3, 3),
            speedup=round(c.ratio("peer", "ours"), 2),
            speedup_iqr=[round(lo, 2), round(hi, 2)],
        )
        line += (
            f", peer {c.median('peer') * 1e3:8.1f} ms [IQR {sp['q1'] * 1e3:.1f}–{sp['q3'] * 1e3:.1f}] -> "
            f"{res['speedup']:.2f}x [{lo:.2f}–{hi:.2f}], rel Δ {res['rel_diff']:.1e}"
        )
    line += (
        f"; {res['bandwidth_fraction'] * 100:.0f}% of copy bandwidth {res['copy_GBps']} GB/s "
        f"({res['bandwidth_fraction_fresh'] * 100:.0f}% of {res['copy_fresh_GBps']} GB/s into fresh pages); "
        f"load {c.load_before} -> {c.load_after}"
    )
    print(line, flush=True)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gpt4,gpt3,conv4", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        sys.exit(f"unknown case(s) {bad}; choose from {list(CASES)}")
    rows = []
    start = conditions()
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for dt in a.dtypes.split(","):
            for case in cases:
                rows.append(
                    run_case(case, getattr(torch, dt.strip()), a.reps if case != "conv4" else a.reps * 5, a.warmup)
                )
    out = {
        "benchmark": "bench_topoloss",
        "command": "python benchmarks/bench_topoloss.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "conditions_start": start,
        "conditions_end": conditions(),
        "rows": rows,
    }
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
