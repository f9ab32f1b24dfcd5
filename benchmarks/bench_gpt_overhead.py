"""BIMT overhead on a GPT training step: plain AdamW step vs + wiring-cost gradient + relocation every 200 steps.

The model is the char-level GPT of ``shakespeare-char`` (d_model 128, 4 blocks, 4 heads, ~0.8M
parameters; random tokens, so no corpus is needed) at batch 32 x 64 tokens. Plain and BIMT steps
are interleaved in rounds so machine noise hits both alike; the relocation (closed-form greedy
swaps over every space: residual stream, heads, MLPs, outputs) is timed separately and
amortised over its interval. Prints the overhead ratio.

    python benchmarks/bench_gpt_overhead.py [--rounds 5] [--steps 20] [--swap-every 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from topotorch.graph.transformer import transformer_graph
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_
from topotorch.relocation import relocate
from topotorch.tasks_sequence import CharLM


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

    def steps(bimt: bool, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if bimt:
                add_wiring_grad_(graph, cfg, 1e-3)
            opt.step()
        return (time.perf_counter() - t) / n

    def one_relocation() -> float:
        t = time.perf_counter()
        relocate(graph, cfg, "swap", top_k=30, optimizer=opt)
        return time.perf_counter() - t

    steps(False, 3), steps(True, 3), one_relocation()  # warm up
    plain, bimt, reloc = [], [], []
    for _ in range(args.rounds):
        plain.append(steps(False, args.steps))
        bimt.append(steps(True, args.steps))
        reloc.append(one_relocation())
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    p, b, r = med(plain), med(bimt), med(reloc)
    total = b + r / args.swap_every
    res = {"params": sum(q.numel() for q in model.parameters()), "batch_tokens": args.batch * 64,
           "plain_step_ms": p * 1e3, "wiring_step_ms": b * 1e3, "relocation_ms": r * 1e3,
           "swap_every": args.swap_every, "overhead": total / p - 1.0, "goal": 0.20}
    print(f"GPT ({res['params'] / 1e6:.2f}M params, {res['batch_tokens']} tokens/step)")
    print(f"  plain step          {p * 1e3:8.2f} ms")
    print(f"  + wiring gradient   {b * 1e3:8.2f} ms")
    print(f"  one relocation      {r * 1e3:8.2f} ms  (every {args.swap_every} steps: {r / args.swap_every * 1e3:.2f} ms/step)")
    print(f"  overhead            {res['overhead']:+8.1%}  (goal <= +20%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
