"""Workflows that train or read run folders, a floor above :mod:`topotorch.training`.

The layers, lowest first: ``graph`` (the coupling graph) → ``objectives`` / ``relocation`` →
``analysis`` / ``compression`` (work on models) → ``training`` (runs) → ``experiments`` (this package:
sweeps, retraining baselines, compressing a run folder) → ``cli`` / ``report``. A floor imports only
the floors below it (``tests/test_layering.py`` checks the ones that matter), so compression can be
used — and tested — without the trainer.

* :mod:`~topotorch.experiments.sweep` — accuracy vs sparsity, BIMT/L1 against the pruning baselines;
* :mod:`~topotorch.experiments.retrain` — masked fine-tuning, lottery tickets, sparse model soups;
* :mod:`~topotorch.experiments.compress` — compact / shrink a run folder and write its report.
"""
