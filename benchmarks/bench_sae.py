"""Training throughput of a TopK SAE on CPU: ours vs sparsify's eager path vs a dense-decoder TopK SAE.

One full optimisation step per call, on the same batch of B tokens, d = 768, 16× latents (12288), k = 32:

* ``ours``: :class:`topotorch.sae.train.SAETrainer` — addmm + topk encoder with a backward over the chosen
  entries only (sparse × dense for ∂W_enc, embedding_bag for ∂x), embedding_bag decoder with a
  sampled-product backward (∂values) and a sparse × dense ∂W_dec, parallel-gradient removal,
  fused Adam, decoder renormalisation, dead-latent counters (AuxK on; no latent is dead yet, as in
  the first 10M tokens of any run). Weight gradients are added into kept ``.grad`` buffers and the
  B×n pre-activations written into a kept buffer: no fresh n×d or B×n allocation per step.
* ``sparsify``: EleutherAI ``sparsify`` (pip ``eai-sparsify``) as its trainer runs it with
  ``optimizer="adam"`` on CPU (Triton disabled → its eager ``embedding_bag`` decoder; its
  ``FusedEncoder`` backward): ``set_decoder_norm_to_unit_norm``, ``forward`` (FVU), backward,
  ``remove_gradient_parallel_to_decoder_directions``, ``torch.optim.Adam.step`` (its default,
  the for-each-free CPU path), ``zero_grad``, and its dead-latent bookkeeping.
* ``sparsify+fusedAdam``: the same with our optimizer (fused Adam), to show how much of the gap is the
  optimizer and how much the kernels.
* ``dense``: the same recipe as ours written with plain autograd: dense codes z (B×n, topk scattered),
  ``z @ W_dec``; backward through the dense B×n matrices; the same fused Adam.

Sides interleaved with :func:`topotorch.timing.compare` (warm-up, rotating order, medians + IQR, threads,
load before/after).

    python benchmarks/bench_sae.py --json results/bench_sae.json            # 2 threads, B = 1024
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from typing import Any

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: sparsify's eager decoder (Triton needs CUDA)

import torch
import torch.nn.functional as F

from topotorch.checkpoint import atomic_write_json
from topotorch.sae import SAEConfig, SparseCoder
from topotorch.sae.train import SAETrainer
from topotorch.timing import compare, conditions


def ours_step(d: int, n: int, k: int, lr: float, fused: bool = True) -> Callable[[torch.Tensor], Any]:
    sae = SparseCoder(SAEConfig(d_in=d, n_latents=n, k=k), seed=0)
    tr = SAETrainer(sae, lr, steps=10**6, warmup=0, schedule="constant", fused=fused)
    return lambda x: tr.step(x)


def sparsify_step(d: int, n: int, k: int, lr: float, fused: bool = False) -> Callable[[torch.Tensor], Any]:
    from sparsify import SparseCoder as SpCoder
    from sparsify.config import SparseCoderConfig

    sae = SpCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True) if fused else torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(n, dtype=torch.long)

    def step(x):
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        out.fvu.backward()  # loss = fvu (+ auxk_alpha · auxk, 0 by sparsify's default)
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        did_fire = torch.zeros(n, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0
        return out

    return step


def dense_step(d: int, n: int, k: int, lr: float) -> Callable[[torch.Tensor], Any]:
    torch.manual_seed(0)
    W_dec = torch.randn(n, d)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = torch.nn.Parameter(W_dec.clone())
    W_dec = torch.nn.Parameter(W_dec)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, fused=True)

    def step(x):
        pre = F.relu(F.linear(x - b_dec, W_enc, b_enc))
        top = pre.topk(k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        e = x - (z @ W_dec + b_dec)
        loss = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = W_dec.grad
            g.sub_((g * W_dec).sum(1, keepdim=True) * W_dec)
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sides", default="ours,sparsify,sparsify+fusedAdam,dense")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, n, k = a.d, a.d * a.expansion, a.k
    lr = 2e-4 / (n / 2**14) ** 0.5
    x = torch.randn(a.batch, d, generator=torch.Generator().manual_seed(0))
    makers = {
        "ours": lambda: ours_step(d, n, k, lr),
        "sparsify": lambda: sparsify_step(d, n, k, lr),
        "sparsify+fusedAdam": lambda: sparsify_step(d, n, k, lr, fused=True),
        "dense": lambda: dense_step(d, n, k, lr),
        "ours+plainAdam": lambda: ours_step(d, n, k, lr, fused=False),
    }
    names = a.sides.split(",")
    unknown = set(names) - set(makers)
    if unknown:
        raise SystemExit(f"unknown sides {sorted(unknown)}; known: {sorted(makers)}")
    steps = {name: makers[name]() for name in names}
    c = compare({name: partial(steps[name], x) for name in names}, reps=a.reps, warmup=a.warmup)
    tok = {name: a.batch / c.median(name) for name in names}
    print(c.summary())
    for name in names:
        print(f"  {name:20s} {tok[name]:9.0f} tokens/s")
    for peer in names:
        if peer != "ours" and "ours" in names:
            lo, hi = c.ratio_range(peer, "ours")
            print(f"  ours vs {peer}: {c.ratio(peer, 'ours'):.2f}x [IQR {lo:.2f}-{hi:.2f}]")
    if a.json:
        out = {
            "command": "python benchmarks/bench_sae.py " + " ".join(f"--{k}={v}" for k, v in vars(a).items()),
            "d": d,
            "n_latents": n,
            "k": k,
            "batch": a.batch,
            "tokens_per_s": {kk: round(v, 1) for kk, v in tok.items()},
            "comparison": c.as_dict(),
            "conditions": conditions(),
        }
        atomic_write_json(a.json, out)


if __name__ == "__main__":
    main()
