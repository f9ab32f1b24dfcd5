"""Training a sparse coder: the recipe of Gao et al. (2024), one step at a time.

* **Normalise** the data by one scalar s (s² = E‖x‖²/d_in from the first batch) so that every
  hyper-parameter means the same at every layer and model; the returned coder has s folded back
  into its weights (:meth:`SparseCoder.fold_data_scale_`), so it works on raw activations.
* **b_dec** starts at the geometric median of a sample (Weiszfeld's iteration, vectorised): the point
  minimising Σ‖x_i − m‖, robust to the heavy tails of residual-stream activations.
* **Decoder rows** stay unit norm: before each step the gradient component parallel to each row is
  removed (the step only rotates the row), after it the rows are renormalised. The encoder starts as
  the decoder's transpose (SAEs).
* **Adam** with a linear warm-up and a linear or cosine decay to 0 (default lr 2e-4/√(n/2¹⁴)).
* **Lazy Adam rows** (``SAEConfig.lazy_updates``, on by default): a latent's encoder row, b_enc (and θ), the
  parameters that decide whether it fires, keep their values in a step where their gradient is exactly zero;
  only their moments decay. Plain Adam keeps moving a latent that stopped firing along its last momentum:
  m decays by β₁ per step while √v decays by only √β₂, so the step m/√v runs on for ~1/(1 − β₁) = 10 steps
  (≈ 10·lr in all), and the last gradient of a latent that is losing the top-k race points down. That drift,
  not the competition itself, kills most latents on a short, high-lr run (shakespeare residual stream, 16x,
  200 steps: 872 of 2,048 latents never fire on 102,400 unseen tokens with plain Adam, 4 with lazy rows;
  FVU 0.0063 vs 0.0060). The moments keep decaying, so a latent that fires again starts from a fresh, small
  step (freezing the moments too, TF LazyAdam's choice, resumes the stale downward momentum: 3x more dead).
* **Dead latents**: a counter of tokens since each latent last fired; latents past ``dead_tokens`` are
  dead, and AuxK (TopK/BatchTopK) trains them to explain the residual's direction (scale-free target,
  :meth:`SparseCoder._auxk`).

:class:`SAETrainer` is the step (the benchmark times it); :func:`train_sae` loops it over batches.

    >>> sae, history = train_sae(SAEConfig(d_in=64, n_latents=512, k=8), batches, steps=2000)
    >>> history["fvu"][-1], history["dead"][-1]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from topotorch.progress import progress_bar
from topotorch.sae.dictionary import SAEConfig, SAEOutput, SparseCoder
from topotorch.sae.kernels import accumulate_into_grad

ExtraLoss = Callable[[SparseCoder, SAEOutput], Tensor]


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iteration for argmin_m Σ_i ‖x_i − m‖ over the rows of x [N, d] (vectorised; starts at the
    mean; stops when the move is below ``tol`` × the data's scale). Usage: ``b = geometric_median(sample)``."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] sample, got shape {tuple(x.shape)}")
    m = x.mean(0)
    scale = float(x.std(0).norm()) if x.shape[0] > 1 else 1.0
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        moved = float((new - m).norm())
        m = new
        if moved <= tol * max(scale, eps):
            break
    return m


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up over ``warmup`` steps, then ``schedule`` ∈
    {"linear", "cosine", "constant"} from lr to 0 at ``steps``. Usage: ``lr_at(10, 1000, 1e-3, 100, "cosine")``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "linear":
        return lr * (1.0 - t)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'linear', 'cosine' or 'constant'")


def default_lr(n_latents: int) -> float:
    """2e-4 / √(n / 2¹⁴) (Gao et al.'s scaling, sparsify's default)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be a tensor [B, d_in] or a pair (x, y), got {type(batch).__name__}")


