"""Training objectives that act on a network's body: wiring cost (BIMT)."""

from .wiring import WiringConfig, wiring_cost, connection_costs

__all__ = ["WiringConfig", "wiring_cost", "connection_costs"]
