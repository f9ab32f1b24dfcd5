"""Transformer tasks: in-context regression, modular addition, character-level language modelling.

Each task's model is a :class:`~topotorch.models.TinyGPT` (wrapped so its output is what
the loss expects) placed in space by :func:`~topotorch.graph.transformer.transformer_graph`.

    >>> get_task("in-context-regression")  # the paper's transformer (BRIEF §1)
    >>> get_task("text:path/to/corpus.txt")  # char-level LM on any text file
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from topotorch.graph.transformer import transformer_graph
from topotorch.models import TinyGPT
from topotorch.tasks.core import TASKS, Task, TaskData, check_defaults, register_task, register_task_prefix

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


class LastToken(nn.Module):
    """A sequence model read out at the last position: (batch, time, ...) -> (batch, out)."""

    def __init__(self, gpt: TinyGPT, squeeze: bool = False):
        super().__init__()
        self.gpt = gpt
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gpt(x)[:, -1]
        return out.squeeze(-1) if self.squeeze else out


def _inner_graph(input_labels: list[str] | None = None, output_labels: list[str] | None = None):
    def make(model: nn.Module):
        gpt = model.gpt if isinstance(model, (LastToken, CharLM)) else model
        return transformer_graph(gpt, input_labels=input_labels, output_labels=output_labels)

    return make


# -- in-context linear regression (the paper's transformer experiment) --------------------------


def in_context_data(
    n: int, gen: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences (0, x1), (y1, 0), (0, x2) with y = w·x, w ~ U[-1, 1], x ~ U[1, 3]; returns (x, y2, w)."""
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    x1, x2 = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(2))
    seq = torch.zeros(n, 3, 2, dtype=torch.float64)
    seq[:, 0, 1], seq[:, 1, 0], seq[:, 2, 1] = x1, w * x1, x2
    return seq.to(dtype), (w * x2).to(dtype), w.to(dtype)


@register_task
def in_context_regression() -> Task:
    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        gen = torch.Generator().manual_seed(seed)
        xtr, ytr, _ = in_context_data(4096, gen, dtype)
        xte, yte, _ = in_context_data(1024, gen, dtype)
        return TaskData(xtr, ytr, xte, yte)

    return Task(
        name="in-context-regression",
        description="tokens (0,x1),(y1,0),(0,x2) -> y2 = w*x2; "
        "transformer 2 blocks, d=32, 1 head, MLP 128, no LayerNorm",
        make_data=make_data,
        make_model=lambda: LastToken(
            TinyGPT(in_dim=2, out_dim=1, d_model=32, n_layers=2, n_heads=1, d_mlp=128, block_size=3, layernorm=False),
            squeeze=True,
        ),
        loss="mse",
        make_graph=_inner_graph(["y-channel", "x-channel"], ["y2"]),
        output_labels=["y2"],
        # the paper's schedule (1e-3; 1e-2 at 10k; 1e-1 at 30k of 40k) compressed to 20k steps, with a
        # last phase at 0.3 that leaves w in <= 4 residual neurons (0.1 alone leaves 5)
        defaults=dict(
            steps=20000,
            lr=1e-3,
            l0=0.5,
            wf=2.0,
            top_k=20,
            swap_every=200,
            agg="mean",
            lam="0:1e-3,4000:1e-2,10000:1e-1,15000:3e-1",
            threshold=0.05,
            dtype="float32",
            batch_size=512,
        ),
        goal=("mse", "<=", 1e-2),
    )


@torch.no_grad()
def probe_residual(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, position: int = -1, min_activity: float = 0.01
) -> dict[str, torch.Tensor]:
    """Pearson r between every residual-stream neuron and ``target``, after the embedding and after each block.

    Returns {"embed": r, "blocks.0": r, ...}, each of shape (d_model,), read at sequence
    ``position``. Neurons whose activation varies less than ``min_activity`` times the most
    variable neuron of that layer carry no signal (a sparse net leaves many at ~1e-3 noise,
    whose r is meaningless) and get r = 0. Usage: ``probe_residual(model, x, w)["blocks.1"].abs().topk(4)``.
    """
    gpt = model.gpt if isinstance(model, LastToken) else model
    blocks: nn.ModuleList = gpt.blocks  # type: ignore[assignment]  # TinyGPT's blocks (nn.Module attributes are untyped)
    states: dict[str, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda m, i, o, n=f"blocks.{k}": states.__setitem__(n, o))
        for k, blk in enumerate(blocks)
    ]
    hooks.append(blocks[0].register_forward_pre_hook(lambda m, i: states.__setitem__("embed", i[0])))
    try:
        gpt(x)
    finally:
        for h in hooks:
            h.remove()
    t = (target - target.mean()) / target.std()
    out = {}
    for name in ["embed"] + [f"blocks.{k}" for k in range(len(blocks))]:
        a = states[name][:, position].to(torch.float64)
        a = a - a.mean(0)
        r = (a * t.to(torch.float64).unsqueeze(1)).sum(0) / ((a.pow(2).sum(0).sqrt() * math.sqrt(len(t) - 1)) + 1e-300)
        std = a.pow(2).sum(0).sqrt()
        out[name] = torch.where(std >= min_activity * std.max(), r, torch.zeros_like(r))
    return out


