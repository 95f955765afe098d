"""Backends that carry the outer exchange. The algorithm talks to a `Group` only."""

from dilo.comm.protocol import ExchangeResult, GlobalState, Group, SharedState, SoloGroup
from dilo.comm.two_phase import two_phase_average

__all__ = ["ExchangeResult", "GlobalState", "Group", "SharedState", "SoloGroup", "two_phase_average"]
