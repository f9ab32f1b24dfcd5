"""FF vs FFF test accuracy at equal training width, in the style of Table 1 of the FFF paper.

One hidden layer of training width 128 between inputs and 10 classes: a dense FF
(in -> 128 -> 10, ReLU) against FFFs with ℓ=8 (depth 4) and ℓ=1 (depth 7), each trained the
same way and evaluated as deployed: FFF accuracy is that of the hard (eval) forward, one
leaf per sample. Training is the library's (``topotorch.training_fff.fit_classifier`` with an
``FFFRecipe`` built from the options; ``topotorch fff TASK`` trains one such model). The recipe
is shared by every model: AdamW (--lr, --wd), cosine learning
rate, minibatches of --batch, the same --epochs, and Gaussian input noise of --noise times
each input feature's training-set std (augmentation). An FFF trains soft for the first
(1 - --hard-frac) of the epochs while its decisions are sharpened from sigmoid(z) to
sigmoid(--anneal · z) (geometric schedule), then with hard decisions (straight-through node
gradients), so that its leaves fit the routing they are deployed with; by default its leaves
train as path sums of per-node offsets (``share_leaves``, merged into a plain FFF before
evaluation; --no-share-leaves turns it off); --h adds the entropy hardening loss during the
soft phase, --distill the soft-phase model as a teacher (Hinton-style KL at T = 2) in the hard
phase. Datasets: scikit-learn digits (8x8, split by seed) and MNIST-1D
(``mnist1d.data.make_dataset`` with its default arguments or --mnist1d-samples, generated
offline; skipped with a message if ``mnist1d`` is not installed). Median of --seeds seeds; two worker
processes with one thread each.

    python benchmarks/fff_accuracy.py [--seeds 5] [--json out.json] [--leaf-table docs/fff_digits_leaves.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from topotorch.layers import class_leaf_table, format_class_leaf_table, leaf_usage
from topotorch.tasks import get_task
from topotorch.training_fff import FFFRecipe, accuracy, fit_classifier, make_classifier

WIDTH = 128
# command-line option -> FFFRecipe field
RECIPE_ARGS = {
    "epochs": "epochs",
    "batch": "batch_size",
    "lr": "lr",
    "wd": "weight_decay",
    "noise": "noise",
    "shift": "shift",
    "hard_frac": "hard_frac",
    "anneal": "final_sharpness",
    "share_leaves": "share_leaves",
    "h": "hardening",
    "node_lr": "node_lr",
    "distill": "distill",
    "kd_ff": "kd_alpha",
    "kd_temp": "kd_temp",
}


def load(name: str, seed: int, mnist1d_samples: int | None = None):
    if name == "digits":
        d = get_task("digits").make_data(seed, torch.float32)
        return d.x_train, d.y_train, d.x_test, d.y_test
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        spec = get_dataset_args()  # default args (5,000 samples, 80% train), generated (no download)
        if mnist1d_samples:
            spec.num_samples = mnist1d_samples
        ds = make_dataset(spec)
        xtr, xte = torch.as_tensor(ds["x"], dtype=torch.float32), torch.as_tensor(ds["x_test"], dtype=torch.float32)
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        return (xtr - mu) / sd, torch.as_tensor(ds["y"]).long(), (xte - mu) / sd, torch.as_tensor(ds["y_test"]).long()
    raise ValueError(f"unknown dataset {name!r}")


def make_model(kind: str, n_in: int, n_out: int, leak: float = 0.0) -> nn.Module:
    """ "FF" or "FFF l=<leaf width>" at training width 128."""
    if kind == "FF":
        return make_classifier("ff", n_in, n_out, WIDTH)
    return make_classifier("fff", n_in, n_out, WIDTH, leaf_width=int(kind.split("l=")[1]), region_leak=leak)


def train_eval(
    kind: str, data, seed: int, recipe: FFFRecipe, leak: float = 0.0, kd_teacher: nn.Module | None = None
) -> tuple[float, float, nn.Module]:
    """Train one model with the library's recipe (``topotorch.training_fff.fit_classifier``);
    returns (test accuracy of the deployed model, soft test accuracy, model)."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_model(kind, xtr.shape[1], 10, leak)
    fit_classifier(model, xtr, ytr, recipe, seed=seed, teacher=kd_teacher)
    return accuracy(model.eval(), xte, yte), accuracy(model.train(), xte, yte), model


def _job(job: tuple) -> dict:
    ds, kind, seed, args = job
    torch.set_num_threads(1)
    data = _data(ds, seed if ds == "digits" else 0, args["mnist1d_samples"])
    t = time.perf_counter()
    recipe = FFFRecipe(**{field: args[opt] for opt, field in RECIPE_ARGS.items()})
    teacher = None
    if kind != "FF" and recipe.kd_alpha > 0:  # the FF of this seed, trained exactly as its own row
        teacher = train_eval("FF", data, seed, recipe)[2].eval()
    hard, soft, model = train_eval(kind, data, seed, recipe, args["leak"], kd_teacher=teacher)
    with torch.no_grad():  # clean training data through the deployed model: does it fit?
        train_acc = (model.eval()(data[0]).argmax(1) == data[1]).float().mean().item()
    out = {
        "dataset": ds,
        "model": kind,
        "seed": seed,
        "hard": hard,
        "soft": soft,
        "train": train_acc,
        "secs": time.perf_counter() - t,
    }
    if ds == "digits" and kind == "FFF l=8" and seed == 0:
        usage = leaf_usage(model, data[2])
        out["leaf_table"] = (
            f"Digits test set through FFF ℓ=8 d=4 (seed 0, test accuracy {100 * hard:.1f}): "
            f"{usage.n_used} of 16 leaves used, effective {usage.effective_leaves:.1f}, "
            f"busiest {usage.max_fraction:.0%}\n\n"
            + format_class_leaf_table(class_leaf_table(model, data[2], data[3], 10))
        )
    return out


