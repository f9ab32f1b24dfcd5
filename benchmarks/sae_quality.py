"""SAE quality on identical activations: our dictionaries vs sparsify's TopK, CE-loss recovered, dead latents,
the topographic SAE (neighbour similarity vs a shuffled baseline, and what it costs in FVU), and how latents
tile curved representations (a synthetic curve, the modular-addition embedding circle of a BIMT model, and
latents vs its modules).

Activations: the residual stream after block ``--hook`` of the shakespeare-char GPT (d_model 128, 4 blocks,
trained here for ``--gpt-steps`` steps, or reused from ``--gpt-run``). Every dictionary sees the same
training tokens in the same order (``--steps`` batches of ``--batch`` tokens, equal tokens) and is scored on
the same held-out tokens (the text's last 10%). The peer is EleutherAI ``sparsify`` (pip-installed): its own
``SparseCoder`` trained with its trainer's loop for ``loss_fn="fvu"`` — b_dec at the batch mean on the first
step, decoder renormalised before each forward, FVU (+ AuxK when on) backward, parallel gradient removed,
its default optimizer (SignSGD in a schedule-free wrapper, momentum 0.95, lr 5e-3/√(n/2¹⁴), ``eval()``
before use, as its ``save`` does) and, as a second peer row, its Adam option (lr 2e-4/√(n/2¹⁴), linear
warm-up then decay). Ours are ``train_sae`` with their defaults (Adam, geometric-median b_dec, warm-up +
linear decay, lazy Adam rows, scale-free AuxK α = 1/32 unless "no AuxK"; the "old" row: plain Adam on every
row and Gao's AuxK target), except the TopK rows (and the topographic runs built on them),
which take ``--lr`` (5e-3): the default 2e-4/√(n/2¹⁴) is Gao et al.'s rate for runs of ~10⁹ tokens, and on a
short run it alone explains our gap to the peer (measured on these activations, 200 steps × 1024 tokens,
n = 2048: held-out FVU 0.0555 at the default, 0.0149 at 2e-3, 0.0063 at 5e-3, 0.0052 at 1e-2; sparsify's
SignSGD, whose lr is 5e-3/√(n/2¹⁴) = 1.4e-2, 0.0064).

Dead latents: never firing on the 8,192 held-out tokens (``dead_eval``), not fired in the training window
(``dead_train_frac``), and never firing on ``--unseen-windows`` × 64 training-split tokens that no dictionary was
trained on (``dead_unseen``, 102,400 by default: long enough to tell a dead latent from a rare one).

Topographic: (1) relocation of the trained TopK SAE by decoder similarity and co-activation (weight
``--coactivation``, 0.1; its output is unchanged, FVU cost 0, except at exact float32 TopK ties, which
``permutation_check`` counts); (2) ``train_topographic``: τ·TopoLoss on the decoder sheet + relocation at 25%
of the run + a final one. Measures on the held-out codes: decoder |cos| and co-activation (uncentred)
correlation of 4-neighbours / their all-pairs mean (= the shuffled-position expectation).

    .venv/bin/python benchmarks/sae_quality.py --json results/sae_quality.json --pictures docs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: sparsify's eager decoder (its Triton path needs CUDA)

from topotorch.checkpoint import atomic_write_json
from topotorch.sae.dictionary import SAEConfig
from topotorch.sae.geometry import (
    circle_angles,
    curve_tiling,
    draw_curve_tiling,
    module_purity,
    synthetic_curve,
)
from topotorch.sae.splice import splice_eval
from topotorch.sae.topographic import (
    LatentSheet,
    draw_latent_sheet,
    latent_labels,
    relocate,
    topographic_measures,
    train_topographic,
)
from topotorch.sae.train import train_sae


def log(*a) -> None:
    print(*a, flush=True)


# ---- the GPT and its activations -----------------------------------------------------------------------------------


def gpt_model(run: Path, steps: int, seed: int):
    """The shakespeare-char GPT (the task's CharLM): its weights from ``run/gpt.safetensors`` when there, else
    trained here with a plain AdamW loop (lr 1e-3, 32 windows of 64 characters a step) and saved there."""
    from safetensors.torch import load_model, save_model

    from topotorch.tasks import get_task

    task = get_task("shakespeare-char")
    data = task.make_data(seed, torch.float32)
    torch.manual_seed(seed)
    model = task.make_model()
    path = run / "gpt.safetensors"
    if path.is_file():
        load_model(model, str(path))
        return model, data, {"reused": str(path)}
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data.x_train), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[i]).flatten(0, 1), data.y_train[i].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        bpc = float(torch.nn.functional.cross_entropy(model(data.x_test).flatten(0, 1), data.y_test.flatten()))
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / "gpt.safetensors.tmp"
    save_model(model, str(tmp))  # tied embedding/head weights: save_model stores them once
    os.replace(tmp, path)  # atomic: a half-written file never looks finished
    return (
        model,
        data,
        {
            "trained": str(path),
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "test_bits_per_char": round(bpc / math.log(2), 4),
        },
    )


@torch.no_grad()
def residual(model, windows: torch.Tensor, hook: str, per: int = 32) -> torch.Tensor:
    """[windows·T, d] activations at ``hook`` (sae-io's capture: plain forward hooks, forward stopped there)."""
    from topotorch.sae.activations import ModelActivations

    acts = ModelActivations(model, [windows[i : i + per] for i in range(0, len(windows), per)], hook)
    return torch.cat([b if isinstance(b, torch.Tensor) else b[0] for b in acts]).float()


# ---- the peer: sparsify's SparseCoder with its trainer's loop ------------------------------------------------------


def train_sparsify(
    x: torch.Tensor, n: int, k: int, steps: int, batch: int, optimizer: str, auxk_alpha: float = 0.0, seed: int = 0
):
    from sparsify import SparseCoder as PeerCoder
    from sparsify.config import SparseCoderConfig

    torch.manual_seed(seed)
    d = x.shape[1]
    sae = PeerCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(
            SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (n / 2**14) ** 0.5}]), momentum=0.95
        )
        opt.train()
        sched = None
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
        sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    since = torch.zeros(n, dtype=torch.long)
    dead_tokens = max(batch, steps * batch // 10)  # the same dead window as ours (10M tokens on a long run)
    for step in range(steps):
        xb = x[step * batch : (step + 1) * batch]
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since > dead_tokens if auxk_alpha > 0 else None
        out = sae(xb, dead_mask=dead)
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            since += len(xb)
            since[out.latent_indices.flatten()] = 0
    if optimizer == "signum":
        opt.eval()
    sae.eval()
    return sae, float((since > dead_tokens).float().mean())


# ---- evaluation ----------------------------------------------------------------------------------------------------


def char_groups(vocab: list[str]) -> tuple[np.ndarray, list[str]]:
    """Character classes for colouring: space, newline, vowel, consonant, capital, punctuation, other."""
    names = ["space", "newline", "vowel", "consonant", "capital", "punctuation", "other"]

    def g(c: str) -> int:
        if c == " ":
            return 0
        if c == "\n":
            return 1
        if c in "aeiou":
            return 2
        if c.isalpha() and c.islower():
            return 3
        if c.isalpha():
            return 4
        if c in ".,;:!?'-&$":
            return 5
        return 6

    return np.array([g(c) for c in vocab]), names


def score(name: str, fn, encode, x_eval: torch.Tensor, model, test_windows: torch.Tensor, hook: str, n: int) -> dict:
    """FVU, L0, dead-on-eval and CE-loss recovered of a reconstruction ``fn`` (rows → rows)."""
    with torch.no_grad():
        xh = fn(x_eval)
        e = (x_eval.double() - xh.double()).pow(2).sum()
        tv = (x_eval.double() - x_eval.double().mean(0)).pow(2).sum()
        z = encode(x_eval)
        fired = (z != 0).any(0)
    ce = splice_eval(model, fn, [test_windows[i : i + 32] for i in range(0, len(test_windows), 32)], hook)
    row = {
        "name": name,
        "fvu": float(e / tv),
        "l0": float((z != 0).sum(1).double().mean()),
        "dead_eval": int((~fired).sum()),
        "dead_eval_frac": round(float((~fired).double().mean()), 4),
        "ce_recovered": round(ce["ce_recovered"], 4),
        "kl": round(ce["kl"], 4),
        "ce_clean": round(ce["ce_clean"], 4),
        "ce_spliced": round(ce["ce_spliced"], 4),
        "ce_zero": round(ce["ce_zero"], 4),
    }
    row["fvu"] = round(row["fvu"], 5)
    log(
        f"  {name:<28} FVU {row['fvu']:.4f}  L0 {row['l0']:.1f}  dead(eval) {row['dead_eval']}/{n}  "
        f"CE rec {row['ce_recovered']:.3f}  KL {row['kl']:.4f}"
    )
    return row


@torch.no_grad()
def never_fires(encode, x: torch.Tensor, chunk: int = 8192) -> dict:
    """Latents with no non-zero code on any row of ``x`` (encoded in chunks): the dead count over a stretch long
    enough to tell dead from rare."""
    fired = None
    for i in range(0, len(x), chunk):
        f = (encode(x[i : i + chunk]) != 0).any(0)
        fired = f if fired is None else fired | f
    assert fired is not None
    log(f"    never fires on {len(x)} unseen tokens: {int((~fired).sum())}/{len(fired)}")
    return {"dead_unseen": int((~fired).sum()), "unseen_tokens": len(x)}


@torch.no_grad()
def permutation_check(base, rel, x: torch.Tensor) -> dict:
    """How far a relocated copy's output is from the original's: a permutation of latents leaves the function
    unchanged except where TopK's k-th and (k+1)-th pre-activations are exactly equal in float32 (``topk``
    breaks such ties by position, which the permutation changes). Counts the tokens whose selected set
    changes, the relative change ‖Δŷ‖/‖x − b_dec‖ per token (mean, max), and the same comparison in float64."""
    perm = torch.cdist(rel.W_dec.double(), base.W_dec.double()).argmin(1)  # new latent i = old latent perm[i]
    sel_b = torch.zeros(len(x), len(perm), dtype=torch.bool).scatter_(1, base.encode_sparse(x)[1], True)
    sel_r = torch.zeros_like(sel_b).scatter_(1, perm[rel.encode_sparse(x)[1]], True)
    d = (rel(x).double() - base(x).double()).norm(dim=1)
    r = d / (x.double() - base.b_dec.double()).norm(dim=1)
    b64, r64 = copy.deepcopy(base).double(), copy.deepcopy(rel).double()
    b64._pre_buffer = r64._pre_buffer = None  # the float32 workspace is not a parameter
    return {
        "tokens_selection_changed": int((sel_b != sel_r).any(1).sum()),
        "tokens": len(x),
        "relative_change_mean": float(r.mean()),
        "relative_change_max": float(r.max()),
        "max_abs_float32": float(d.max()),
        "max_abs_float64": float((r64(x.double()) - b64(x.double())).abs().max()),
    }


def measures(sae, x_eval: torch.Tensor, sheet: LatentSheet) -> dict:
    with torch.no_grad():
        m = topographic_measures(sae.W_dec, sae.encode(x_eval), sheet)
    return {k: v.to_dict() for k, v in m.items()}


def relocated_seed(seed: int, sae, x_all: torch.Tensor, x_eval: torch.Tensor, sheet: LatentSheet, coact: float) -> dict:
    """One seed of the relocation route: held-out FVU and measures of a relocated copy (the same function)."""
    rel = copy.deepcopy(sae)
    t = time.perf_counter()
    with torch.no_grad():
        relocate(rel, rel.encode(x_all[:16384]), sheet, coactivation=coact)
        xe = x_eval.double()
        fvu = float((xe - rel(x_eval).double()).pow(2).sum() / (xe - xe.mean(0)).pow(2).sum())
    m = measures(rel, x_eval, sheet)
    secs = round(time.perf_counter() - t, 1)
    ratios = f"decoder ×{m['decoder']['ratio']:.3f} coact ×{m['coactivation']['ratio']:.2f}"
    log(f"  seed {seed}: relocated ({secs} s) {ratios}, FVU {fvu:.5f}")
    return {"seed": seed, "fvu": fvu, "measures": m, "seconds": secs}


def seed_summary(rows: list[dict]) -> dict:
    """Mean, min and max over seeds of the two ratios; whether both clear 3× in every seed."""
    out: dict = {"seeds": [r["seed"] for r in rows]}
    for key in ("decoder", "coactivation"):
        v = [r["measures"][key]["ratio"] for r in rows]
        out[key] = {"mean": round(float(np.mean(v)), 4), "min": round(min(v), 4), "max": round(max(v), 4)}
    out["all_ge_3x"] = bool(out["decoder"]["min"] >= 3 and out["coactivation"]["min"] >= 3)
    return out


def held_out_fvu(sae, x_eval: torch.Tensor) -> float:
    with torch.no_grad():
        xe = x_eval.double()
        return float((xe - sae(x_eval).double()).pow(2).sum() / (xe - xe.mean(0)).pow(2).sum())


def tau_seed(seed: int, tau: float, cfg, batches, args, sheet: LatentSheet, x_eval: torch.Tensor) -> dict:
    """One more seed of a τ row: the plain TopK and the topographic one, same tokens, same seed."""
    plain, _ = train_sae(cfg, batches, steps=args.steps, lr=args.lr, seed=seed)
    sae, _ = train_topographic(
        cfg,
        batches,
        args.steps,
        sheet,
        tau=tau,
        factor=args.factor,
        relocate_at=(0.25,),
        coactivation=args.coactivation,
        lr=args.lr,
        seed=seed,
    )
    out = {"seed": seed, "fvu_plain": held_out_fvu(plain, x_eval), "fvu": held_out_fvu(sae, x_eval)}
    out["measures"] = measures(sae, x_eval, sheet)
    m = out["measures"]
    log(
        f"    seed {seed}: plain FVU {out['fvu_plain']:.5f}, τ={tau:g} FVU {out['fvu']:.5f}, "
        f"decoder ×{m['decoder']['ratio']:.3f} coact ×{m['coactivation']['ratio']:.2f}"
    )
    return out


def tau_seed_summary(rows: list[dict]) -> dict:
    """The FVU cost of a τ as the ratio of seed means (plain vs topographic, same seeds), with the seeds' spread."""
    plain = np.array([r["fvu_plain"] for r in rows])
    topo = np.array([r["fvu"] for r in rows])
    dec = [r["measures"]["decoder"]["ratio"] for r in rows]
    co = [r["measures"]["coactivation"]["ratio"] for r in rows]
    return {
        "seeds": [r["seed"] for r in rows],
        "fvu_plain_mean": round(float(plain.mean()), 6),
        "fvu_plain_spread": round(float(plain.max() - plain.min()), 6),
        "fvu_mean": round(float(topo.mean()), 6),
        "fvu_spread": round(float(topo.max() - topo.min()), 6),
        "fvu_rel_cost_of_means": round(float(topo.mean() / plain.mean() - 1), 4),
        "fvu_rel_cost_per_seed": [round(float(t / p - 1), 4) for t, p in zip(topo, plain)],
        "decoder_min": round(min(dec), 4),
        "coactivation_min": round(min(co), 4),
    }


def sheet_picture(sae, x_eval, tokens, vocab, sheet, path: Path, title: str) -> str:
    groups, names = char_groups(vocab)
    with torch.no_grad():
        top, purity = latent_labels(sae.encode(x_eval), torch.as_tensor(groups[tokens.numpy()]), len(names))
    draw_latent_sheet(top, purity, sheet, path, names=names, title=title)
    return str(path)


# ---- geometry ------------------------------------------------------------------------------------------------------


def geometry_part(args, pictures: Path | None) -> dict:
    from topotorch.analysis.modularity import detect_communities

    out: dict = {}
    # a synthetic curve that bends through 4 dimensions (frequencies 1 and 2)
    x, t = synthetic_curve(2048, d=16, frequencies=(1, 2), seed=args.seed)
    sae, _ = train_sae(
        SAEConfig(d_in=16, n_latents=32, k=2),
        [x[i : i + 256] for i in range(0, 2048, 256)],
        steps=300,
        lr=3e-3,
        seed=args.seed,
    )
    with torch.no_grad():
        z = sae.encode(x)
        fvu = float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    out["synthetic_curve"] = {
        "d": 16,
        "frequencies": [1, 2],
        "n_latents": 32,
        "k": 2,
        "fvu": round(fvu, 4),
        **curve_tiling(z, t).to_dict(),
    }
    if pictures:
        out["synthetic_curve"]["picture"] = str(
            draw_curve_tiling(
                x, z, t, pictures / "sae_curve_tiling.png", title="TopK SAE (32 latents, k=2) on a closed curve in 16-d"
            )
        )
    log(f"  synthetic curve: {out['synthetic_curve']}")

    # the modular-addition embedding circle of a BIMT-trained TokenMLP, and latents vs its modules
    from topotorch.training import TrainConfig, load_run, train

    run = Path(args.ma_run)
    if (run / "summary.json").is_file():
        r = load_run(run)
    else:
        s = args.ma_steps
        cfg = TrainConfig.for_task(
            "modular-addition",
            steps=s,
            lam=f"0:0.1,{s // 4}:1.0,{3 * s // 4}:0.1",
            relocation="assign",
            animation=False,
            progress=False,
            out=str(run),
        )
        r = train(cfg, overwrite=True)
    model = r.model.double()
    emb = model.embedding.weight.detach()
    theta, freq = circle_angles(emb)
    parts = detect_communities(r.graph, threshold=r.config.threshold)
    p = emb.shape[0]
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    with torch.no_grad():
        h1 = model.mlp[1](model.mlp[0](model.embedding(pairs).flatten(1)))  # hidden1 activations [p², 50]
    res = {
        "run": str(run),
        "steps": r.config.steps,
        "modularity_q": round(parts.q, 3),
        "modules": parts.n_communities,
        "dominant_frequency": freq,
    }
    # (1) the embedding circle: SAE on the 59 embedding rows (each residue once per batch, many batches)
    e32 = emb.float()
    sae_e, _ = train_sae(SAEConfig(d_in=e32.shape[1], n_latents=16, k=2), [e32], steps=400, lr=3e-3, seed=args.seed)
    with torch.no_grad():
        ze = sae_e.encode(e32)
        fvu_e = float((e32 - sae_e(e32)).pow(2).sum() / (e32 - e32.mean(0)).pow(2).sum())
    res["embedding_circle"] = {"n_latents": 16, "k": 2, "fvu": round(fvu_e, 4), **curve_tiling(ze, theta).to_dict()}
    res["embedding_vs_modules"] = module_purity(sae_e.W_enc, parts.membership["embed"], seed=args.seed)
    if pictures:
        res["embedding_circle"]["picture"] = str(
            draw_curve_tiling(
                emb,
                ze,
                theta,
                pictures / "sae_modular_circle.png",
                title=f"modular addition (p={p}, BIMT): embedding circle of frequency {freq}, 16-latent TopK SAE, k=2",
            )
        )
    # (2) hidden1: SAE on its activations over every pair; does each latent read from one BIMT module?
    h = h1.float()
    sae_h, _ = train_sae(
        SAEConfig(d_in=h.shape[1], n_latents=64, k=4),
        [h[i : i + 512] for i in range(0, len(h), 512)],
        steps=400,
        lr=3e-3,
        seed=args.seed,
    )
    res["hidden1_vs_modules"] = module_purity(sae_h.W_enc, parts.membership["hidden1"], seed=args.seed)
    with torch.no_grad():
        res["hidden1_vs_modules"]["fvu"] = round(float((h - sae_h(h)).pow(2).sum() / (h - h.mean(0)).pow(2).sum()), 4)
    out["modular_addition"] = res
    log(f"  modular addition: {json.dumps(res)[:600]}")
    return out


# ---- main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt-run", default="runs/sae_quality/gpt")
    ap.add_argument("--gpt-steps", type=int, default=300)
    ap.add_argument("--hook", default="gpt.blocks.1", help="residual stream after this block")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-3, help="Adam lr of our TopK rows (short runs need more than Gao's)")
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows of 64 tokens")
    ap.add_argument(
        "--unseen-windows",
        type=int,
        default=1600,
        help="training-split windows the dictionaries never see (64 tokens each): the long dead-latent count",
    )
    ap.add_argument("--taus", default="0.003,0.01", help="TopoLoss weights for train_topographic")
    ap.add_argument(
        "--coactivation",
        type=float,
        default=0.1,
        help="weight of co-activation (vs |decoder cos|) in the relocation similarity",
    )
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument(
        "--topo-seeds",
        default="",
        help="more seeds of the plain TopK to relocate (e.g. 1,2): the relocation's spread over seeds",
    )
    ap.add_argument(
        "--tau-seeds",
        default="",
        help="more seeds (e.g. 1,2) of each τ and of the plain TopK: the FVU cost as a mean over seeds",
    )
    ap.add_argument("--parts", default="quality,topographic,geometry")
    ap.add_argument("--ma-run", default="runs/sae_quality/modular")
    ap.add_argument("--ma-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pictures", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # measured: 1 thread beats 2 for these small matmuls on a shared box
    parts = set(args.parts.split(","))
    t_all = time.perf_counter()
    result: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "load_start": os.getloadavg()[0],
        "python": sys.version.split()[0],
    }

    if parts & {"quality", "topographic"}:
        torch.manual_seed(args.seed)
        model, data, gpt_info = gpt_model(Path(args.gpt_run), args.gpt_steps, args.seed)
        model.eval()
        result["gpt"] = gpt_info
        from topotorch.tasks.sequence import SHAKESPEARE, char_windows

        vocab = char_windows(SHAKESPEARE.read_text(encoding="utf-8"), 64)[0]
        need = args.steps * args.batch
        n_win = math.ceil(need / 64)
        g = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(len(data.x_train), generator=g)
        train_w = data.x_train[perm[:n_win]]
        test_w = data.x_test[: args.eval_windows]
        t0 = time.perf_counter()
        x_all = residual(model, train_w, args.hook)
        x_all = x_all[torch.randperm(len(x_all), generator=g)][:need]  # shuffled tokens, the same for all
        x_eval = residual(model, test_w, args.hook)
        tok_eval = test_w.reshape(-1)
        # dead = never fires on a long stretch: 8,192 held-out tokens cannot tell a rare latent from a dead one
        # (a latent firing 30 times in the 204,800 training tokens misses 8,192 tokens with p ≈ 0.3)
        unseen_w = data.x_train[perm[n_win : n_win + args.unseen_windows]] if "quality" in parts else None
        x_unseen = residual(model, unseen_w, args.hook) if unseen_w is not None else None
        d = x_all.shape[1]
        n = d * args.expansion
        sheet = LatentSheet.of(n)
        result["data"] = {
            "hook": args.hook,
            "d": d,
            "n_latents": n,
            "k": args.k,
            "train_tokens": len(x_all),
            "eval_tokens": len(x_eval),
            "steps": args.steps,
            "batch": args.batch,
            "sheet": [sheet.h, sheet.w],
            "activation_seconds": round(time.perf_counter() - t0, 1),
        }
        log(f"activations: {result['data']}")
        batches = [x_all[i : i + args.batch] for i in range(0, len(x_all), args.batch)]
        rows, trained = [], {}

        def ours(name: str, lr: float | None = None, **cfg_kw):
            t = time.perf_counter()
            cfg = SAEConfig(d_in=d, n_latents=n, **cfg_kw)
            sae, hist = train_sae(cfg, batches, steps=args.steps, lr=lr, seed=args.seed)
            row = score(name, sae, sae.encode, x_eval, model, test_w, args.hook, n)
            row.update(dead_train_frac=round(hist["dead_final"], 4), seconds=round(time.perf_counter() - t, 1))
            if x_unseen is not None:
                row.update(never_fires(sae.encode, x_unseen))
            rows.append(row)
            trained[name] = sae
            return sae

        log("dictionaries (equal tokens, held-out FVU):")
        ours("ours topk (AuxK)", lr=args.lr, architecture="topk", k=args.k)
        if "quality" in parts:
            ours("ours topk (no AuxK)", lr=args.lr, architecture="topk", k=args.k, aux_alpha=0.0)
            # the rules before issue 17's dead-latent work: plain Adam on every row, Gao's AuxK target
            ours(
                "ours topk (old: eager Adam, plain AuxK)",
                lr=args.lr,
                architecture="topk",
                k=args.k,
                lazy_updates=False,
                aux_scale_free=False,
            )
            # the same lr as TopK; JumpReLU and ReLU + L1 with their default options and target_l0 = k (no
            # calibration on this stream: θ / b_enc start from the first batch, a controller keeps L0 at k)
            ours("ours batchtopk", lr=args.lr, architecture="batchtopk", k=args.k)
            ours("ours jumprelu (target L0)", lr=args.lr, architecture="jumprelu", target_l0=float(args.k))
            ours("ours relu+L1 (target L0)", lr=args.lr, architecture="relu", target_l0=float(args.k))
            for opt_name in ("signum", "adam"):
                t = time.perf_counter()
                peer, dead_frac = train_sparsify(x_all, n, args.k, args.steps, args.batch, opt_name, seed=args.seed)

                def fn(a, peer=peer):
                    return peer(a).sae_out

                def enc(a, peer=peer):
                    out = peer.encode(a)
                    z = torch.zeros(len(a), n)
                    return z.scatter_(1, out.top_indices, out.top_acts.float())

                row = score(f"sparsify topk ({opt_name})", fn, enc, x_eval, model, test_w, args.hook, n)
                row.update(dead_train_frac=round(dead_frac, 4), seconds=round(time.perf_counter() - t, 1))
                if x_unseen is not None:
                    row.update(never_fires(enc, x_unseen))
                rows.append(row)
            peers = [r["fvu"] for r in rows if r["name"].startswith("sparsify")]
            result["fvu_ours_vs_best_peer"] = {
                "ours": rows[0]["fvu"],
                "best_peer": min(peers),
                "ours_le_peer": rows[0]["fvu"] <= min(peers),
            }
        result["dictionaries"] = rows

        if "topographic" in parts:
            log("topographic:")
            base = trained["ours topk (AuxK)"]
            base_fvu = rows[0]["fvu"]
            topo = {"sheet": [sheet.h, sheet.w], "plain": measures(base, x_eval, sheet)}
            rel = copy.deepcopy(base)
            t = time.perf_counter()
            with torch.no_grad():
                z = rel.encode(x_all[:16384])
            st = relocate(rel, z, sheet, coactivation=args.coactivation)
            secs = round(time.perf_counter() - t, 1)
            change = permutation_check(base, rel, x_eval)
            topo["relocated"] = {
                "measures": measures(rel, x_eval, sheet),
                "output_change": change,
                "fvu_cost": 0.0,
                "coactivation_weight": args.coactivation,
                "placement": {"before": st.before, "after": st.after, "swaps": st.swaps, "rounds": st.rounds},
                "seconds": secs,
            }
            log(
                f"  relocated ({secs} s; output change {change}): {topo['relocated']['measures']['decoder']} "
                f"{topo['relocated']['measures']['coactivation']}"
            )
            first = {"seed": args.seed, "fvu": base_fvu, "measures": topo["relocated"]["measures"], "seconds": secs}
            topo["relocated_seeds"] = [first]
            for seed in [int(v) for v in args.topo_seeds.split(",") if v.strip()]:
                cfg = SAEConfig(d_in=d, n_latents=n, architecture="topk", k=args.k)
                sae, _ = train_sae(cfg, batches, steps=args.steps, lr=args.lr, seed=seed)
                topo["relocated_seeds"].append(relocated_seed(seed, sae, x_all, x_eval, sheet, args.coactivation))
            topo["relocated_summary"] = seed_summary(topo["relocated_seeds"])
            log(f"  relocation over seeds: {topo['relocated_summary']}")
            if args.pictures:
                topo["plain"]["picture"] = sheet_picture(
                    base,
                    x_eval,
                    tok_eval,
                    vocab,
                    sheet,
                    args.pictures / "sae_sheet_plain.png",
                    "TopK SAE as trained: latent sheet by character class",
                )
                topo["relocated"]["picture"] = sheet_picture(
                    rel,
                    x_eval,
                    tok_eval,
                    vocab,
                    sheet,
                    args.pictures / "sae_sheet_relocated.png",
                    "after relocation by co-activation and decoder similarity",
                )
            topo["trained"] = []
            for tau in [float(v) for v in args.taus.split(",") if v.strip()]:
                t = time.perf_counter()
                cfg = SAEConfig(d_in=d, n_latents=n, architecture="topk", k=args.k)
                sae, hist = train_topographic(
                    cfg,
                    batches,
                    args.steps,
                    sheet,
                    tau=tau,
                    factor=args.factor,
                    relocate_at=(0.25,),
                    coactivation=args.coactivation,
                    lr=args.lr,
                    seed=args.seed,
                )
                row = score(f"topographic τ={tau:g}", sae, sae.encode, x_eval, model, test_w, args.hook, n)
                row.update(
                    tau=tau,
                    measures=measures(sae, x_eval, sheet),
                    fvu_rel_cost=round(row["fvu"] / base_fvu - 1, 4),
                    relocations=hist["relocations"],
                    seconds=round(time.perf_counter() - t, 1),
                )
                m = row["measures"]
                row["meets_goal"] = bool(
                    m["decoder"]["ratio"] >= 3 and m["coactivation"]["ratio"] >= 3 and row["fvu_rel_cost"] <= 0.02
                )
                log(
                    f"    decoder ×{m['decoder']['ratio']:.2f}  coact ×{m['coactivation']['ratio']:.2f}  "
                    f"FVU cost {row['fvu_rel_cost']:+.2%}"
                )
                if args.pictures:
                    row["picture"] = sheet_picture(
                        sae,
                        x_eval,
                        tok_eval,
                        vocab,
                        sheet,
                        args.pictures / f"sae_sheet_topo_tau{tau:g}.png",
                        f"topographic SAE τ={tau:g}: latent sheet by character class",
                    )
                if args.tau_seeds.strip():
                    row["seeds"] = [
                        {"seed": args.seed, "fvu_plain": base_fvu, "fvu": row["fvu"], "measures": row["measures"]}
                    ]
                    for seed in [int(v) for v in args.tau_seeds.split(",") if v.strip()]:
                        row["seeds"].append(tau_seed(seed, tau, cfg, batches, args, sheet, x_eval))
                    row["seed_summary"] = tau_seed_summary(row["seeds"])
                    log(f"    over seeds: {row['seed_summary']}")
                topo["trained"].append(row)
            result["topographic"] = topo

    if "geometry" in parts:
        log("geometry:")
        result["geometry"] = geometry_part(args, args.pictures)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["load_end"] = os.getloadavg()[0]
    log(f"total {result['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
