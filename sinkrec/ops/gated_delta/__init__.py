"""Gated delta rule, three tiers: `naive` (recurrent spec), `chunk` (PyTorch WY form), `fla` (GPU kernels)."""
