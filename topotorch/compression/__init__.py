"""Cashing structure in: compact MLP runtime (`compact`), exact shrinking through the coupling graph (`shrink`),
topographic downsampling (`topographic`), image-codec storage (`codec`) and pruning masks (`pruning`). Everything
here works on models and never imports the trainer; what trains or reads run folders (the accuracy-vs-sparsity
sweep, retraining baselines, compressing a run folder) is in `topotorch.experiments`."""