_CACHE: dict = {}


def _data(ds: str, seed: int, mnist1d_samples: int | None = None):
    if (ds, seed, mnist1d_samples) not in _CACHE:
        _CACHE[(ds, seed, mnist1d_samples)] = load(ds, seed, mnist1d_samples)
    return _CACHE[(ds, seed, mnist1d_samples)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,mnist1d")
    ap.add_argument("--models", default="FF,FFF l=8,FFF l=1")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (cosine schedule), all models")
    ap.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay, all models")
    ap.add_argument("--noise", type=float, default=0.5, help="input noise, in training stds per feature, all models")
    ap.add_argument(
        "--h",
        type=float,
        default=0.0,
        help="hardening coefficient (h=3 from the start collapsed digits onto one leaf in our runs)",
    )
    ap.add_argument("--anneal", type=float, default=30.0, help="FFF soft-phase final sharpness (1 = no annealing)")
    ap.add_argument("--hard-frac", type=float, default=0.5, help="final share of epochs trained with hard decisions")
    ap.add_argument("--distill", type=float, default=0.0, help="weight of KL to the soft-phase model in the hard phase")
    ap.add_argument(
        "--shift",
        type=int,
        default=0,
        help="random circular shift of each training input by up to ±shift samples, all models",
    )
    ap.add_argument(
        "--kd-ff",
        type=float,
        default=0.0,
        help="FFF only: weight of KL to this seed's trained FF (teacher), soft and hard phases",
    )
    ap.add_argument("--kd-temp", type=float, default=2.0, help="temperature of --kd-ff")
    ap.add_argument(
        "--node-lr",
        type=float,
        default=1.0,
        help="FFF routing-node learning-rate multiplier (nodes without weight decay if != 1)",
    )
    ap.add_argument(
        "--share-leaves",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FFF only: train leaves as path sums of per-node offsets (topotorch.layers.share_leaves)",
    )
    ap.add_argument(
        "--mnist1d-samples",
        type=int,
        default=None,
        help="generate MNIST-1D with this many samples (80%% train) instead of the default 5,000",
    )
    ap.add_argument("--leak", type=float, default=0.0, help="region leak probability")
    ap.add_argument("--workers", type=int, default=2, help="processes (one thread each)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--leaf-table", default=None, help="write the digits FFF ℓ=8 class/leaf table (markdown) here")
    args = ap.parse_args()
    datasets = []
    for ds in args.datasets.split(","):
        try:
            if ds == "mnist1d":
                import mnist1d  # noqa: F401
            datasets.append(ds)
        except ImportError as e:
            print(f"{ds}: skipped ({e}; pip install mnist1d)")
    kinds = args.models.split(",")
    opts = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "batch",
            "lr",
            "h",
            "hard_frac",
            "leak",
            "wd",
            "noise",
            "anneal",
            "distill",
            "shift",
            "kd_ff",
            "kd_temp",
            "node_lr",
            "share_leaves",
            "mnist1d_samples",
        )
    }
    jobs = [(ds, kind, seed, opts) for ds in datasets for kind in kinds for seed in range(args.seeds)]
    t0 = time.perf_counter()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            runs = pool.map(_job, jobs, chunksize=1)
    else:
        runs = [_job(j) for j in jobs]
    results = []
    for ds in datasets:
        for kind in kinds:
            rs = [r for r in runs if r["dataset"] == ds and r["model"] == kind]
            hard = [r["hard"] for r in rs]
            results.append(
                {
                    "dataset": ds,
                    "model": kind,
                    "test_acc": statistics.median(hard),
                    "soft_test_acc": statistics.median(r["soft"] for r in rs) if kind != "FF" else None,
                    "all_test_acc": hard,
                    "train_acc": statistics.median(r["train"] for r in rs),
                    "train_s": statistics.median(r["secs"] for r in rs),
                }
            )
            soft_acc = "-" if kind == "FF" else f"{100 * results[-1]['soft_test_acc']:.1f}"
            print(
                f"{ds:8s} {kind:9s} test acc {100 * results[-1]['test_acc']:5.1f}  "
                f"(seeds {' '.join(f'{100 * a:.1f}' for a in hard)}; soft forward {soft_acc}; "
                f"train acc {100 * results[-1]['train_acc']:.1f})"
            )
    print(
        f"\n{len(jobs)} runs in {time.perf_counter() - t0:.0f} s; median of {args.seeds} seeds, "
        f"test accuracy of the deployed (hard) model"
    )
    print("| dataset | FF (width 128) | FFF ℓ=8, d=4 | FFF ℓ=1, d=7 | FF − FFF ℓ=8 |")
    print("|---|---:|---:|---:|---:|")
    for ds in datasets:
        acc = {r["model"]: 100 * r["test_acc"] for r in results if r["dataset"] == ds}
        gap = acc.get("FF", float("nan")) - acc.get("FFF l=8", float("nan"))
        print(
            f"| {ds} | {acc.get('FF', float('nan')):.1f} | {acc.get('FFF l=8', float('nan')):.1f} | "
            f"{acc.get('FFF l=1', float('nan')):.1f} | {gap:+.1f} |"
        )
    leaf_table = next((r["leaf_table"] for r in runs if "leaf_table" in r), None)
    if leaf_table:
        print("\n" + leaf_table)
        if args.leaf_table:
            with open(args.leaf_table, "w") as f:
                f.write(leaf_table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
