"""A `topotorch train` run folder of a tiny language model (TinyGPT, d_model 16, 2 blocks) on a small word
corpus, trained one step: the source the `topotorch sae` CLI tests read activations from."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_text_run(folder: Path) -> Path:
    """Write the corpus and the run under ``folder``; return the run folder. Usage: ``run = tiny_text_run(tmp)``."""
    from topotorch.training import TrainConfig, train

    words = ["war", "sword", "blood", "love", "rose", "kiss", "the", "and"]
    g = torch.Generator().manual_seed(0)
    corpus = folder / "corpus.txt"
    corpus.write_text(" ".join(words[i] for i in torch.randint(0, 8, (700,), generator=g).tolist()))
    vocab = len(set(corpus.read_text()))
    run = folder / "run"
    train(
        TrainConfig.for_task(
            f"text:{corpus}",
            method="none",
            steps=1,
            animation=False,
            progress=False,
            out=str(run),
            log_every=1,
            model="topotorch.models:TinyGPT",
            model_config=f"vocab={vocab},d_model=16,n_layers=2,n_heads=2,block_size=64",
        )
    )
    return run
