"""Which leaf owns which region: an FFF trained on two-moons, its partition drawn, its leaf usage printed.

Trains FFF(2 -> leaves of width ℓ -> 2 classes, depth d) on the two-moons task (soft, then
hard decisions for the last half of the steps, full batch), prints test accuracy of the
hard forward and the leaf usage / class-per-leaf table, and saves the region picture.

    python benchmarks/fff_regions.py [--depth 4] [--leaf 1] [--out docs/fff_two_moons_regions.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from topotorch.layers import FFF, class_leaf_table, draw_regions, format_class_leaf_table, leaf_usage
from topotorch.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--leaf", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/fff_two_moons_regions.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = get_task("two-moons").make_data(args.seed, torch.float32)
    layer = FFF(2, args.leaf, 2, args.depth, activation="relu")
    opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
    for step in range(args.steps):
        layer.train_hardened = step >= args.steps // 2
        loss = nn.functional.cross_entropy(layer.train()(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.train_hardened = False
    layer.eval()
    with torch.no_grad():
        acc = (layer(data.x_test).argmax(1) == data.y_test).float().mean().item()
    usage = leaf_usage(layer, data.x_test)
    print(
        f"two-moons FFF d={args.depth} ℓ={args.leaf}: hard test accuracy {100 * acc:.1f}%, "
        f"{usage.n_used}/{layer.n_leaves} leaves used, effective {usage.effective_leaves:.1f}"
    )
    print(format_class_leaf_table(class_leaf_table(layer, data.x_test, data.y_test, 2)))
    draw_regions(
        layer,
        data.x_test,
        data.y_test,
        path=args.out,
        title=f"two-moons, FFF depth {args.depth} (ℓ={args.leaf}): leaf regions, test acc {100 * acc:.1f}%",
    )
    print(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"test_acc": acc, **usage.as_dict()}, f, indent=2)


if __name__ == "__main__":
    main()
