"""The formula a small thresholded network computes, as an exact sympy expression.

Weights with |w| <= threshold are dropped; neurons that feed no output are dropped; what is
left is written out layer by layer with the weights as exact float64 numbers, so the
expression *is* the thresholded network (checked by :func:`check_formula`, which evaluates
``sympy.lambdify`` of it in float64 against the network run in float64). SiLU is written
x·sigmoid(x) = x / (1 + e^(−x)).

    >>> f = network_formula(result.model, threshold=0.05, input_names=["x1", "x2", "x3", "x4"])
    >>> f.outputs[0].free_symbols  # {x1, x3}
    >>> f.latex(digits=3)[0]  # '0.912 \\frac{...}{...} + ...'
    >>> check_formula(f, result.model, x_test, threshold=0.05)  # max |difference|, e.g. 2e-15
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
import torch
from torch import nn

from topotorch.graph import zero_inactive_

_ACTIVATIONS = {
    nn.SiLU: lambda e: e / (1 + sp.exp(-e)),
    nn.ReLU: lambda e: sp.Max(0, e),
    nn.Tanh: sp.tanh,
    nn.Sigmoid: lambda e: 1 / (1 + sp.exp(-e)),
    nn.Identity: lambda e: e,
    nn.GELU: lambda e: e * (1 + sp.erf(e / sp.sqrt(2))) / 2,
}


@dataclass
class Formula:
    """Symbolic outputs of a network: ``outputs[k]`` is output k as a sympy expression of ``symbols``."""

    symbols: list[sp.Symbol]
    outputs: list[sp.Expr]
    output_names: list[str]
    active_neurons: int
    threshold: float
    hidden_sizes: list[int] = field(default_factory=list)

    def rounded(self, digits: int = 3) -> list[sp.Expr]:
        """The outputs with every number rounded to ``digits`` significant digits (for reading only)."""

        def rnd(e: sp.Expr) -> sp.Expr:
            return e.xreplace({n: sp.Float(float(f"{float(n):.{digits}g}"), digits) for n in e.atoms(sp.Float)})

        return [rnd(e) for e in self.outputs]

    def latex(self, digits: int | None = 3) -> list[str]:
        """LaTeX of each output (numbers rounded to ``digits`` significant digits; None: exact)."""
        exprs = self.outputs if digits is None else self.rounded(digits)
        return [sp.latex(e) for e in exprs]

    def python(self, digits: int | None = None, name: str = "f") -> str:
        """Source of a Python function ``name(x1, ..., xn)`` returning the outputs (uses ``math``).

        Exact by default; ``digits`` rounds the numbers for reading.
        """
        from sympy.printing.pycode import pycode

        exprs = self.outputs if digits is None else self.rounded(digits)
        args = ", ".join(str(s) for s in self.symbols)
        body = ",\n        ".join(pycode(e, fully_qualified_modules=True) for e in exprs)
        return f"import math\n\n\ndef {name}({args}):\n    return (\n        {body},\n    )\n"

    def to_dict(self, digits: int = 3) -> dict:
        return {
            "outputs": [
                {"name": n, "latex": lx, "text": str(r), "free_symbols": sorted(str(s) for s in e.free_symbols)}
                for n, lx, r, e in zip(self.output_names, self.latex(digits), self.rounded(digits), self.outputs)
            ],
            "active_neurons": self.active_neurons,
            "hidden_sizes": self.hidden_sizes,
            "threshold": self.threshold,
        }


def _layers(model: nn.Module) -> list[tuple[nn.Linear, nn.Module | None]]:
    """(linear, activation after it) pairs of a Sequential-style MLP, or ValueError."""
    leaves = [m for m in model.modules() if not list(m.children())]
    pairs: list[tuple[nn.Linear, nn.Module | None]] = []
    for m in leaves:
        if isinstance(m, nn.Linear):
            pairs.append((m, None))
        elif type(m) in _ACTIVATIONS and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], m)
        else:
            raise ValueError(
                f"formulas cover chains of nn.Linear and elementwise activations; cannot write {type(m).__name__}"
            )
    if not pairs:
        raise ValueError("the model has no nn.Linear layer")
    return pairs


def network_formula(
    model: nn.Module,
    threshold: float,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    max_neurons: int = 20,
) -> Formula:
    """The thresholded network as sympy expressions, one per output.

    ``max_neurons`` bounds the active hidden neurons (those on a path from an input to an
    output after thresholding); a bigger network raises ``ValueError`` (its formula would be
    unreadable). Usage: ``network_formula(load_run("runs/ind").model, 0.05).latex()``.
    """
    pairs = _layers(model)
    # thresholded in the weights' own dtype (the rule of graph.active_mask), then exact in float64
    ws = [
        zero_inactive_(lin.weight.detach().to("cpu", copy=True), threshold).to(torch.float64).numpy()
        for lin, _ in pairs
    ]
    bs = [
        (
            lin.bias.detach().to("cpu", torch.float64).numpy().copy()
            if lin.bias is not None
            else np.zeros(lin.out_features)
        )
        for lin, _ in pairs
    ]
    n_in, n_out = ws[0].shape[1], ws[-1].shape[0]
    names = list(input_names) if input_names is not None else [f"x{i + 1}" for i in range(n_in)]
    if len(names) != n_in:
        raise ValueError(f"{len(names)} input names for {n_in} inputs")
    outs = list(output_names) if output_names is not None else [f"y{i + 1}" for i in range(n_out)]
    # neurons needed by the outputs (backward), and reachable from the inputs (forward)
    needed = [np.ones(n_out, dtype=bool)] * (len(ws) + 1)  # the last is the outputs; each other one is set below
    for k in range(len(ws) - 1, -1, -1):
        needed[k] = (ws[k][needed[k + 1]] != 0).any(0)
    reach = np.ones(n_in, dtype=bool)
    hidden_sizes = []
    for k in range(len(ws) - 1):
        reach = (ws[k][:, reach] != 0).any(1)
        hidden_sizes.append(int((reach & needed[k + 1]).sum()))
    if sum(hidden_sizes) > max_neurons:
        raise ValueError(
            f"{sum(hidden_sizes)} active hidden neurons {hidden_sizes} at threshold {threshold}: more than "
            f"max_neurons={max_neurons}; raise the threshold or max_neurons"
        )
    symbols = [sp.Symbol(n) for n in names]
    h: list[sp.Expr] = list(symbols)
    for k, ((_lin, act), w, b) in enumerate(zip(pairs, ws, bs)):
        rows = np.nonzero(needed[k + 1])[0]
        z: list[sp.Expr] = [sp.Integer(0)] * w.shape[0]
        for i in rows:  # one expression per kept neuron: building symbols is inherently per neuron
            cols = np.nonzero(w[i])[0]
            z[i] = sp.Add(*[sp.Float(float(w[i, j]), 17) * h[j] for j in cols], sp.Float(float(b[i]), 17))
        f = _ACTIVATIONS[type(act)] if act is not None else (lambda e: e)
        h = [f(e) if needed[k + 1][i] else sp.Integer(0) for i, e in enumerate(z)]
    return Formula(symbols, h, outs, int(sum(hidden_sizes)), threshold, hidden_sizes)


@torch.no_grad()
def check_formula(formula: Formula, model: nn.Module, x: torch.Tensor, threshold: float | None = None) -> float:
    """Max |lambdify(formula)(x) − thresholded network(x)| over the samples and outputs, in float64.

    Usage: ``assert check_formula(f, model, data.x_test) < 1e-9``.
    """
    import copy

    thr = formula.threshold if threshold is None else threshold
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            zero_inactive_(m.weight, thr)
    net = net.to(torch.float64)
    xd = x.detach().to("cpu", torch.float64)
    want = net(xd).numpy()
    fn = sp.lambdify(formula.symbols, formula.outputs, modules="numpy")
    cols = [xd[:, i].numpy() for i in range(xd.shape[1])]
    got = np.stack([np.broadcast_to(np.asarray(v, dtype=np.float64), (len(xd),)) for v in fn(*cols)], 1)
    return float(np.abs(got - want).max())
