"""Parity, state-carry, gradient and memory tests for `sinkrec.ops.gated_delta_rule` (CPU).

The outside oracle is fla's own PyTorch reference `naive_recurrent_gated_delta_rule`, loaded from
its file so that neither fla/__init__ nor Triton is executed (fla's kernels cannot run on CPU).
"""

from __future__ import annotations

import importlib.util
import itertools
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sinkrec.ops.gated_delta.chunk as chunk_mod
from sinkrec.ops import gated_delta_rule
from sinkrec.ops.gated_delta import cpp_available, resolve_backend

TOL = 1e-4  # relative RMS error, float32


def _load_fla_naive():
    spec = importlib.util.find_spec("fla")  # locates the package without executing fla/__init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "gated_delta_rule" / "naive.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("_fla_gated_delta_naive", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.naive_recurrent_gated_delta_rule


fla_naive = _load_fla_naive()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tests run thousands of tiny ops; on a shared, oversubscribed CPU the intra-op thread
    # barrier of each one costs more than the op (T=500 recurrent: ~1 s alone, ~25 s contended)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, params=["affine-walk", "three-op-walk"])
def _state_walk(request, monkeypatch):
    # every test runs under both of the chunk kernel's state walks (chunk_mod._affine_walk picks one
    # by the rows per step; here each is forced on every shape)
    monkeypatch.setattr(chunk_mod, "AFFINE_WALK_MAX_ROWS", 10**9 if request.param == "affine-walk" else 0)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (
        (x.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp_min(1e-30)
    ).item()


def make_inputs(B, T, H, K, V, seed=0, dtype=torch.float32):
    """Gated DeltaNet-like inputs: unit-norm q/k, decays in (0, 1), write strengths in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    h0 = torch.randn(B, H, K, V, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g, beta, h0)]


def run_with_grads(fn, inputs, do, dht):
    """Forward `fn(q, k, v, g, beta, h0) -> (o, ht)`, backward with random upstream grads on both.

    Returns [o, ht, dq, dk, dv, dg, dbeta, dh0].
    """
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    o, ht = fn(*xs)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return [o.detach(), ht.detach()] + [x.grad for x in xs]


def ours(backend, **kw):
    def fn(q, k, v, g, beta, h0):
        return gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend, **kw
        )

    return fn


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
SHAPES = [  # (B, T, H, K, V): lengths around multiples of the chunk size (32), K != V in both directions
    (2, 1, 2, 16, 16),
    (2, 63, 2, 16, 32),
    (1, 64, 3, 32, 16),
    (3, 65, 1, 8, 8),
    (1, 500, 2, 32, 24),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}".format(*s))
def test_chunk_matches_recurrent(shape):
    inputs = make_inputs(*shape, seed=sum(shape))
    B, T, H, K, V = shape
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    ref = run_with_grads(ours("recurrent"), inputs, do, dht)
    got = run_with_grads(ours("chunk"), inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


def test_chunk_matches_recurrent_without_state():
    # the training call: no initial state, no final state, the loss reads o only
    q, k, v, g, beta, _ = make_inputs(2, 130, 2, 16, 8, seed=2)
    do = torch.randn(2, 130, 2, 8)
    res = {}
    for backend in ("recurrent", "chunk"):
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        o, ht = gated_delta_rule(*xs, backend=backend)
        assert ht is None
        (o * do).sum().backward()
        res[backend] = [o.detach()] + [x.grad for x in xs]
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], res["chunk"], res["recurrent"]):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


def test_unit_lower_inverse_matches_triangular_solve():
    gen = torch.Generator().manual_seed(31)
    k = F.normalize(torch.randn(3, 64, 32, generator=gen), dim=-1)
    A = torch.rand(3, 64, 1, generator=gen) * (
        k @ k.mT
    )  # beta_i k_i . k_j, full matrix: upper must be ignored
    ref = torch.linalg.solve_triangular(A, torch.eye(64), upper=False, unitriangular=True)
    assert rel_rms(chunk_mod._unit_lower_inverse(A), ref) <= 1e-6


def test_chunk_matches_recurrent_across_groups(monkeypatch):
    # one chunk-head per batched group: every group boundary is also a state hand-off in both walks
    monkeypatch.setattr(chunk_mod, "GROUP_CHUNK_HEADS", 1)
    inputs = make_inputs(2, 200, 2, 16, 8, seed=3)
    do, dht = torch.randn(2, 200, 2, 8), torch.randn(2, 2, 16, 8)
    ref = run_with_grads(ours("recurrent"), inputs, do, dht)
    got = run_with_grads(ours("chunk"), inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


@pytest.mark.skipif(fla_naive is None, reason="fla-core is not installed")
@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
@pytest.mark.parametrize("shape", [(2, 75, 2, 16, 32), (1, 130, 1, 32, 16)], ids=str)
def test_matches_fla_reference(backend, shape):
    inputs = make_inputs(*shape, seed=7)
    B, T, H, K, V = shape
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)

    def fla_fn(q, k, v, g, beta, h0):  # note fla's argument order: beta before g
        return fla_naive(q, k, v, beta, g, initial_state=h0, output_final_state=True)

    ref = run_with_grads(fla_fn, inputs, do, dht)
    got = run_with_grads(ours(backend), inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert rel_rms(a, b) <= TOL, f"{backend} {name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_two_pieces_with_carried_state_equal_one_pass(backend):
    B, T, H, K, V = 2, 150, 2, 16, 8
    inputs = make_inputs(B, T, H, K, V, seed=11)
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    cut = 70  # neither piece is a multiple of the chunk size

    def two_pieces(q, k, v, g, beta, h0):
        xs = (q, k, v, g, beta)
        o1, h1 = gated_delta_rule(
            *(x[:, :cut] for x in xs), initial_state=h0, output_final_state=True, backend=backend
        )
        o2, h2 = gated_delta_rule(
            *(x[:, cut:] for x in xs), initial_state=h1, output_final_state=True, backend=backend
        )
        return torch.cat([o1, o2], dim=1), h2

    ref = run_with_grads(ours(backend), inputs, do, dht)
    got = run_with_grads(two_pieces, inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


def test_streaming_one_event_at_a_time_equals_chunk_pass():
    B, T, H, K, V = 2, 20, 2, 8, 8
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, seed=5)
    o_ref, h_ref = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="chunk"
    )
    h, outs = h0, []
    for t in range(T):  # backend="auto" with T=1 is the recurrent step
        o_t, h = gated_delta_rule(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            beta[:, t : t + 1],
            initial_state=h,
            output_final_state=True,
        )
        outs.append(o_t)
    assert rel_rms(torch.cat(outs, dim=1), o_ref) <= TOL
    assert rel_rms(h, h_ref) <= TOL


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_pad_positions_leave_state_unchanged(backend):
    B, T, H, K, V = 2, 90, 2, 8, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, seed=13)
    o_ref, h_ref = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend
    )
    # insert pads (g = 0, beta = 0, but arbitrary q/k/v as a model would produce) inside and at the end
    pad = torch.zeros(T + 40, dtype=torch.bool)
    pad[[0, 5, 6, 7, 40, 63, 64]] = True
    pad[-33:] = True
    real = ~pad
    n_pad = int(pad.sum())
    fill = make_inputs(B, n_pad, H, K, V, seed=17)

    def with_pads(x, filler):
        out = x.new_empty(B, T + 40, *x.shape[2:])
        out[:, real], out[:, pad] = x, filler
        return out

    padded = [with_pads(x, f) for x, f in zip((q, k, v), fill[:3])]
    padded += [with_pads(g, torch.zeros(B, n_pad, H)), with_pads(beta, torch.zeros(B, n_pad, H))]
    o, h = gated_delta_rule(*padded, initial_state=h0, output_final_state=True, backend=backend)
    assert rel_rms(h, h_ref) <= TOL
    assert rel_rms(o[:, real], o_ref) <= TOL


def test_chunk_function_gradcheck_float64(monkeypatch):
    # chunk size 4 on T=9: padding, three chunks, and (one chunk-head per group) group hand-offs,
    # all small enough for finite differences on every input element
    monkeypatch.setattr(chunk_mod, "CHUNK_SIZE", 4)
    monkeypatch.setattr(chunk_mod, "GROUP_CHUNK_HEADS", 1)
    q, k, v, g, beta, h0 = (
        x.requires_grad_() for x in make_inputs(1, 9, 1, 3, 2, seed=19, dtype=torch.float64)
    )

    def fn(q, k, v, g, beta, h0):
        return chunk_mod.ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, 0.7, h0)

    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, h0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float64_stays_float64_and_bf16_returns_bf16():
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 8, 8, seed=23, dtype=torch.float64)
    o, h = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="chunk")
    o_ref, h_ref = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="recurrent"
    )
    assert o.dtype == h.dtype == torch.float64
    assert rel_rms(o, o_ref) <= 1e-10 and rel_rms(h, h_ref) <= 1e-10

    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    o, h = gated_delta_rule(qb, kb, vb, g.float(), beta.float(), output_final_state=True, backend="chunk")
    o_ref, _ = gated_delta_rule(
        qb.float(), kb.float(), vb.float(), g.float(), beta.float(), backend="recurrent"
    )
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32  # state kept at full precision
    assert rel_rms(o, o_ref) <= 1e-2  # only the bf16 rounding of the output


class _LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create inside the mode while Python holds them."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # data_ptr -> [n live tensors, nbytes]
        self.live = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in self.refs:
                    self.refs[ptr][0] += 1
                else:
                    self.refs[ptr] = [1, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, ptr)
        return out


def _chunk_backward_memory(T: int, H: int, K: int, V: int) -> tuple[int, int, int, int]:
    """(bytes saved for backward, bytes of the kept per-group factors, peak live bytes during
    backward, input bytes) at B=1."""
    xs = [x.requires_grad_() for x in make_inputs(1, T, H, K, V, seed=29)[:5]]
    o, _ = gated_delta_rule(*xs, backend="chunk")
    saved = sum(t.nbytes for t in o.grad_fn.saved_tensors)
    factors = sum(t.nbytes for group in (o.grad_fn.factors or []) for t in group)
    do = torch.randn_like(o)
    with _LiveStorageBytes() as mem:
        o.backward(do)
    return saved, factors, mem.peak, sum(x.nbytes for x in xs)


@pytest.mark.parametrize("save_factors", [True, False])
def test_chunk_backward_memory_is_linear_in_T(monkeypatch, save_factors):
    monkeypatch.setattr(chunk_mod, "SAVE_FACTORS", save_factors)
    H, K, V = 2, 16, 16
    C = chunk_mod.CHUNK_SIZE
    # both lengths hold whole groups of chunks, so the per-group temporaries are the same size
    small = C * max(1, chunk_mod.GROUP_CHUNK_HEADS // H)
    large = 4 * small
    _, factors_s, peak_s, in_s = _chunk_backward_memory(small, H, K, V)
    saved_l, factors_l, peak_l, in_l = _chunk_backward_memory(large, H, K, V)
    # the inputs (in chunk layout; `large` needs no padding) and the chunk-boundary states
    # [N+1, B*H, K, V] are saved
    n_chunks = large // C
    assert saved_l <= in_l + (n_chunks + 1) * H * K * V * 4
    if save_factors:
        # and each group's factors: M, [A ; P], (I + A)^{-1} (4 C x C), [beta K ; Q], qg, kd (4 C x K)
        # and W (C x (V + K)) per chunk-head: a constant per token, linear in T
        assert factors_l == 4 * factors_s == large * H * (4 * C + 5 * K + V) * 4, (factors_s, factors_l)
    else:
        assert factors_s == factors_l == 0
    # the peak grows linearly in T, and by a few copies of the inputs (chunk layout, grads), not by
    # per-chunk C x C / C x K temporaries for every chunk at once (that would be >10x the inputs here)
    assert peak_l <= 4.5 * peak_s, (peak_s, peak_l)
    assert peak_l - peak_s <= 6 * (in_l - in_s), (peak_l - peak_s, in_l - in_s)


def test_saved_and_recomputed_factors_give_the_same_gradients(monkeypatch):
    inputs = make_inputs(2, 200, 2, 16, 8, seed=5)
    do, dht = torch.randn(2, 200, 2, 8), torch.randn(2, 2, 16, 8)
    res = {}
    for save in (True, False):
        monkeypatch.setattr(chunk_mod, "SAVE_FACTORS", save)
        res[save] = run_with_grads(ours("chunk"), inputs, do, dht)
    for name, a, b in zip(NAMES, res[True], res[False]):  # the same ops on the same inputs
        assert rel_rms(a, b) <= 1e-6, f"{name}: rel RMS {rel_rms(a, b):.2e}"


def test_resolve_backend_auto_on_cpu():
    q = torch.zeros(1, 1, 1, 4)
    assert resolve_backend("auto", q) == "recurrent"  # one streaming step: no 64-chunk padding
    assert resolve_backend("auto", torch.zeros(1, 2, 1, 4)) == "chunk"  # K = 4: not a cpp size
    assert resolve_backend("recurrent", torch.zeros(1, 2, 1, 4)) == "recurrent"


def test_fla_backend_on_cpu_fails_clearly():
    q, k, v, g, beta, _ = make_inputs(1, 4, 1, 4, 4)
    with pytest.raises(RuntimeError, match="CUDA"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(k=a["k"][..., :3]), "k must match q"),
        (lambda a: a.update(q=a["q"][0]), r"q must be \[B, T, H, K\]"),
        (lambda a: a.update(v=a["v"][:, :3]), r"v must be \[B, T, H, V\]"),
        (lambda a: a.update(g=a["g"][..., None]), r"g must be \[B, T, H\]"),
        (lambda a: a.update(beta=a["beta"][:, :2]), r"beta must be \[B, T, H\]"),
        (lambda a: a.update(initial_state=a["initial_state"].transpose(-1, -2)), "initial_state must be"),
        (lambda a: a.update(v=a["v"].double()), "share a dtype"),
        (lambda a: a.update(beta=a["beta"].long()), "floating-point"),
        (lambda a: a.update(backend="triton"), "backend='triton' is not one of"),
    ],
)
def test_input_checks(mutate, match):
    q, k, v, g, beta, h0 = make_inputs(2, 5, 2, 4, 6)
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0}
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        gated_delta_rule(**args)


# ---- packed sequences (cu_seqlens, fla's convention) ----
# lengths around multiples of the chunk size (32), length-1 sequences, and an empty one
PACKED_LENGTHS = [1, 63, 64, 65, 1, 0, 130, 7]


def _packed_inputs(lengths, H=2, K=16, V=32, seed=41):
    """B = 1 packed inputs [1, sum(lengths), H, *], per-sequence initial states [N, H, K, V], cu_seqlens."""
    q, k, v, g, beta, _ = make_inputs(1, sum(lengths), H, K, V, seed=seed)
    h0 = torch.randn(len(lengths), H, K, V, generator=torch.Generator().manual_seed(seed + 1))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [q, k, v, g, beta, h0], cu


def _one_by_one(cu, backend):
    """Each packed sequence run on its own (B = 1, its own initial state), outputs concatenated."""

    def fn(q, k, v, g, beta, h0):
        bounds = cu.tolist()
        outs, finals = [], []
        for i, (bos, eos) in enumerate(itertools.pairwise(bounds)):
            o, ht = gated_delta_rule(*(x[:, bos:eos] for x in (q, k, v, g, beta)), initial_state=h0[i : i + 1],
                                     output_final_state=True, backend=backend)
            outs.append(o)
            finals.append(ht)
        return torch.cat(outs, dim=1), torch.cat(finals)

    return fn


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_packed_equals_each_sequence_alone(backend):
    inputs, cu = _packed_inputs(PACKED_LENGTHS)
    T, H, V = inputs[2].shape[1:]
    K = inputs[0].shape[-1]
    do, dht = torch.randn(1, T, H, V), torch.randn(len(PACKED_LENGTHS), H, K, V)
    ref = run_with_grads(_one_by_one(cu, "recurrent"), inputs, do, dht)
    got = run_with_grads(ours(backend, cu_seqlens=cu), inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"
    # the empty sequence keeps its initial state, and passes its gradient straight back
    empty = PACKED_LENGTHS.index(0)
    assert torch.equal(got[1][empty], inputs[5][empty]) and torch.equal(got[7][empty], dht[empty])


def test_packed_chunk_matches_recurrent_without_state_across_groups(monkeypatch):
    # the training call (no initial / final state), one chunk-head per group so that every
    # sequence boundary is also a group boundary in both walks; int64 offsets
    monkeypatch.setattr(chunk_mod, "GROUP_CHUNK_HEADS", 1)
    lengths = [70, 1, 64, 129, 3]
    (q, k, v, g, beta, _), cu = _packed_inputs(lengths, H=2, K=8, V=8, seed=43)
    do = torch.randn(1, sum(lengths), 2, 8)
    res = {}
    for backend in ("recurrent", "chunk"):
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        o, ht = gated_delta_rule(*xs, cu_seqlens=cu.long(), backend=backend)
        assert ht is None
        (o * do).sum().backward()
        res[backend] = [o.detach()] + [x.grad for x in xs]
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], res["chunk"], res["recurrent"]):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


def test_packed_state_does_not_cross_a_boundary():
    # the second sequence's outputs do not depend on the first sequence's inputs at all
    (q, k, v, g, beta, _), cu = _packed_inputs([50, 30], H=1, K=8, V=8, seed=47)
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    o, _ = gated_delta_rule(*xs, cu_seqlens=cu, backend="chunk")
    o[:, 50:].sum().backward()
    for name, x in zip(["q", "k", "v", "g", "beta"], xs):
        assert x.grad[:, :50].abs().max() == 0, name


def test_packed_chunk_function_gradcheck_float64(monkeypatch):
    # chunk size 4: sequences of 1, 5 (two chunks, one padded), 0 and 4 positions
    monkeypatch.setattr(chunk_mod, "CHUNK_SIZE", 4)
    monkeypatch.setattr(chunk_mod, "GROUP_CHUNK_HEADS", 1)
    lengths = [1, 5, 0, 4]
    inputs, cu = _packed_inputs(lengths, H=1, K=3, V=2, seed=53)
    q, k, v, g, beta, h0 = (x.double().requires_grad_() for x in inputs)

    def fn(q, k, v, g, beta, h0):
        return chunk_mod.ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, 0.7, h0, cu)

    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, h0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_packed_chunk_saves_memory_linear_in_tokens():
    # one long and many short sequences: what the forward keeps for backward is bounded by the
    # tokens plus at most one chunk of padding per sequence, not N x the longest length
    lengths = [2000] + [10] * 20
    xs, cu = _packed_inputs(lengths, H=2, K=16, V=16, seed=59)
    xs = [x.requires_grad_() for x in xs[:5]]
    o, _ = gated_delta_rule(*xs, cu_seqlens=cu, backend="chunk")
    saved = sum(t.nbytes for t in o.grad_fn.saved_tensors)
    C = chunk_mod.CHUNK_SIZE
    slots = sum(-(-n // C) * C for n in lengths)  # 2048 + 20 * 64 = 3328 positions in chunk layout
    per_slot = 2 * (2 * 16 + 16 + 2) * 4  # H * (q, k, v, gamma, beta) float32
    n_chunks = slots // C
    assert saved <= slots * per_slot + n_chunks * 2 * 16 * 16 * 4
    assert slots < 0.2 * len(lengths) * 2048  # ... which is far below padding every sequence to the longest


@pytest.mark.parametrize(
    "cu, B, match",
    [
        ([1, 3, 10], 1, r"cu_seqlens must start at 0 and end at T = 10"),
        ([0, 3, 9], 1, r"cu_seqlens must start at 0 and end at T = 10.*cu_seqlens\[-1\] = 9"),
        ([0, 6, 3, 10], 1, r"non-decreasing.*cu_seqlens\[1\] = 6 > cu_seqlens\[2\] = 3"),
        ([0, 5, 10], 2, r"B must be 1, got B = 2"),
        ([[0, 5, 10]], 1, r"1-D \[N \+ 1\]"),
        ([0.0, 5.0, 10.0], 1, "int32 or int64"),
    ],
)
def test_cu_seqlens_checks(cu, B, match):
    q, k, v, g, beta, _ = make_inputs(B, 10, 2, 4, 6)
    cu = torch.tensor(cu, dtype=torch.float32 if isinstance(cu[0], float) else torch.int64)
    with pytest.raises((ValueError, TypeError), match=match):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)


def test_cu_seqlens_initial_state_is_one_per_sequence():
    q, k, v, g, beta, h0 = make_inputs(1, 10, 2, 4, 6)  # h0: [1, H, K, V], but there are 3 sequences
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\] = \(3, 2, 4, 6\)"):
        gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=torch.tensor([0, 2, 5, 10]))


# ---- the C++ chunk kernel (backend "cpp"): every contract of the chunk op, against the recurrent reference
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ gated delta rule does not build here")
CPP_SHAPES = [  # (B, T, H, K, V), K = V in the instantiated sizes, lengths around multiples of 32
    (2, 1, 2, 16, 16),
    (2, 63, 2, 16, 16),
    (1, 64, 3, 32, 32),
    (3, 65, 1, 64, 64),
    (1, 300, 2, 32, 32),
    (1, 40, 1, 128, 128),
]


@needs_cpp
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}".format(*s))
def test_cpp_matches_recurrent(shape):
    inputs = make_inputs(*shape, seed=sum(shape))
    B, T, H, K, V = shape
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    got = run_with_grads(ours("cpp", scale=0.7), inputs, do, dht)
    ref = run_with_grads(ours("recurrent", scale=0.7), inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"


@needs_cpp
def test_cpp_training_call_pieces_and_pads():
    """No initial / final state (the training call); two pieces with a carried state; pads inside."""
    B, T, H, K, V = 2, 150, 2, 16, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, seed=61)
    do = torch.randn(B, T, H, V)
    res = {}
    for backend in ("recurrent", "cpp"):
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        o, ht = gated_delta_rule(*xs, backend=backend)
        assert ht is None
        (o * do).sum().backward()
        res[backend] = [o.detach()] + [x.grad for x in xs]
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], res["cpp"], res["recurrent"]):
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"
    cut = 70
    o1, h1 = gated_delta_rule(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], initial_state=h0,
                              output_final_state=True, backend="cpp")
    o2, h2 = gated_delta_rule(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], initial_state=h1,
                              output_final_state=True, backend="cpp")
    o, h = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="recurrent")
    assert rel_rms(torch.cat([o1, o2], 1), o) <= TOL and rel_rms(h2, h) <= TOL
    pad = torch.zeros(T, dtype=torch.bool)
    pad[[0, 5, 40, 63, 64, 149]] = True
    gp, bp = g.masked_fill(pad[None, :, None], 0), beta.masked_fill(pad[None, :, None], 0)
    o_ref, h_ref = gated_delta_rule(q[:, ~pad], k[:, ~pad], v[:, ~pad], g[:, ~pad], beta[:, ~pad],
                                    initial_state=h0, output_final_state=True, backend="recurrent")
    o_pad, h_pad = gated_delta_rule(q, k, v, gp, bp, initial_state=h0, output_final_state=True, backend="cpp")
    assert rel_rms(h_pad, h_ref) <= TOL and rel_rms(o_pad[:, ~pad], o_ref) <= TOL


@needs_cpp
def test_cpp_packed_equals_each_sequence_alone():
    inputs, cu = _packed_inputs(PACKED_LENGTHS, H=2, K=16, V=16)
    T, H, V = inputs[2].shape[1:]
    K = inputs[0].shape[-1]
    do, dht = torch.randn(1, T, H, V), torch.randn(len(PACKED_LENGTHS), H, K, V)
    ref = run_with_grads(_one_by_one(cu, "recurrent"), inputs, do, dht)
    got = run_with_grads(ours("cpp", cu_seqlens=cu), inputs, do, dht)
    for name, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert rel_rms(a, b) <= TOL, f"{name}: rel RMS {rel_rms(a, b):.2e} > {TOL}"
    empty = PACKED_LENGTHS.index(0)
    assert torch.equal(got[1][empty], inputs[5][empty]) and torch.equal(got[7][empty], dht[empty])


@needs_cpp
def test_cpp_on_two_threads_and_bf16():
    """Sequence-heads split over two threads give the one-thread numbers; bf16 inputs accumulate in
    float32 and get bf16 gradients, like the chunk op."""
    inputs = make_inputs(3, 100, 2, 32, 32, seed=67)
    do, dht = torch.randn(3, 100, 2, 32), torch.randn(3, 2, 32, 32)
    one = run_with_grads(ours("cpp"), inputs, do, dht)
    torch.set_num_threads(2)  # the module fixture restores one thread
    two = run_with_grads(ours("cpp"), inputs, do, dht)
    torch.set_num_threads(1)
    for name, a, b in zip(NAMES, two, one):
        assert torch.equal(a, b), name  # each sequence-head is one thread's, whatever the split
    low = [x.bfloat16() for x in inputs[:5]] + [inputs[5]]
    got = run_with_grads(ours("cpp"), low, do, dht)
    want = run_with_grads(ours("chunk"), low, do, dht)
    assert [x.dtype for x in got[2:]] == [x.dtype for x in want[2:]]
    for name, a, b in zip(NAMES, got, want):
        assert rel_rms(a, b) <= 1e-2, f"{name}: rel RMS {rel_rms(a, b):.2e}"


def test_resolve_backend_cpp_where_it_runs():
    q = torch.zeros(1, 2, 1, 32)
    assert resolve_backend("auto", q) == ("cpp" if cpp_available() else "chunk")
    assert resolve_backend("auto", q, torch.zeros(1, 2, 1, 16)) == "chunk"  # K != V
    assert resolve_backend("auto", q.double()) == "chunk"  # float64 accumulates in float64
    assert resolve_backend("auto", torch.zeros(1, 2, 1, 8)) == "chunk"  # K not instantiated
    with pytest.raises(ValueError, match=r"backend='cpp' runs CPU tensors with K = V in \{16, 32, 64, 128\}"):
        resolve_backend("cpp", torch.zeros(1, 2, 1, 8))
