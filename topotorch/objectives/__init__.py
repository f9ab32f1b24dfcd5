"""Training objectives that act on a network's body: wiring cost (BIMT), TopoLoss (TopoNets), neuron group lasso."""

from topotorch.objectives.group import group_spaces, neuron_group_norm, neuron_group_sq
from topotorch.objectives.topoloss import TauSchedule, TopoLoss
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, connection_costs, wiring_cost

__all__ = [
    "TauSchedule",
    "TopoLoss",
    "WiringConfig",
    "add_wiring_grad_",
    "connection_costs",
    "group_spaces",
    "neuron_group_norm",
    "neuron_group_sq",
    "wiring_cost",
]
