"""Shrink BIMT-trained networks (dead neurons/channels/heads removed) and measure what it buys.

Trains ``digits-conv`` (SmallResNet + conv_graph) and ``modular-addition-transformer`` (1-layer
TinyGPT, no LayerNorm, + transformer_graph) with BIMT, shrinks each at the task's threshold and
prints: parameters before/after, max |output difference| against the thresholded original,
the test metric of the dense, thresholded and shrunk models, and forward latency at batch 256
(dense original vs shrunk, timed with :func:`topotorch.timing.compare`: warm-up, both sides
interleaved with the same repeats, medians with quartiles, threads and load recorded; 1 thread).

    python benchmarks/bench_shrink.py [--conv-steps 3000] [--gpt-steps 5000] [--conv-lam S] [--gpt-lam S] [--json PATH]

``--conv-group-lam 0,a,b`` / ``--gpt-group-lam 0,a,b``: one run per value with the neuron group lasso
(``TrainConfig.group_lam``, :func:`topotorch.objectives.neuron_group_norm`) on top of BIMT;
``--extra-thresholds 0.01,0.001`` also shrinks each trained model at those thresholds.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from topotorch.compression.shrink import shrink, threshold_model
from topotorch.timing import Comparison, compare, conditions
from topotorch.training import TrainConfig, evaluate, train


def latency(models: dict[str, torch.nn.Module], x: torch.Tensor, reps: int = 30) -> Comparison:
    """Forward passes of ``models`` on ``x``, interleaved (compare: warm-up, medians with quartiles)."""
    with torch.no_grad():
        return compare({k: (lambda m=m: m(x)) for k, m in models.items()}, reps=reps, warmup=3)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run(
    task: str,
    steps: int,
    inner: str | None,
    lam: str | None = None,
    group_lam: float = 0.0,
    extra_thresholds: tuple[float, ...] = (),
) -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig.for_task(
        task, steps=steps, lam=lam, group_lam=group_lam, progress=False, animation=False, out=None
    )
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    model, graph = res.model.eval(), res.graph
    core = getattr(model, inner) if inner else model  # the graph describes the wrapped GPT
    sh = shrink(core, graph, cfg.threshold)
    small = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    if inner:
        setattr(small, inner, sh.model)
        setattr(ref, inner, threshold_model(core, graph, cfg.threshold))
    else:
        small, ref = sh.model, threshold_model(core, graph, cfg.threshold)
    small.eval(), ref.eval()
    d = res.data
    with torch.no_grad():
        diff = (small(d.x_test) - ref(d.x_test)).abs().max().item()
        scale = ref(d.x_test).abs().max().item()
    xb = d.x_test[torch.arange(256) % len(d.x_test)]
    lat = latency({"dense": model, "shrunk": small}, xb)
    t_dense, t_small = lat.median("dense"), lat.median("shrunk")
    print(f"{task}: {lat.summary('dense', 'shrunk')}")
    out = {
        "task": task,
        "steps": steps,
        "lam": cfg.lam,
        "group_lam": cfg.group_lam,
        "train_seconds": round(train_s, 1),
        "threshold": cfg.threshold,
        "params_before": n_params(model),
        "params_after": n_params(small),
        "param_ratio": round(n_params(model) / n_params(small), 2),
        "removed": {k: v for k, v in sh.removed.items() if v},
        "size": {s.name: s.size for s in graph.spaces},
        "kept_why": sh.kept_why,
        "max_abs_diff_vs_thresholded": diff,
        "output_scale": scale,
        "metric": res.task.metric,
        "test_dense": evaluate(res.task, model, d.x_test, d.y_test),
        "test_thresholded": evaluate(res.task, ref, d.x_test, d.y_test),
        "test_shrunk": evaluate(res.task, small, d.x_test, d.y_test),
        "latency_b256_dense_ms": round(1e3 * t_dense, 3),
        "latency_b256_shrunk_ms": round(1e3 * t_small, 3),
        "speedup_b256": round(t_dense / t_small, 2),
        "speedup_b256_iqr": [round(v, 2) for v in lat.ratio_range("dense", "shrunk")],
        "timing_b256": lat.as_dict(),
    }
    for thr in extra_thresholds:  # the same trained model shrunk at another threshold
        sh2 = shrink(core, graph, thr)
        small2, ref2 = copy.deepcopy(model), copy.deepcopy(model)
        if inner:
            setattr(small2, inner, sh2.model)
            setattr(ref2, inner, threshold_model(core, graph, thr))
        else:
            small2, ref2 = sh2.model, threshold_model(core, graph, thr)
        small2.eval(), ref2.eval()
        with torch.no_grad():
            diff2 = (small2(d.x_test) - ref2(d.x_test)).abs().max().item()
        lat2 = latency({"dense": model, "shrunk": small2}, xb)
        out.setdefault("at_threshold", {})[str(thr)] = {
            "params_after": n_params(small2),
            "removed": {k: v for k, v in sh2.removed.items() if v},
            "test_shrunk": evaluate(res.task, small2, d.x_test, d.y_test),
            "max_abs_diff_vs_thresholded": diff2,
            "speedup_b256": round(lat2.ratio("dense", "shrunk"), 2),
            "speedup_b256_iqr": [round(v, 2) for v in lat2.ratio_range("dense", "shrunk")],
            "timing_b256": lat2.as_dict(),
        }
    if inner:
        out["heads_after"] = [b.attn.head_dims for b in sh.model.blocks]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conv-steps", type=int, default=3000)
    ap.add_argument("--gpt-steps", type=int, default=5000)
    ap.add_argument("--conv-lam", default=None, help="λ schedule for digits-conv (default: the task's)")
    ap.add_argument("--gpt-lam", default=None, help="λ schedule for the transformer (default: the task's)")
    ap.add_argument("--conv-group-lam", default="0", help="comma-separated group_lam values for digits-conv")
    ap.add_argument("--gpt-group-lam", default="0", help="comma-separated group_lam values for the transformer")
    ap.add_argument("--extra-thresholds", default="", help="also shrink at these thresholds (comma-separated)")
    ap.add_argument("--skip-conv", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    extra = tuple(float(t) for t in args.extra_thresholds.split(",") if t)
    results = {
        "threads": torch.get_num_threads(),
        "note": "2-core box shared with other jobs: latencies interleaved (timing.compare), medians with quartiles",
        "conditions_start": conditions(),
        "runs": (
            []
            if args.skip_conv
            else [
                run("digits-conv", args.conv_steps, None, args.conv_lam, float(g), extra)
                for g in args.conv_group_lam.split(",")
            ]
        )
        + (
            []
            if args.skip_gpt
            else [
                run("modular-addition-transformer", args.gpt_steps, "gpt", args.gpt_lam, float(g), extra)
                for g in args.gpt_group_lam.split(",")
            ]
        ),
    }
    results["conditions_end"] = conditions()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
