"""Sparse coders on ground-truth sparse features: MCC per architecture, and dead latents with and without AuxK.

Data: :class:`topotorch.sae.synthetic.SyntheticFeatures` ("easy": d = 64, 256 unit features, ≈ 8 active per
token, magnitudes U[0.5, 1.5]; "hard": 512 features, power-law frequencies, correlated groups, log-normal
magnitudes). Every architecture trains on the same fresh batches (``--batches`` × ``--batch`` tokens, cycled for
``--steps`` steps) and is scored on held-out tokens: MCC (Hungarian-matched mean max cosine of decoder rows
against the true features), FVU, L0, dead (never firing on the held-out tokens) and the training-time
dead fraction (not fired in the last ``dead_tokens`` tokens).

Sparsity: TopK/BatchTopK take k directly; JumpReLU and ReLU + L1 take ``target_l0 = k`` with their default
options (:data:`ARCH_OPTIONS` is empty: θ or b_enc start from the first batch's quantile, a controller keeps
L0 at k; before that, a per-setting calibration — JumpReLU θ₀ 2, ε 0.1, λ 10; L1 0.55 — did not transfer to
other streams). BatchTopK learns more slowly than TopK from a random start (see README): ``--lr 1e-2`` is its
setting here.

Dead-latent study: a TopK SAE at 16× on the same tokens with AuxK (α = 1/32) and without (α = 0), with the
default rules (lazy Adam rows, scale-free AuxK target) or, ``--old-rules``, plain Adam and Gao's AuxK target:
``--dead-setting gpt --dead-latents 2048`` on the residual stream of the shakespeare-char GPT (d = 128, the
model and capture of ``benchmarks/sae_quality.py``, k = 16), or a synthetic setting (1024 latents on d = 64,
where no latent dies even without AuxK, so the two runs are identical).

The JSON is rewritten (atomically) after every run, so a killed run leaves the rows it finished.

    python benchmarks/sae_synthetic.py --settings easy --threads 1 --json results/sae_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from topotorch.checkpoint import atomic_write_json
from topotorch.sae import SAEConfig, SyntheticFeatures, evaluate_sae, mcc, train_sae
from topotorch.timing import conditions

# options per architecture beyond k / target_l0 = k (none: the defaults are scale-free; see the module docstring)
ARCH_OPTIONS: dict[str, dict[str, Any]] = {"topk": {}, "batchtopk": {}, "jumprelu": {}, "relu": {}}


def run(
    setting: str,
    arch: str,
    n_latents: int,
    k: int,
    steps: int,
    batch: int,
    n_batches: int,
    lr: float,
    seed: int,
    **extra,
) -> dict:
    gen = SyntheticFeatures.make(setting, seed=seed)
    data = gen.batches(batch, n_batches)
    test = gen.batches(4096, 2)
    opts = dict(ARCH_OPTIONS[arch])
    if arch in ("jumprelu", "relu"):
        opts["target_l0"] = float(k)
    opts.update(extra)
    cfg = SAEConfig(d_in=gen.d, n_latents=n_latents, k=k, architecture=arch, **opts)
    t0 = time.perf_counter()
    sae, hist = train_sae(cfg, data, steps=steps, lr=lr, seed=seed, log_every=max(1, steps // 10))
    secs = time.perf_counter() - t0
    ev = evaluate_sae(sae, test)
    return {
        "setting": setting,
        "architecture": arch,
        "n_latents": n_latents,
        "k": k,
        "options": opts,
        "lr": lr,
        "mcc": mcc(sae.W_dec, gen.features),
        "fvu": ev["fvu"],
        "l0": ev["l0"],
        "dead_eval": ev["dead"],
        "dead_train": hist["dead_final"],
        "dead_train_count": int(hist["since_fired"].ge(hist["dead_tokens"]).sum()),
        "dead_tokens": hist["dead_tokens"],
        "dense": ev["dense"],
        "rrb": ev["relative_reconstruction_bias"],
        "train_seconds": round(secs, 1),
        "steps": steps,
        "tokens": steps * batch,
        "fvu_history": hist["fvu"],
        "l0_history": hist["l0"],
        "dead_history": hist["dead"],
    }


def batchtopk_from_topk(
    setting: str, n_latents: int, k: int, steps: int, batch: int, n_batches: int, lr: float, seed: int
) -> dict:
    """The BatchTopK diagnosis: train TopK, then continue the *same* coder as BatchTopK for ``steps`` more steps on
    the same tokens. If the batch objective kept the true features as a good solution, MCC stays and FVU drops
    to TopK's; "before" is the TopK coder scored with the batch selection (B·k largest, no θ)."""
    from topotorch.sae import SparseCoder
    from topotorch.sae.kernels import pre_activations

    gen = SyntheticFeatures.make(setting, seed=seed)
    data, test = gen.batches(batch, n_batches), gen.batches(4096, 2)
    topk, _ = train_sae(SAEConfig(d_in=gen.d, n_latents=n_latents, k=k), data, steps=steps, lr=lr, seed=seed)

    def batch_fvu(sae) -> float:
        with torch.no_grad():
            x = torch.cat(test)
            pre = pre_activations(x - sae.b_dec, sae.W_enc, sae.b_enc)
            t = pre.reshape(-1).topk(x.shape[0] * k).values.min()
            y = (pre * (pre >= t) * (pre > 0)) @ sae.W_dec + sae.b_dec
            return float((x - y).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    cfg = SAEConfig(d_in=gen.d, n_latents=n_latents, k=k, architecture="batchtopk")
    sae = SparseCoder(cfg)
    sae.load_state_dict({**topk.state_dict(), "threshold": torch.full((n_latents,), -1.0)})
    before = {
        "mcc": mcc(topk.W_dec, gen.features),
        "fvu_topk": evaluate_sae(topk, test)["fvu"],
        "fvu_batch_selection": batch_fvu(sae),
    }
    sae, hist = train_sae(cfg, data, steps=steps, lr=lr, seed=seed, sae=sae, log_every=max(1, steps // 10))
    ev = evaluate_sae(sae, test)
    return {
        "setting": setting,
        "before": before,
        "after": {
            "mcc": mcc(sae.W_dec, gen.features),
            "fvu": ev["fvu"],
            "l0": ev["l0"],
            "dead_eval": ev["dead"],
            "fvu_batch_selection": batch_fvu(sae),
        },
        "fvu_history": hist["fvu"],
        "steps": steps,
        "lr": lr,
    }


def gpt_residual(n_tokens: int, seed: int, hook: str, run_dir: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Training batches (1024 shuffled tokens each) and 8192 held-out tokens of the shakespeare-char GPT's residual
    stream after ``hook`` — the model and capture of ``benchmarks/sae_quality.py`` (its saved GPT when present)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sae_quality import gpt_model, residual

    model, data, _ = gpt_model(Path(run_dir), 300, seed)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    windows = data.x_train[torch.randperm(len(data.x_train), generator=g)[: math.ceil(n_tokens / 64)]]
    x = residual(model, windows, hook)
    x = x[torch.randperm(len(x), generator=g)][:n_tokens]
    return list(x.split(1024)), residual(model, data.x_test[:128], hook)


def run_dead_gpt(
    n_latents: int,
    k: int,
    steps: int,
    lr: float | None,
    seed: int,
    alpha: float,
    batches: list[torch.Tensor],
    test: torch.Tensor,
    **rules: Any,
) -> dict:
    cfg = SAEConfig(d_in=test.shape[1], n_latents=n_latents, k=k, architecture="topk", aux_alpha=alpha, **rules)
    t0 = time.perf_counter()
    sae, hist = train_sae(cfg, batches, steps=steps, lr=lr, seed=seed, log_every=max(1, steps // 10))
    secs = time.perf_counter() - t0
    ev = evaluate_sae(sae, [test])
    return {
        "setting": "gpt",
        "architecture": "topk",
        "n_latents": n_latents,
        "k": k,
        "aux_alpha": alpha,
        "rules": rules or "defaults",
        "lr": lr if lr is not None else "default",
        "fvu": ev["fvu"],
        "l0": ev["l0"],
        "dead_eval": ev["dead"],
        "dead_train": hist["dead_final"],
        "dead_train_count": int(hist["since_fired"].ge(hist["dead_tokens"]).sum()),
        "dead_tokens": hist["dead_tokens"],
        "dense": ev["dense"],
        "train_seconds": round(secs, 1),
        "steps": steps,
        "tokens": sum(len(b) for b in batches[:steps]),
        "fvu_history": hist["fvu"],
        "dead_history": hist["dead"],
    }


def _names(s: str) -> list[str]:
    return [t for t in s.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--settings", default="easy,hard", help="comma list; empty for none")
    ap.add_argument("--archs", default="topk,batchtopk,jumprelu,relu")
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dead-study", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dead-setting", default="hard", help="a synthetic setting, or 'gpt' (residual stream)")
    ap.add_argument("--gpt-hook", default="gpt.blocks.1")
    ap.add_argument("--gpt-run", default="runs/sae_quality/gpt")
    ap.add_argument("--gpt-k", type=int, default=16)
    ap.add_argument("--gpt-lr", type=float, default=None, help="default: train_sae's 2e-4/√(n/2¹⁴)")
    ap.add_argument("--dead-latents", type=int, default=1024)
    ap.add_argument("--aux-alphas", default="0.03125,0", help="AuxK α values of the dead-latent study")
    ap.add_argument(
        "--old-rules",
        action="store_true",
        help="dead study with the rules before issue 17's fix: plain Adam on idle rows, Gao's AuxK target",
    )
    ap.add_argument(
        "--opts", default="{}", help="JSON merged into every architecture's options, e.g. '{\"l1_coeff\": 0.1}'"
    )
    ap.add_argument("--batchtopk-from-topk", action="store_true", help="the BatchTopK diagnosis (easy setting)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out: dict[str, Any] = {
        "command": "python benchmarks/sae_synthetic.py " + " ".join(f"--{k}={v}" for k, v in vars(a).items()),
        "conditions": conditions(),
        "architectures": [],
        "dead_study": [],
    }

    def save() -> None:  # after every run: a killed run keeps what it finished
        if a.json:
            atomic_write_json(a.json, out)

    extra = json.loads(a.opts)
    if a.batchtopk_from_topk:
        out["batchtopk_from_topk"] = r = batchtopk_from_topk(
            "easy", a.latents, a.k, a.steps, a.batch, a.batches, a.lr, a.seed
        )
        save()
        print(f"TopK → BatchTopK: before {r['before']}, after {r['after']}", flush=True)
    for setting in _names(a.settings):
        for arch in _names(a.archs):
            r = run(setting, arch, a.latents, a.k, a.steps, a.batch, a.batches, a.lr, a.seed, **extra)
            out["architectures"].append(r)
            save()
            print(
                f"{setting:5s} {arch:10s} MCC {r['mcc']:.3f}  FVU {r['fvu']:.3f}  L0 {r['l0']:.1f}  "
                f"dead(eval) {r['dead_eval']:.3f}  dead(train) {r['dead_train']:.3f}  {r['train_seconds']} s",
                flush=True,
            )
    if a.dead_study:
        gpt = gpt_residual(a.steps * 1024, a.seed, a.gpt_hook, a.gpt_run) if a.dead_setting == "gpt" else None
        for alpha in (float(v) for v in _names(a.aux_alphas)):
            if gpt is not None:  # same tokens in the same order for every α
                old = {"lazy_updates": False, "aux_scale_free": False} if a.old_rules else {}
                r = run_dead_gpt(a.dead_latents, a.gpt_k, a.steps, a.gpt_lr, a.seed, alpha, *gpt, **old)
                r["mcc"] = float("nan")
            else:
                r = run(
                    a.dead_setting,
                    "topk",
                    a.dead_latents,
                    a.k,
                    a.steps,
                    a.batch,
                    a.batches,
                    a.lr,
                    a.seed,
                    aux_alpha=alpha,
                )
            r["aux_alpha"] = alpha
            out["dead_study"].append(r)
            save()
            print(
                f"{a.dead_setting} {a.dead_latents} latents TopK aux_alpha={alpha:.4f}: dead(train) "
                f"{r['dead_train_count']} of {a.dead_latents} ({r['dead_train']:.4f}), "
                f"dead(eval) {r['dead_eval']:.4f}, "
                f"FVU {r['fvu']:.3f}, MCC {r['mcc']:.3f}",
                flush=True,
            )
    out["conditions_end"] = conditions()
    save()


if __name__ == "__main__":
    main()
