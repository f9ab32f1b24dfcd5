"""Forward speed of topographically compressed models vs the originals (ratio in one run).

A char-level TinyGPT (d_model 128, 4 blocks, c_fc 512 = 16x32 sheet) with every ``*.mlp.0`` cut by
50% and 80%, on a (32, 64) token batch; and the digits MLP 64-100-100-10 with both hidden 10x10
sheets cut, on a batch of 1024. The original and both cuts are timed side by side
(:func:`topotorch.timing.compare`: warm-up, interleaved repeats, medians with spread, threads and load;
no gradients).

    .venv/bin/python benchmarks/bench_compress.py --json results/bench_compress.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from topotorch.compression.topographic import compress, parameter_count
from topotorch.models import MLP, TinyGPT
from topotorch.timing import compare, conditions


def _forward(model, x):
    def f():
        with torch.no_grad():
            model(x)

    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cases = {
        "tinygpt": (
            TinyGPT(vocab=65, d_model=128, n_layers=4, n_heads=4, block_size=64),
            "*.mlp.0",
            torch.randint(0, 65, (32, 64)),
        ),
        "digits-mlp": (MLP([64, 100, 100, 10]), "0,2", torch.rand(1024, 64)),
    }
    out = {
        "threads": a.threads,
        "conditions": conditions(),
        "cases": {},
        "command": "python benchmarks/bench_compress.py " + " ".join(sys.argv[1:]),
    }
    for name, (model, layers, x) in cases.items():
        model.eval()
        smalls = {removed: compress(model, layers, removed=removed, mode="area").eval() for removed in (0.5, 0.8)}
        c = compare(
            {"original": _forward(model, x), **{f"removed{int(r * 100)}": _forward(m, x) for r, m in smalls.items()}},
            reps=a.repeat,
            warmup=3,
        )
        t0 = c.median("original")
        row = {"params": parameter_count(model), "forward_ms": round(t0 * 1e3, 3), "timing": c.as_dict()}
        for removed, small in smalls.items():
            k = f"removed{int(removed * 100)}"
            lo, hi = c.ratio_range("original", k)
            row[k] = {
                "params": parameter_count(small),
                "forward_ms": round(c.median(k) * 1e3, 3),
                "speedup": round(c.ratio("original", k), 2),
                "speedup_iqr": [round(lo, 2), round(hi, 2)],
            }
        out["cases"][name] = row
        print(
            f"{name}: {row['params']} params {t0 * 1e3:.2f} ms | 50% cut: {row['removed50']['params']} params "
            f"{row['removed50']['forward_ms']:.2f} ms ({row['removed50']['speedup']}x) | 80% cut: "
            f"{row['removed80']['params']} params {row['removed80']['forward_ms']:.2f} ms "
            f"({row['removed80']['speedup']}x); "
            f"{c.threads} thread(s), load {c.load_before} -> {c.load_after}"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
