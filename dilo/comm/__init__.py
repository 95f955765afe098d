"""Backends that carry the outer exchange. The algorithm talks to a `Group` only."""

from dilo.comm.protocol import ExchangeResult, Group, SoloGroup, two_phase_average

__all__ = ["ExchangeResult", "Group", "SoloGroup", "two_phase_average"]
