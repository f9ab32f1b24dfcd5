"""Cashing structure in: compact MLP runtime (`compact`), exact shrinking through the coupling graph (`shrink`),
topographic downsampling (`topographic`), image-codec storage (`codec`), pruning baselines (`pruning`) and the
accuracy-vs-sparsity sweep (`sweep`)."""
