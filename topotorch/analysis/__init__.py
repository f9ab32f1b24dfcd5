"""What a trained network is: active structure (`structure`), communities and Q (`modularity`),
knock-outs (`ablation`), exact formulas (`formulas`), cortical maps (`maps`), concept localisation (`localize`)."""

from .structure import (  # noqa: F401  (the core API, importable from the package)
    active_neurons,
    active_weights,
    describe_group,
    modules,
    neuron_activity,
    thresholded,
)