class SAETrainer:
    """One optimisation step of a sparse coder (see the module docstring), with dead-latent counters.

    ``extra_loss(sae, out)`` is added to the loss (e.g. a TopoLoss on the decoder).
    Usage: ``tr = SAETrainer(sae, lr=1e-3, steps=1000); out = tr.step(x)``."""

    def __init__(
        self,
        sae: SparseCoder,
        lr: float | None = None,
        steps: int = 1000,
        *,
        warmup: int | None = None,
        schedule: str = "linear",
        dead_tokens: int = 10_000_000,
        extra_loss: ExtraLoss | None = None,
        fused: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 6.25e-10,
    ):
        self.sae = sae
        self.lr = default_lr(sae.cfg.n_latents) if lr is None else float(lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self.warmup = min(1000, steps // 10) if warmup is None else int(warmup)
        lr_at(self.warmup, steps, 1.0, self.warmup, schedule)  # validates the schedule name
        self.schedule = schedule
        self.dead_tokens = int(dead_tokens)
        self.extra_loss = extra_loss
        params = [p for p in sae.parameters() if p.requires_grad]
        try:  # one fused pass over every parameter (CPU fused Adam since torch 2.4)
            self.opt = torch.optim.Adam(params, lr=self.lr, betas=betas, eps=eps, fused=fused)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(params, lr=self.lr, betas=betas, eps=eps)
        self.since_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=sae.W_enc.device)
        self.t = 0
        # the per-latent parameters that decide whether a latent fires (first dim n): lazy updates freeze their
        # rows when the gradient row is zero. Not W_dec: an idle latent's decoder row does not touch the output,
        # and letting its momentum run on is better (3 seeds on the shakespeare stream: FVU 0.00614 vs 0.00659
        # with the decoder rows frozen too, the same dead counts)
        per_latent = (sae.W_enc, sae.b_enc, sae.threshold)
        self._rows = [p for p in per_latent if isinstance(p, torch.nn.Parameter) and p.requires_grad]

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last ``dead_tokens`` tokens."""
        return self.since_fired >= self.dead_tokens

    def step(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """Forward, backward, parallel-gradient removal, Adam step, decoder renormalisation, counters.
        ``x`` (and ``y``) must already be in the coder's (normalised) space."""
        sae = self.sae
        use_aux = sae.arch.uses_auxk and sae.cfg.aux_alpha > 0
        out = sae.loss(x, y, dead_mask=self.dead_mask() if use_aux else None)
        loss = out.loss if self.extra_loss is None else out.loss + self.extra_loss(sae, out)
        # gradients kept between steps and zeroed in place; the sparse kernels add into them (no n×d allocation)
        self.opt.zero_grad(set_to_none=False)
        with accumulate_into_grad():
            loss.backward()
        sae.remove_parallel_grad_()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.t, self.steps, self.lr, self.warmup, self.schedule)
        kept = self._idle_rows() if sae.cfg.lazy_updates else []
        self.opt.step()
        with torch.no_grad():
            for p, idle, old in kept:  # lazy rows: undo Adam's momentum-only move of rows without a gradient
                p.index_copy_(0, idle, old)
        sae.normalize_decoder_()
        if sae.cfg.architecture == "jumprelu":  # θ > 0 keeps f = z·H(z − θ) a sparse ReLU-like code
            with torch.no_grad():
                sae.threshold.clamp_(min=1e-6)
        sae.arch.after_step(sae, out)  # per-step control of the architecture (target-L0 controller, θ from data)
        self.since_fired += x.shape[0]
        self.since_fired[out.fired] = 0
        self.t += 1
        return out

    @torch.no_grad()
    def _idle_rows(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(parameter, idle row indices, their current values) for W_enc, b_enc (and a trained θ): rows whose
        gradient is exactly zero this step (the latent neither fired nor was picked by AuxK)."""
        out: list[tuple[Tensor, Tensor, Tensor]] = []
        for p in self._rows:
            g = p.grad
            if g is None:
                continue
            # a row norm (one pass, no n×d temporary: 4x faster than (g != 0).any(1)); 0 iff the row is all zeros
            zero = g == 0 if g.dim() == 1 else torch.linalg.vector_norm(g, dim=1) == 0
            idle = zero.nonzero().squeeze(1)
            if idle.numel():
                out.append((p, idle, p.index_select(0, idle)))
        return out

    def permute_latents(self, perm: Tensor) -> None:
        """Reorder the coder's latents *and* the Adam moments and dead counters with them (relocation mid-run)."""
        perm = torch.as_tensor(perm, dtype=torch.long, device=self.since_fired.device)
        self.sae.permute_latents(perm)
        rows = {id(p) for p in (self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.threshold)}
        for p, st in self.opt.state.items():
            if id(p) in rows:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        st[key].copy_(st[key].index_select(0, perm))
        self.since_fired.copy_(self.since_fired[perm])


def _batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``batches``, starting over when a re-iterable (list, DataLoader) runs out."""
    while True:
        it = iter(batches)
        got = False
        for b in it:
            got = True
            yield b
        if it is batches or not got:  # a one-shot iterator (or an empty iterable) is not restarted
            return


def train_sae(
    cfg: SAEConfig,
    batches: Iterable[Any],
    steps: int,
    lr: float | None = None,
    *,
    warmup: int | None = None,
    schedule: str = "linear",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    normalize: bool = True,
    gm_samples: int = 4096,
    log_every: int = 50,
    progress: bool = False,
    extra_loss: ExtraLoss | None = None,
    sae: SparseCoder | None = None,
    on_step: Callable[[SAETrainer, int, Tensor], None] | None = None,
) -> tuple[SparseCoder, dict[str, Any]]:
    """Train a sparse coder on ``batches`` (tensors [B, d_in], or pairs (x, y) for a transcoder; a list or
    DataLoader is cycled) for ``steps`` steps. Returns the coder (data scale folded in: it works on raw
    activations) and a history: per log step ``step, tokens, fvu, l0, dead (fraction), aux, loss, lr``,
    plus ``data_scale``, ``dead_tokens`` and ``dead_final``.
    Usage: ``sae, hist = train_sae(SAEConfig(d_in=64, n_latents=512, k=8), [x_batch], steps=500, lr=1e-3)``."""
    torch.manual_seed(seed)
    stream = _batches(batches)
    # first batches: the normaliser and the geometric-median sample (then trained on like the rest)
    head: list[tuple[Tensor, Tensor | None]] = []
    n_head = 0
    for b in stream:
        x, y = _split(b)
        head.append((x, y))
        n_head += x.shape[0]
        if n_head >= gm_samples or len(head) >= steps:
            break
    if not head:
        raise ValueError("train_sae: batches is empty")
    if cfg.transcoder and any(y is None for _, y in head):
        raise ValueError("train_sae: a transcoder needs (x, y) pairs")
    for x, _ in head[:1]:
        if x.dim() != 2 or x.shape[1] != cfg.d_in:
            raise ValueError(f"train_sae: batches must be [B, d_in={cfg.d_in}], got {tuple(x.shape)}")
    dtype = dtype or head[0][0].dtype
    X = torch.cat([x for x, _ in head]).to(device=device, dtype=dtype)
    Y = torch.cat([y for _, y in head if y is not None]).to(device=device, dtype=dtype) if cfg.transcoder else X

    def rms_scale(t: Tensor) -> float:
        return float((t.pow(2).sum(1).mean() / t.shape[1]).sqrt().clamp(min=1e-12)) if normalize else 1.0

    s_in = rms_scale(X)
    s_out = rms_scale(Y) if cfg.transcoder else s_in
    if sae is None:
        sae = SparseCoder(cfg, dtype=dtype, device=device, seed=seed)
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(Y / s_out))
    else:
        if sae.data_scale != (1.0, 1.0):
            raise ValueError("train_sae: the given coder has an unfolded data scale")
        # continue training in normalised space: unfold the scale the returned coder has folded in
        with torch.no_grad():
            sae.W_enc.mul_(s_in / s_out)
            sae.b_enc.div_(s_out)
            if float(sae.threshold.min()) >= 0:
                sae.threshold.div_(s_out)
            sae.b_dec.div_(s_out)
            if sae.W_skip is not None:
                sae.W_skip.mul_(s_in / s_out)
    sae.data_scale = (s_in, s_out)
    B = head[0][0].shape[0]
    dead_tokens = cfg.dead_tokens or max(B, min(10_000_000, steps * B // 10))
    trainer = SAETrainer(
        sae, lr, steps, warmup=warmup, schedule=schedule, dead_tokens=dead_tokens, extra_loss=extra_loss
    )
    keys = ("step", "tokens", "fvu", "l0", "dead", "aux", "loss", "lr")
    hist: dict[str, Any] = {k: [] for k in keys}
    acc = {"fvu": 0.0, "l0": 0.0, "aux": 0.0, "loss": 0.0}
    n_acc, tokens = 0, 0

    def chain() -> Iterator[tuple[Tensor, Tensor | None]]:
        yield from head
        for b in stream:
            yield _split(b)

    with progress_bar(progress) as bar:
        job = bar.add_task("sae", total=steps) if bar else None
        for step, (x, y) in zip(range(steps), chain()):
            x = x.to(device=device, dtype=dtype) / s_in
            y = y.to(device=device, dtype=dtype) / s_out if y is not None and cfg.transcoder else None
            out = trainer.step(x, y)
            if on_step is not None:  # e.g. relocation mid-run (topographic SAE): (trainer, steps done, x normalised)
                on_step(trainer, step + 1, x)
            tokens += x.shape[0]
            acc["fvu"] += out.fvu.item()
            acc["l0"] += out.l0.item()
            acc["aux"] += out.aux.item()
            acc["loss"] += out.loss.item()
            n_acc += 1
            if (step + 1) % log_every == 0 or step + 1 == steps:
                hist["step"].append(step + 1)
                hist["tokens"].append(tokens)
                for k in acc:
                    hist[k].append(acc[k] / n_acc)
                    acc[k] = 0.0
                n_acc = 0
                hist["dead"].append(float(trainer.dead_mask().float().mean()))
                hist["lr"].append(trainer.opt.param_groups[0]["lr"])
            if bar:
                bar.update(job, advance=1)
    sae.fold_data_scale_()
    sae.eval()
    hist["data_scale"] = (s_in, s_out)
    hist["dead_tokens"] = dead_tokens
    hist["steps_done"] = trainer.t
    hist["dead_final"] = float(trainer.dead_mask().float().mean())
    hist["since_fired"] = trainer.since_fired.cpu()
    return sae, hist
