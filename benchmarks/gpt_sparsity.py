"""Bits per character and attention/MLP weight sparsity of finished char-level GPT runs, side by side.

topotorch train shakespeare-char --method none --no-animation --out runs/shakespeare/none
topotorch train shakespeare-char --method bimt --no-animation --out runs/shakespeare/bimt
python benchmarks/gpt_sparsity.py runs/shakespeare/none runs/shakespeare/bimt --json results/gpt_sparsity.json
"""

from __future__ import annotations

import argparse
import json

import torch

from topotorch.training import load_run


def sparsity(run: str) -> dict:
    r = load_run(run)
    total = active = 0
    for name, p in r.model.named_parameters():
        if name.endswith("weight") and (".attn." in name or ".mlp." in name):
            total += p.numel()
            active += int((p.detach().abs() > r.config.threshold).sum())
    s = r.summary
    lam = r.config.lam if r.config.uses_penalty else "-"  # method none trains without the penalty
    return {
        "run": run,
        "method": r.config.method,
        "lam": lam,
        "steps": r.config.steps,
        "bpc": s.get("test_bpc"),
        "thresholded_bpc": s.get("thresholded_test_bpc"),
        "threshold": r.config.threshold,
        "attn_mlp_inactive_fraction": 1 - active / max(total, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [sparsity(r) for r in args.runs]
    base = rows[0]["bpc"]
    for r in rows:
        print(
            f"{r['run']:32s} {r['method']:5s} λ={r['lam']:10s} bits/char {r['bpc']:.3f} ({r['bpc'] - base:+.3f}) "
            f"thresholded {r['thresholded_bpc']:.3f}  attention+MLP weights |w| <= {r['threshold']}: "
            f"{r['attn_mlp_inactive_fraction']:.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
