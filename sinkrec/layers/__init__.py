"""Sequence layers: the TDGD layer and its block; the ELASTIC block (their ops live in sinkrec/ops)."""
from sinkrec.layers.elastic import ElasticBlock, LinearDispatcherAttention
from sinkrec.layers.tdgd import TDGD, SinkRecBlock

__all__ = ["TDGD", "ElasticBlock", "LinearDispatcherAttention", "SinkRecBlock"]
