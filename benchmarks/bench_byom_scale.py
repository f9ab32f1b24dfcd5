"""Bring-your-own-model at scale: a GPT-2-small-sized Hugging Face model (GPT2Config() defaults, 124M).

Measured in one process (random init, no downloads):

* graph build: trace + rules + spaces + the safety net (one float64 forward for every movable
  space together), goal ≤ 15 s;
* the BIMT penalty per training step — its closed-form gradient (``add_wiring_grad_``, every
  step) and the wiring cost value (logged every ``log_every`` steps) — against one AdamW training
  step at batch 4 × 256 tokens, all timed interleaved (:func:`topotorch.timing.compare`), goal
  ≤ 5% of a step;
* one exact-assignment relocation of every movable space (heads first, then dims; MLP units;
  the residual stream) with the optimizer's state permuted, goal ≤ 30 s, and the function kept;
* extra memory the graph and the penalty hold (slices, distance matrices, cached per-weight cost
  factors), against the model + AdamW state, goal ≤ 10%.

    python benchmarks/bench_byom_scale.py [--layers 12] [--threads 2] [--json results/bench_byom_scale.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from topotorch.graph.flow import flow_graph
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from topotorch.relocation import relocate
from topotorch.timing import compare, conditions


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of the distinct tensors reachable through dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(k, seen) + tensor_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=args.layers))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 ({args.layers} layers): {n_params / 1e6:.1f}M parameters, {args.threads} threads")

    t0 = time.perf_counter()
    graph = flow_graph(model, torch.randint(0, 50257, (1, 8)))
    build = time.perf_counter() - t0
    movable = [s.name for s in graph.movable_spaces() if s.relocate == "weights"]
    print(f"graph built and checked in {build:.1f} s (goal ≤ 15 s): {len(graph.spaces)} spaces, {len(movable)} movable")

    cfg = WiringConfig(wf=1.0, l0=0.1, agg="mean")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 50257, (args.batch, args.tokens))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    def gradient():  # what the trainer adds every step
        add_wiring_grad_(graph, cfg, 1e-3)

    def value():  # what the trainer logs every log_every steps
        with torch.no_grad():
            wiring_cost(graph, cfg)

    step()  # AdamW state exists before memory is counted
    model.eval()  # dropout off: the relocation check compares outputs (training works the same in eval mode)
    cmp = compare({"train step": step, "gradient": gradient, "value": value}, reps=args.reps, warmup=1)
    ratio = cmp.median("gradient") / cmp.median("train step")
    both = (cmp.median("gradient") + cmp.median("value")) / cmp.median("train step")
    print(cmp.summary())
    print(
        f"closed-form gradient = {100 * ratio:.2f}% of a training step, gradient + value = {100 * both:.2f}% "
        f"(goal ≤ 5%; the trainer computes the value only every log_every steps)"
    )

    with torch.no_grad():
        probe = torch.randint(0, 50257, (1, 16))
        before = model(probe).logits
    t0 = time.perf_counter()
    stats = relocate(graph, cfg, "assign", optimizer=opt)
    reloc = time.perf_counter() - t0
    with torch.no_grad():
        err = float((model(probe).logits - before).abs().max() / before.abs().max())
    print(
        f"one exact assignment of all {len(movable)} movable spaces: {reloc:.1f} s (goal ≤ 30 s), "
        f"{sum(stats.moved.values())} neurons moved, output change {err:.1e} (relative, float32)"
    )

    base = tensor_bytes(list(model.parameters())) + tensor_bytes(list(opt.state.values()))
    extra = (
        tensor_bytes(graph.cache_values())
        + tensor_bytes([[sl.index for sl in s.slices] for s in graph.spaces])
        + tensor_bytes([s.positions for s in graph.spaces if s.positions is not None])
    )
    print(
        f"extra memory: {extra / 2**20:.1f} MiB = {100 * extra / base:.2f}% of model + AdamW state "
        f"({base / 2**20:.0f} MiB) (goal ≤ 10%)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "params": n_params,
                    "layers": args.layers,
                    "build_s": build,
                    "gradient_ratio": ratio,
                    "gradient_and_value_ratio": both,
                    "timing": cmp.as_dict(),
                    "relocate_assign_s": reloc,
                    "relocate_output_change": err,
                    "moved": sum(stats.moved.values()),
                    "extra_bytes": extra,
                    "base_bytes": base,
                    "extra_fraction": extra / base,
                    "conditions": conditions(),
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
