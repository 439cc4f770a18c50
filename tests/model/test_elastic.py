"""ELASTIC (../shared/ELASTIC.md): the dispatcher-attention op against its literal reference, the
product-key memory against its dense reference, and the model's padding / streaming / training
contract beyond what tests/model/test_model.py already checks for every arch."""
from __future__ import annotations

import pytest
import torch
from model_testkit import left_pad, make, memorise, random_batch, tiny_config

import sinkrec.ops.dispatcher.chunk as chunk_mod
from sinkrec.layers.elastic import LOGIT_CAP
from sinkrec.model import Elastic, build_model
from sinkrec.modules import ProductKeyMemory
from sinkrec.ops.dispatcher import dispatcher_attention
from sinkrec.ops.dispatcher.chunk import CHUNK_SIZE, chunk_dispatcher_attention

TOL = 1e-5  # relative RMS error of float32 against the float64 reference


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def lda_inputs(B=3, T=75, H=2, J=5, V=8, logit_std=3.0, seed=0):
    """q, a, v [B, T, H, *] leaf tensors (float32) and a mask with left pads and one pad mid-sequence."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, V, generator=gen)
    a = logit_std * torch.randn(B, T, H, J, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, : min(T // 2, 9)] = False  # left padding
    mask[1, T // 2] = False  # a pad inside the sequence: never aggregated
    return [x.requires_grad_() for x in (q, a, v)], mask


# ---- dispatcher attention: chunk vs the literal O(T^2 J) reference ----
def test_naive_reference_on_a_hand_computed_case():
    """One head, one dispatcher (J = 1): y_t = c(t), the exp(a)-weighted mean of the prefix."""
    a = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)
    v = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    y, _ = dispatcher_attention(torch.ones_like(v), a, v, backend="naive")
    e = torch.tensor([1.0, 1.0 * torch.e, torch.e ** 2])
    expected = torch.stack([v[0, :t + 1, 0, 0] @ e[:t + 1] / e[:t + 1].sum() for t in range(3)])
    torch.testing.assert_close(y.view(3), expected)


@pytest.mark.parametrize("T,chunk", [(75, 32), (100, 32), (63, 16), (130, 64), (2, 64), (13, 4)])
def test_chunk_equals_naive_outputs_and_gradients(T, chunk):
    """T not a multiple of the chunk; random upstream gradient; float32 chunk vs float64 reference."""
    (q, a, v), mask = lda_inputs(T=T)
    y, _ = chunk_dispatcher_attention(q, a, v, mask, scale=8 ** -0.5, chunk_size=chunk)
    ref, _ = dispatcher_attention(q.double(), a.double(), v.double(), mask=mask, backend="naive")
    assert rel_rms(y, ref) < TOL
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, a, v), dy)
    ref_grads = torch.autograd.grad(ref, (q, a, v), dy.double())
    for name, g, rg in zip("qav", grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_rms(g, rg) < TOL, f"d{name}: {rel_rms(g, rg):.2e}"
    n_pad = int((~mask[0]).cumprod(0).sum())
    assert n_pad > 0 and (y[0, :n_pad] == 0).all()  # positions with no real event in their prefix


def test_grouped_recompute_equals_one_group(monkeypatch):
    """The chunk outputs run (and are recomputed in backward) in groups of chunks; with one chunk per
    group (8 groups here, the last one partial) outputs and gradients equal the one-group run."""
    (q, a, v), mask = lda_inputs(T=120)  # 8 chunks of 16 for each of B * H = 6 sequence-heads
    dy = torch.randn(3, 120, 2, 8)
    runs = []
    for group_chunk_heads in (10_000, 6):  # all 8 chunks in one group | one chunk per group
        monkeypatch.setattr(chunk_mod, "GROUP_CHUNK_HEADS", group_chunk_heads)
        y, _ = chunk_mod.chunk_dispatcher_attention(q, a, v, mask, scale=8 ** -0.5, chunk_size=16)
        runs.append((y, *torch.autograd.grad(y, (q, a, v), dy)))
    for one, grouped in zip(*runs, strict=True):
        torch.testing.assert_close(grouped, one, atol=1e-6, rtol=1e-5)


def test_chunk_exact_over_the_capped_logit_range_and_why_the_cap_exists():
    """Logits spanning the whole +-LOGIT_CAP range inside one chunk: still exact in float32. Spanning
    +-100 (what the cap prevents), the chunk-end max underflows the early positions' denominators."""
    (q, _, v), mask = lda_inputs(T=CHUNK_SIZE)  # one chunk
    a = 2 * torch.rand(3, CHUNK_SIZE, 2, 5, generator=torch.Generator().manual_seed(1)) - 1  # in [-1, 1]
    a[:, :, :, 0] = torch.linspace(-1, 1, CHUNK_SIZE)[None, :, None]  # dispatcher 0 rises across the chunk
    for span, exact in ((LOGIT_CAP, True), (100.0, False)):
        y, _ = dispatcher_attention(q, span * a, v, mask=mask)
        ref, _ = dispatcher_attention(q.double(), span * a.double(), v.double(), mask=mask, backend="naive")
        assert (rel_rms(y, ref) < TOL) == exact, f"span {span}: {rel_rms(y, ref):.2e}"


