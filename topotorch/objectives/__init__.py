"""Training objectives that act on a network's body: wiring cost (BIMT)."""

from .wiring import WiringConfig, add_wiring_grad_, connection_costs, wiring_cost

__all__ = ["WiringConfig", "add_wiring_grad_", "connection_costs", "wiring_cost"]