# -- modular addition with a one-layer transformer ---------------------------------------------


@register_task
def modular_addition_transformer() -> Task:
    p = 59

    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
        x = torch.as_tensor(np.stack([a.ravel(), b.ravel()], 1))
        y = torch.as_tensor((a.ravel() + b.ravel()) % p)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_train = round(0.8 * len(x))
        return TaskData(x[order[:n_train]], y[order[:n_train]], x[order[n_train:]], y[order[n_train:]])

    return Task(
        name="modular-addition-transformer",
        description=f"(a + b) mod {p} with a 1-layer transformer, 80% train",
        make_data=make_data,
        make_model=lambda: LastToken(
            TinyGPT(
                vocab=p,
                d_model=32,
                n_layers=1,
                n_heads=4,
                d_mlp=128,
                block_size=2,
                layernorm=False,
                tie_embeddings=False,
            )
        ),
        loss="ce",
        make_graph=_inner_graph(None, [str(i) for i in range(p)]),
        output_labels=[str(i) for i in range(p)],
        defaults=dict(
            steps=5000,
            lr=3e-3,
            weight_decay=0.0,
            l0=0.5,
            wf=2.0,
            top_k=30,
            swap_every=200,
            agg="mean",
            lam="0:0.01,1000:0.1",
            threshold=0.05,
            dtype="float32",
        ),
        goal=("accuracy", ">=", 0.99),
    )


# -- character-level language modelling --------------------------------------------------------


class CharLM(nn.Module):
    """TinyGPT over characters; forward gives (batch, time, vocab) logits."""

    def __init__(self, vocab: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4, block_size: int = 64):
        super().__init__()
        self.gpt = TinyGPT(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, block_size=block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt(x)


def bits_per_char(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean next-character cross-entropy in bits. Usage: ``bits_per_char(model, x_test, y_test)``."""
    with torch.no_grad():
        logits = model(x)
        return float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) / math.log(2))


def char_windows(
    text: str, block: int, held_out: float = 0.1
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vocabulary and (inputs, next-char targets) windows; the last ``held_out`` of the text is the test split."""
    if len(text) < 4 * (block + 1):
        raise ValueError(f"text of {len(text)} characters is too short for block size {block}")
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - held_out))

    def windows(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(seq) - 1) // block
        return seq[: n * block].view(n, block), seq[1 : n * block + 1].view(n, block)

    xtr, ytr = windows(ids[:cut])
    xte, yte = windows(ids[cut:])
    return vocab, xtr, ytr, xte, yte


@functools.lru_cache(maxsize=8)
def text_task(
    path: str | Path,
    name: str | None = None,
    block: int = 64,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    max_test_windows: int = 256,
) -> Task:
    """A character-level language-modelling task on the text file at ``path`` (90/10 split, bits/char).

    Usage: ``text_task("corpus.txt")``; on the command line, ``topotorch train text:corpus.txt``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    vocab, xtr, ytr, xte, yte = char_windows(text, block)

    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        return TaskData(xtr, ytr, xte[:max_test_windows], yte[:max_test_windows])

    return check_defaults(
        Task(
            name=name or f"text:{path}",
            description=f"character-level LM on {path.name} ({len(text)} chars, {len(vocab)} symbols)",
            make_data=make_data,
            make_model=lambda: CharLM(len(vocab), d_model, n_layers, n_heads, block),
            loss="ce",
            make_graph=_inner_graph(None, [repr(c)[1:-1] for c in vocab]),
            output_labels=[repr(c)[1:-1] for c in vocab],
            metric_name="bpc",
            evaluate=bits_per_char,
            # agg="sum": a per-weight penalty gradient of ~λ(wf·d + l0), comparable to the task's gradients
            # at λ ~ 1e-4 ("mean" would divide it by ~65k weights per layer). At 5k steps λ = 3e-5 costs
            # 0.23 bits/char and 5e-6 costs 0.03 (77% of attention/MLP weights below 0.05 vs 56% plain)
            defaults=dict(
                steps=5000,
                lr=1e-3,
                l0=0.5,
                wf=2.0,
                top_k=30,
                swap_every=200,
                agg="sum",
                lam="0:5e-6",
                threshold=0.05,
                dtype="float32",
                batch_size=32,
                log_every=250,
            ),
            goal=None,
        )
    )


@register_task_prefix("text:", "text:PATH")
def text_file_task(path: str) -> Task:
    """``text:PATH``: character-level language modelling on the text file at PATH. Usage: ``get_task("text:a.txt")``."""
    return text_task(path)


if SHAKESPEARE.is_file():  # registered lazily: the corpus is read only when the task is used
    TASKS["shakespeare-char"] = lambda: text_task(SHAKESPEARE, name="shakespeare-char")