def test_state_carry_and_streaming_equal_one_pass():
    (q, a, v), mask = lda_inputs(T=75)
    full, final = dispatcher_attention(q, a, v, mask=mask, output_final_state=True)
    # two pieces, the second starting from the first one's final state
    y1, st = dispatcher_attention(q[:, :40], a[:, :40], v[:, :40], mask=mask[:, :40], output_final_state=True)
    y2, st2 = dispatcher_attention(q[:, 40:], a[:, 40:], v[:, 40:], mask=mask[:, 40:], initial_state=st,
                                   output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, atol=1e-5, rtol=1e-5)
    for x, y in zip(st2, final, strict=True):
        torch.testing.assert_close(x, y)
    # one event at a time (the streaming path): O(J (V + 2)) state per head
    st, ys = None, []
    for t in range(75):
        y, st = dispatcher_attention(q[:, t:t + 1], a[:, t:t + 1], v[:, t:t + 1], mask=mask[:, t:t + 1],
                                     initial_state=st, output_final_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, atol=1e-5, rtol=1e-5)
    for x, y in zip(st, final, strict=True):
        torch.testing.assert_close(x, y)
    assert st.num.shape == (3, 2, 5, 8) and st.den.shape == st.m.shape == (3, 2, 5)


def test_op_input_errors():
    (q, a, v), mask = lda_inputs(T=10)
    with pytest.raises(ValueError, match="a must be"):
        dispatcher_attention(q, a[:, :5], v)
    with pytest.raises(ValueError, match="mask"):
        dispatcher_attention(q, a, v, mask=mask.float())
    with pytest.raises(ValueError, match="keeps no state"):
        dispatcher_attention(q, a, v, backend="naive", output_final_state=True)


# ---- interest memory: sparse product-key read vs the dense reference ----
def _pkm_inputs(n_keys: int, topk: int, seed: int = 0):
    torch.manual_seed(seed)
    pkm = ProductKeyMemory(16, n_keys, topk)
    h = torch.randn(3, 7, 16, requires_grad=True)
    return pkm, h


def _grads(pkm: ProductKeyMemory, h: torch.Tensor, out: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    params = [h, pkm.query.weight, pkm.keys, pkm.values.weight, pkm.norm.weight]
    return list(torch.autograd.grad(out, params, dy))


@pytest.mark.parametrize("n_keys,topk", [(4, 16), (6, 36)])
def test_sparse_read_equals_dense_when_all_slots_are_read(n_keys, topk):
    """m = M: the top-m of the candidate pairs is every slot; outputs and every gradient agree."""
    pkm, h = _pkm_inputs(n_keys, topk)
    sparse, dense = pkm(h), pkm.read_dense(h)
    s = pkm.half_scores(h)  # [P, 2, n_keys]
    full = torch.softmax((s[:, 0, :, None] + s[:, 1, None, :]).flatten(1), -1)  # [P, M]
    torch.testing.assert_close(dense.view(-1, 16), full @ pkm.values.weight)  # the reference reads all M
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-5)
    dy = torch.randn_like(sparse)
    for g, rg in zip(_grads(pkm, h, sparse, dy), _grads(pkm, h, dense, dy), strict=True):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("topk", [1, 3, 8])
