"""Sparse coders on ground-truth sparse features: MCC per architecture, and dead latents with and without AuxK.

Data: :class:`topotorch.sae.synthetic.SyntheticFeatures` ("easy": d = 64, 256 unit features, ≈ 8 active per
token, magnitudes U[0.5, 1.5]; "hard": 512 features, power-law frequencies, correlated groups, log-normal
magnitudes). Every architecture trains on the same fresh batches (``--batches`` × ``--batch`` tokens, cycled for
``--steps`` steps) and is scored on held-out tokens: MCC (Hungarian-matched mean max cosine of decoder rows
against the true features), FVU, L0, dead (never firing on the held-out tokens) and the training-time
dead fraction (not fired in the last ``dead_tokens`` tokens).

Dead-latent study: a TopK SAE at 16× (1024 latents on d = 64) with AuxK (α = 1/32) and without (α = 0).

    python benchmarks/sae_synthetic.py --json results/sae_synthetic.json
"""

from __future__ import annotations

import argparse
import time

import torch

from topotorch.checkpoint import atomic_write_json
from topotorch.sae import SAEConfig, SyntheticFeatures, evaluate_sae, mcc, train_sae
from topotorch.timing import conditions

ARCH_OPTIONS = {  # the sparsity knob of each architecture, aimed at L0 ≈ k
    "topk": {},
    "batchtopk": {},
    "jumprelu": {"l0_coeff": 10.0},         # + target_l0 = k (λ(L0/L0* − 1)²)
    "relu": {"l1_coeff": 0.3},
}


def run(setting: str, arch: str, n_latents: int, k: int, steps: int, batch: int, n_batches: int, lr: float,
        seed: int, **extra) -> dict:
    gen = SyntheticFeatures.make(setting, seed=seed)
    data = gen.batches(batch, n_batches)
    test = gen.batches(4096, 2)
    opts = dict(ARCH_OPTIONS[arch])
    if arch == "jumprelu":
        opts["target_l0"] = float(k)
    opts.update(extra)
    cfg = SAEConfig(d_in=gen.d, n_latents=n_latents, k=k, architecture=arch, **opts)
    t0 = time.perf_counter()
    sae, hist = train_sae(cfg, data, steps=steps, lr=lr, seed=seed, log_every=max(1, steps // 10))
    secs = time.perf_counter() - t0
    ev = evaluate_sae(sae, test)
    return {"setting": setting, "architecture": arch, "n_latents": n_latents, "k": k, "options": opts,
            "mcc": mcc(sae.W_dec, gen.features), "fvu": ev["fvu"], "l0": ev["l0"], "dead_eval": ev["dead"],
            "dead_train": hist["dead_final"], "dead_tokens": hist["dead_tokens"], "dense": ev["dense"],
            "rrb": ev["relative_reconstruction_bias"], "train_seconds": round(secs, 1), "steps": steps,
            "tokens": steps * batch, "fvu_history": hist["fvu"], "dead_history": hist["dead"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--settings", default="easy,hard")
    ap.add_argument("--archs", default="topk,batchtopk,jumprelu,relu")
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dead-study", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for setting in a.settings.split(","):
        for arch in a.archs.split(","):
            r = run(setting, arch, a.latents, a.k, a.steps, a.batch, a.batches, a.lr, a.seed)
            rows.append(r)
            print(f"{setting:5s} {arch:10s} MCC {r['mcc']:.3f}  FVU {r['fvu']:.3f}  L0 {r['l0']:.1f}  "
                  f"dead(eval) {r['dead_eval']:.3f}  dead(train) {r['dead_train']:.3f}  {r['train_seconds']} s",
                  flush=True)
    dead = []
    if a.dead_study:
        for alpha in (1.0 / 32, 0.0):
            r = run("easy", "topk", 16 * 64, a.k, a.steps, a.batch, a.batches, a.lr, a.seed, aux_alpha=alpha)
            r["aux_alpha"] = alpha
            dead.append(r)
            print(f"16x TopK aux_alpha={alpha:.4f}: dead(train) {r['dead_train']:.4f} "
                  f"({round(r['dead_train'] * 1024)} of 1024), dead(eval) {r['dead_eval']:.4f}, FVU {r['fvu']:.3f}, "
                  f"MCC {r['mcc']:.3f}", flush=True)
    out = {"command": "python benchmarks/sae_synthetic.py " + " ".join(f"--{k}={v}" for k, v in vars(a).items()),
           "conditions": conditions(), "architectures": rows, "dead_study": dead}
    if a.json:
        atomic_write_json(a.json, out)


if __name__ == "__main__":
    main()
