"""BIMT overhead on a GPT training step: plain AdamW step vs + wiring-cost gradient + relocation every 200 steps.

The model is the char-level GPT of ``shakespeare-char`` (d_model 128, 4 blocks, 4 heads, ~0.8M
parameters; random tokens, so no corpus is needed) at batch 32 x 64 tokens. Timed with
:func:`topotorch.timing.compare` (warm-up, the sides interleaved with the same repeats, medians
with quartiles, threads and load recorded): a plain step, a step + wiring gradient (each sample
``--steps`` steps) and one relocation (closed-form greedy swaps over every space: residual
stream, heads, MLPs, outputs), amortised over its interval. Prints the overhead ratio.

    python benchmarks/bench_gpt_overhead.py [--rounds 5] [--steps 20] [--swap-every 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from topotorch.graph.transformer import transformer_graph
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_
from topotorch.relocation import relocate
from topotorch.tasks.sequence import CharLM
from topotorch.timing import compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--swap-every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = CharLM(65, d_model=128, n_layers=4, n_heads=4, block_size=64)
    graph = transformer_graph(model.gpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = WiringConfig(wf=2.0, l0=0.5, agg="mean")
    x = torch.randint(65, (args.batch, 64))
    y = torch.randint(65, (args.batch, 64))

    def step(bimt: bool) -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if bimt:
            add_wiring_grad_(graph, cfg, 1e-3)
        opt.step()

    c = compare(
        {
            "plain": lambda: step(False),
            "wiring": lambda: step(True),
            "relocation": lambda: relocate(graph, cfg, "swap", top_k=30, optimizer=opt),
        },
        reps=args.rounds,
        warmup=2,
        inner={"plain": args.steps, "wiring": args.steps, "relocation": 1},
    )
    p, b, r = c.median("plain"), c.median("wiring"), c.median("relocation")
    total = b + r / args.swap_every
    lo, hi = (
        (c.sides["wiring"].spread["q1"] + r / args.swap_every) / c.sides["plain"].spread["q3"] - 1,
        (c.sides["wiring"].spread["q3"] + r / args.swap_every) / c.sides["plain"].spread["q1"] - 1,
    )
    res = {
        "params": sum(q.numel() for q in model.parameters()),
        "batch_tokens": args.batch * 64,
        "plain_step_ms": p * 1e3,
        "wiring_step_ms": b * 1e3,
        "relocation_ms": r * 1e3,
        "swap_every": args.swap_every,
        "overhead": total / p - 1.0,
        "overhead_iqr": [lo, hi],
        "goal": 0.20,
        "timing": c.as_dict(),
    }
    print(f"GPT ({res['params'] / 1e6:.2f}M params, {res['batch_tokens']} tokens/step)")
    print(c.summary())
    print(f"  plain step          {p * 1e3:8.2f} ms")
    print(f"  + wiring gradient   {b * 1e3:8.2f} ms")
    print(
        f"  one relocation      {r * 1e3:8.2f} ms  "
        f"(every {args.swap_every} steps: {r / args.swap_every * 1e3:.2f} ms/step)"
    )
    print(f"  overhead            {res['overhead']:+8.1%} [IQR {lo:+.1%} – {hi:+.1%}]  (goal <= +20%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
