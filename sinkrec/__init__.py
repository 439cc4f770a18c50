"""SinkRec: memory-conditioned Gated DeltaNet for long user-behaviour sequences."""
