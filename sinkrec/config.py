"""SinkRecConfig: every model hyper-parameter and its check, in one place. The model (sinkrec.model)
and its layers (sinkrec.layers) are built from it; LightningCLI reads it as `model.config.*`."""
from __future__ import annotations

from dataclasses import dataclass

from sinkrec.ops import FUSED_GATES_BACKENDS, GATED_DELTA_BACKENDS, SHORT_CONV_BACKENDS

ARCHS = ("sinkrec", "gdn", "sasrec", "elastic")


@dataclass
class SinkRecConfig:
    num_items: int = 0  # N: item ids are 1..N, 0 is padding (linked from the data module)
    arch: str = "sinkrec"  # "sinkrec" | "gdn" (= sinkrec with memory off) | "sasrec" | "elastic"
    d_model: int = 64  # hidden width D, also the item-embedding width (tied head)
    n_heads: int = 2  # heads H; head dims K = V = d_model // n_heads
    n_blocks: int = 2  # distinct blocks (weights); SASRec: number of attention layers
    n_loops: int = 2  # passes over the blocks with shared weights (SinkRec/GDN; 1 = no looping)
    max_len: int | None = 200  # SASRec only: learned positions (longest sequence it accepts); None: whole
    # histories, for the recurrent archs only
    dropout: float = 0.1  # on residual updates and (SASRec) on attention probabilities / input
    memory: bool = True  # RVQ conditional memory; False = plain Gated DeltaNet blocks
    purify_write: bool = True  # write beta*(1 - rho) and v - rho*vm instead of beta and v
    diff_read: bool = True  # read with q - lam*km instead of q
    temporal: bool = True  # time gaps enter the decay and write gates
    n_levels: int = 2  # RVQ levels
    n_codes: int = 256  # codes per RVQ level
    commit_weight: float = 0.25  # weight of the RVQ commitment loss in aux_loss
    # weight of the coverage supervision in aux_loss: BCE between rho_t and "this position's RVQ code
    # tuple already occurred earlier in the sequence" (a recurring local pattern). 0 = the spec's rho,
    # learned by the task loss alone (docs/MODEL.md, docs/STUDY.md: it stays at its init there)
    coverage_weight: float = 0.0
    # what rho is supervised towards: "codes" = the position's RVQ code tuple recurs (the memory's own
    # notion of a recurring pattern) | "items" = the position's item already occurred earlier in the
    # sequence (a repeat consumption; docs/MODEL.md)
    coverage_target: str = "codes"
    # rho also sees whether the position's item already occurred earlier in the sequence:
    # rho = sigmoid(s_rho <k, km> + b_rho + c_rep * repeat_t), c_rep per head, init 0 (= the spec at
    # init). The spec's rho is a function of the position's own key and memory key, which cannot tell
    # a repeat from a first occurrence (docs/MODEL.md). Whole sequences only (no windows / streaming)
    repeat_gate: bool = False
    # b_rho at init (per head): rho = sigmoid(s_rho <k, km> + b_rho) starts near sigmoid(b_rho). -2 (rho ~ .12)
    # starts the memory shut; 0 starts it half open, so the task loss decides whether to close it
    rho_bias_init: float = -2.0
    ema_decay: float = 0.99  # EMA decay of the codebook statistics
    time_scale: float = 3600.0  # seconds; phi = log1p(dt / time_scale)
    conv_size: int = 4  # short causal conv kernel (q/k/v) and local-pattern window of the memory
    loss: str = "full"  # "full" softmax over all items | "sampled" (shared uniform negatives)
    num_negatives: int = 256  # uniform negatives the batch shares, for loss="sampled"
    in_batch_negatives: bool = False  # loss="sampled": also the batch's targets as negatives (logQ-corrected)
    # loss="sampled": every target draws its own num_negatives (HSTU's sampler) instead of one set the
    # batch shares; P x U distinct negatives per step for the same FLOPs
    per_position_negatives: bool = False
    temperature: float = 1.0  # logits are divided by it (training loss only; ranking is unaffected)
    l2_norm: bool = False  # score with unit-norm query and item vectors (cosine); HSTU's recipe
    kernel_backend: str = "auto"  # delta-rule backend: "auto" | "chunk" | "cpp" | "recurrent" | "fla"
    gate_backend: str = "auto"  # fused gates: "reference" | "compile" | "triton" | "cpp" | "auto"
    conv_backend: str = "auto"  # short convs (TDGD q/k/v, RVQ pattern): "reference" | "channels_last" | "cpp" | "auto"
    init_std: float = 0.02  # std of the item / position / loop embeddings
    input_norm: bool = True  # RMSNorm the input embeddings (the tied table stays small for the head)
    # ELASTIC only (../shared/ELASTIC.md); n_blocks, n_heads, dropout apply, n_loops / max_len do not
    n_dispatchers: int = 32  # J interest experts per LDA layer and head (streaming state J x (K + 2))
    n_mem_keys: int = 128  # half-keys per product-key sub-bank; the interest memory has n_mem_keys^2 slots
    mem_topk: int = 8  # m: memory slots read per position (softmax over their scores)

    def validate(self) -> SinkRecConfig:
        if self.arch not in ARCHS:
            raise ValueError(f"SinkRecConfig.arch={self.arch!r} must be one of {ARCHS}")
        if self.num_items < 1:
            raise ValueError(f"SinkRecConfig.num_items={self.num_items} must be >= 1 (link it from the data)")
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"SinkRecConfig.loss={self.loss!r} must be 'full' or 'sampled'")
        if self.temperature <= 0 or self.num_negatives < 1:
            raise ValueError(f"SinkRecConfig: temperature={self.temperature} and num_negatives="
                             f"{self.num_negatives} must be > 0")
        if self.arch == "sasrec" and (self.max_len is None or self.max_len < 1):
            raise ValueError(f"SinkRecConfig.max_len={self.max_len}: SASRec learns one position per event and "
                             "needs a window (data.max_len, e.g. 200); whole histories (null) are for the "
                             "recurrent archs sinkrec, gdn and elastic")
        if self.d_model % self.n_heads:
            raise ValueError(f"SinkRecConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.kernel_backend not in GATED_DELTA_BACKENDS:
            raise ValueError(f"SinkRecConfig.kernel_backend={self.kernel_backend!r} must be one of "
                             f"{GATED_DELTA_BACKENDS}")
        if self.gate_backend not in FUSED_GATES_BACKENDS:
            raise ValueError(f"SinkRecConfig.gate_backend={self.gate_backend!r} must be one of "
                             f"{FUSED_GATES_BACKENDS}")
        if self.conv_backend not in SHORT_CONV_BACKENDS:
            raise ValueError(f"SinkRecConfig.conv_backend={self.conv_backend!r} must be one of "
                             f"{SHORT_CONV_BACKENDS}")
        if self.per_position_negatives and self.in_batch_negatives:
            raise ValueError("SinkRecConfig: per_position_negatives and in_batch_negatives are two different "
                             "samplers; set one of them")
        if self.coverage_weight < 0:
            raise ValueError(f"SinkRecConfig.coverage_weight={self.coverage_weight} must be >= 0")
        if self.repeat_gate and not (self.memory and self.arch == "sinkrec"):
            raise ValueError(f"SinkRecConfig.repeat_gate=True acts on the memory coverage rho: it needs "
                             f"arch 'sinkrec' with memory=True (got arch={self.arch!r}, memory={self.memory})")
        if self.repeat_gate and self.gate_backend == "triton":
            raise ValueError("SinkRecConfig.repeat_gate=True is not implemented in the triton gate kernel; "
                             "set gate_backend 'reference', 'compile', 'cpp' or 'auto'")
        if self.coverage_target not in ("codes", "items"):
            raise ValueError(f"SinkRecConfig.coverage_target={self.coverage_target!r} must be 'codes' (the RVQ "
                             "code tuple recurs) or 'items' (the item recurs)")
        if self.n_loops < 1 or self.n_blocks < 1:
            raise ValueError(f"SinkRecConfig: n_blocks={self.n_blocks} and n_loops={self.n_loops} must be >= 1")
        if self.arch == "elastic":
            if self.n_dispatchers < 1 or self.n_mem_keys < 1 or self.d_model % 2:
                raise ValueError(f"SinkRecConfig (elastic): n_dispatchers={self.n_dispatchers} and n_mem_keys="
                                 f"{self.n_mem_keys} must be >= 1 and d_model={self.d_model} even")
            if not 1 <= self.mem_topk <= self.n_mem_keys ** 2:
                raise ValueError(f"SinkRecConfig.mem_topk={self.mem_topk} must be in [1, n_mem_keys^2 = "
                                 f"{self.n_mem_keys ** 2}]")
        return self
