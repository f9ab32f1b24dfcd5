"""The shakespeare-char TinyGPT with dense MLPs vs FFF MLPs of the same training width.

Both models start from the same seed and train the same number of steps (Adam, minibatches
of windows). The FFF model is ``fffify(model, "*.mlp", leaf_width=ℓ)`` with training width =
the dense MLP's (4·d_model). It trains soft for the first half of the steps (--sharpness: its
decisions sharpen towards sigmoid(s·z) meanwhile) and with hard decisions for the second half, and
is evaluated with the hard forward (--share-leaves: its leaves train as path sums of per-node
offsets, merged back before evaluation). Prints test bits/char of both, the fraction of MLP neurons
one token uses (leaf neurons + node neurons on its path, over all MLP neurons), and the MLP-block
inference speed-up (one block on the test set's hidden states, dense vs hard FFF, median of repeats).

    python benchmarks/fff_gpt.py [--steps 300] [--leaf 8] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from topotorch.layers import SoftToHard, fffify, layer_inputs, merge_shared_leaves, share_leaves
from topotorch.tasks import get_task
from topotorch.tasks.sequence import bits_per_char
from topotorch.timing import median_seconds


def train(
    model: nn.Module, data, steps: int, batch: int, lr: float, seed: int, fff: bool, sharpness: float = 1.0
) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    schedule = SoftToHard(model, steps, hard_frac=0.5, final_sharpness=sharpness) if fff else None
    for step in range(steps):
        if schedule is not None:
            schedule.step(step)
        idx = torch.randint(0, len(data.x_train), (batch,), generator=g)
        logits = model.train()(data.x_train[idx])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data.y_train[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if schedule is not None:
        schedule.finish()
    return time.perf_counter() - t0


def block_time(block: nn.Module, h: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        return median_seconds(lambda: block(h), repeats, warmup=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--leaf", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--sharpness",
        type=float,
        default=1.0,
        help="FFF soft phase: decisions sharpen to sigmoid(s·z) (1 = no sharpening)",
    )
    ap.add_argument("--share-leaves", action="store_true", help="train FFF leaves as path sums (share_leaves)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("shakespeare-char")
    data = task.make_data(args.seed, torch.float32)
    torch.manual_seed(args.seed)
    dense = task.make_model()
    fff = copy.deepcopy(dense)
    names = fffify(fff, "*.mlp", leaf_width=args.leaf)
    if args.share_leaves:
        for name in names:
            share_leaves(fff.get_submodule(name))
    t_dense = train(dense, data, args.steps, args.batch, args.lr, args.seed, fff=False)
    t_fff = train(fff, data, args.steps, args.batch, args.lr, args.seed, fff=True, sharpness=args.sharpness)
    for name in names:
        merge_shared_leaves(fff.get_submodule(name))  # deployed as plain FFF layers
    layer = fff.get_submodule(names[0])
    bpc_dense = bits_per_char(dense.eval(), data.x_test, data.y_test)
    bpc_fff = bits_per_char(fff.eval(), data.x_test, data.y_test)
    used = (layer.leaf_width + layer.depth) / (layer.training_width + layer.n_nodes)
    h = layer_inputs(fff.eval(), names[0], data.x_test).reshape(-1, layer.input_width)
    dense_block = dense.get_submodule(names[0]).eval()
    td, tf = block_time(dense_block, h, args.repeats), block_time(layer.eval(), h, args.repeats)
    row = {
        "steps": args.steps,
        "share_leaves": args.share_leaves,
        "sharpness": args.sharpness,
        "bpc_dense": bpc_dense,
        "bpc_fff": bpc_fff,
        "mlp_width": layer.training_width,
        "leaf": layer.leaf_width,
        "depth": layer.depth,
        "neurons_used_fraction": used,
        "mlp_block_tokens": len(h),
        "mlp_block_dense_ms": td * 1e3,
        "mlp_block_fff_ms": tf * 1e3,
        "mlp_block_speedup": td / tf,
        "train_s_dense": t_dense,
        "train_s_fff": t_fff,
    }
    print(
        f"shakespeare-char, {args.steps} steps, MLP width {layer.training_width} (FFF ℓ={layer.leaf_width}, "
        f"d={layer.depth}), {torch.get_num_threads()} thread(s)"
    )
    print(f"test bits/char: dense {bpc_dense:.3f}, FFF (hard) {bpc_fff:.3f}")
    print(
        f"MLP neurons used per token: {100 * used:.1f}% ({layer.leaf_width} leaf + {layer.depth} node neurons "
        f"of {layer.training_width} + {layer.n_nodes})"
    )
    print(f"MLP block on {len(h)} tokens: dense {td * 1e3:.2f} ms, FFF {tf * 1e3:.2f} ms -> {td / tf:.1f}x")
    print(f"training time: dense {t_dense:.0f} s, FFF {t_fff:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
