"""Building blocks: norms, short causal convolution, RVQ conditional memory."""
from sinkrec.modules.conv import ShortConv
from sinkrec.modules.norms import RMSNorm, SwiGLU, l2norm
from sinkrec.modules.rvq import RVQMemory, rvq_encode

__all__ = ["RMSNorm", "RVQMemory", "ShortConv", "SwiGLU", "l2norm", "rvq_encode"]