def test_sparse_read_equals_dense_top_m(topk):
    """m < M: the product-key search finds exactly the m best of all M slots."""
    pkm, h = _pkm_inputs(12, topk)
    sparse, dense = pkm(h), pkm.read_dense(h)
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-5)
    dy = torch.randn_like(sparse)
    for g, rg in zip(_grads(pkm, h, sparse, dy), _grads(pkm, h, dense, dy), strict=True):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-5)


def test_sparse_value_gradients_equal_dense_ones():
    torch.manual_seed(0)
    dense_pkm = ProductKeyMemory(16, 8, 4)
    torch.manual_seed(0)
    sparse_pkm = ProductKeyMemory(16, 8, 4, sparse=True)
    h = torch.randn(3, 7, 16)
    dense_pkm(h).square().sum().backward()
    sparse_pkm(h).square().sum().backward()
    assert sparse_pkm.values.weight.grad.is_sparse
    read = dense_pkm.values.weight.grad.abs().sum(1) > 0
    assert 0 < int(read.sum()) < 64  # only the slots some position read get a gradient
    torch.testing.assert_close(sparse_pkm.values.weight.grad.to_dense(), dense_pkm.values.weight.grad)


# ---- the model ----
def small(seed: int = 0, **overrides) -> Elastic:
    base = {"n_dispatchers": 4, "n_mem_keys": 8, "mem_topk": 4}
    return make("elastic", seed=seed, **{**base, **overrides})


def test_left_padding_invariance_across_chunk_boundaries():
    """T = 100 (four 32-chunks), 1..70 extra pads shift every chunk boundary."""
    model = small().eval()
    items, ts = random_batch(T=100, pads=(30, 0, 65))
    base = model(items, ts).hidden
    for extra in (1, 7, 29, 70):
        items2, ts2 = left_pad(items, ts, extra)
        torch.testing.assert_close(model(items2, ts2).hidden[:, extra:], base, atol=2e-5, rtol=1e-4)


def test_step_equals_forward_over_several_chunks():
    """150 events one at a time (pads first) equal the chunked forward; the state never grows."""
    model = small(n_blocks=2).eval()
    items, ts = random_batch(T=150, pads=(80, 0, 3))
    full = model(items, ts).hidden
    state, sizes, stepped = model.init_state(3), set(), []
    for t in range(150):
        h, state = model.step(state, items[:, t], ts[:, t])
        stepped.append(h)
        sizes.add(sum(x.numel() for st in state["lda"] for x in st))
    torch.testing.assert_close(torch.stack(stepped, 1), full, atol=1e-4, rtol=1e-4)
    assert sizes == {2 * 3 * 2 * 4 * (16 + 2)}  # blocks x B x H x J x (K + 2)


def test_gradients_reach_dispatchers_and_memory():
    model = small().train()
    items, ts = random_batch()
    loss, _ = model.loss(model(items, ts), items)
    loss.backward()
    blk = model.blocks[0]
    for name, p in [("dispatchers", blk.lda.dispatchers), ("memory keys", blk.imr.keys),
                    ("memory values", blk.imr.values.weight), ("memory query", blk.imr.query.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_validation():
    assert isinstance(build_model(tiny_config("elastic", n_mem_keys=4, mem_topk=16)), Elastic)
    with pytest.raises(ValueError, match="mem_topk"):
        build_model(tiny_config("elastic", n_mem_keys=4, mem_topk=17))
    with pytest.raises(ValueError, match="n_dispatchers"):
        build_model(tiny_config("elastic", n_dispatchers=0))
    build_model(tiny_config("sasrec", n_dispatchers=0))  # elastic fields are not checked for other archs


@pytest.mark.trains
@pytest.mark.parametrize("seed", [0, 1])
def test_overfits_tiny_dataset_with_default_memory(seed):
    """8 users x 16 random events, default interest memory (128^2 slots, top 8): the next items are
    memorised (full-softmax CE < 0.05; measured 36-43 Adam steps on seeds 0-4 with default,
    avx2 and avx512 kernels; limit 300)."""
    model = make("elastic", seed=seed, num_items=30, n_blocks=1)
    items, ts = random_batch(B=8, T=16, N=30, pads=(3, 0, 1, 0, 4, 0, 0, 2), seed=seed + 10)
    ce = memorise(model, items, ts, max_steps=300)
    assert ce < 0.05, f"elastic did not overfit: ce={ce:.3f}"
