"""Building blocks: norms, short causal convolution, RVQ conditional memory, product-key memory."""
from sinkrec.modules.conv import ShortConv
from sinkrec.modules.norms import RMSNorm, SwiGLU, l2norm
from sinkrec.modules.product_key import ProductKeyMemory
from sinkrec.modules.rvq import RVQMemory, rvq_encode

__all__ = ["ProductKeyMemory", "RMSNorm", "RVQMemory", "ShortConv", "SwiGLU", "l2norm", "rvq_encode"]
