"""The paper's embedding-module ablation of a trained token run (e.g. modular addition).

Each embedding module alone, all but one, and only the active modules: train and test accuracy.

    topotorch train modular-addition --out runs/see/modular-addition-bimt
    python benchmarks/ablation_table.py runs/see/modular-addition-bimt --json results/modular_addition_ablation.json
"""

from __future__ import annotations

import argparse
import json

from topotorch.analysis.ablation import embedding_module_ablation
from topotorch.training import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = embedding_module_ablation(load_run(args.run))
    modules = [[int(i) for i in m] for m in res["modules"]]
    print("embedding modules (neuron ids):", modules)
    rows = [{"name": r["name"], "test": float(r["test"]), "train": float(r["train"])} for r in res["rows"]]
    for r in rows:
        print(f"  {r['name']:45s} test {r['test']:.3f}  train {r['train']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "modules": modules, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
