"""Training objectives that act on a network's body: wiring cost (BIMT), TopoLoss (TopoNets)."""

from topotorch.objectives.topoloss import TauSchedule, TopoLoss
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, connection_costs, wiring_cost

__all__ = ["TauSchedule", "TopoLoss", "WiringConfig", "add_wiring_grad_", "connection_costs", "wiring_cost"]
