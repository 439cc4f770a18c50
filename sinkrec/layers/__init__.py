"""Sequence layers: the TDGD layer, its block, and the fused gate math."""
from sinkrec.layers.tdgd import TDGD, SinkRecBlock

__all__ = ["TDGD", "SinkRecBlock"]
