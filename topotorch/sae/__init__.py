"""Sparse dictionaries: SAEs and (skip-)transcoders (TopK + AuxK, BatchTopK, JumpReLU, ReLU + L1), their fast
sparse kernels, training, metrics and a synthetic ground-truth benchmark (issue 17; the seam: SAE_API.md).

    >>> from topotorch.sae import SAEConfig, SparseCoder, train_sae, evaluate_sae
    >>> sae, history = train_sae(SAEConfig(d_in=64, n_latents=512, k=8), batches, steps=1000)
"""

from topotorch.sae.dictionary import (
    ARCHITECTURES,
    Architecture,
    Codes,
    JumpReLUFn,
    SAEConfig,
    SAEOutput,
    SparseCoder,
    StepFn,
    register_architecture,
)
from topotorch.sae.kernels import pre_activations, selected_encode, sparse_decode, topk_encode
from topotorch.sae.metrics import cosine, evaluate_sae, explained_variance, fvu, l0, relative_reconstruction_bias
from topotorch.sae.synthetic import SyntheticFeatures, mcc
from topotorch.sae.train import SAETrainer, geometric_median, train_sae

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Codes",
    "JumpReLUFn",
    "SAEConfig",
    "SAEOutput",
    "SparseCoder",
    "StepFn",
    "register_architecture",
    "pre_activations",
    "selected_encode",
    "sparse_decode",
    "topk_encode",
    "cosine",
    "evaluate_sae",
    "explained_variance",
    "fvu",
    "l0",
    "relative_reconstruction_bias",
    "SyntheticFeatures",
    "mcc",
    "SAETrainer",
    "geometric_median",
    "train_sae",
]
