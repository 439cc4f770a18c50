"""Sequence layers: the TDGD layer, its block, and the fused gate math; the ELASTIC block."""
from sinkrec.layers.elastic import ElasticBlock, LinearDispatcherAttention
from sinkrec.layers.tdgd import TDGD, SinkRecBlock

__all__ = ["TDGD", "ElasticBlock", "LinearDispatcherAttention", "SinkRecBlock"]
