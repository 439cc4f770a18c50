"""Triton kernels for the fused TDGD gates: one forward and one backward pass over rows.

Every (b, t, h) is one independent row: q, k, km [K] and v, vm [V] vectors plus a few
scalars, so the whole gate / purification chain (SINKREC.md section 2, `naive.py`) is
elementwise work plus two K-dot products. The reference launches ~30 small kernels and keeps
every intermediate for autograd; here the forward is one read of the inputs and one write of
the outputs, and the backward recomputes the intermediates in registers instead of storing them.

Layout: rows N = B * T * H in [B, T, H] order, so row n has head n % H and position n // H.
Per-head parameters get one gradient per row, summed over rows per head in PyTorch.
Runs on GPUs, and on CPU with TRITON_INTERPRET=1 (set before `import triton`), which the
parity test uses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sinkrec.ops.fused_gates.naive import GateOut

BLOCK_N = 32  # rows per program


@triton.jit
def _softplus(x):
    # same threshold as torch.nn.functional.softplus (beta=1, threshold=20)
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _gates_fwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, ax_ptr, bx_ptr, lx_ptr, phi_ptr, mask_ptr,
    alog_ptr, dtb_ptr, ca_ptr, cb_ptr, srho_ptr, brho_ptr,
    qt_ptr, vt_ptr, g_ptr, beta_ptr, r_ptr,
    N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BLOCK: tl.constexpr, MEMORY: tl.constexpr, PURIFY: tl.constexpr, DIFF: tl.constexpr,
    TEMPORAL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    rmask = rows < N
    head, pos = rows % H, rows // H
    m = tl.load(mask_ptr + pos, mask=rmask, other=0.0).to(tl.float32)
    za = tl.load(ax_ptr + rows, mask=rmask, other=0.0).to(tl.float32) + tl.load(dtb_ptr + head).to(tl.float32)
    zb = tl.load(bx_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if TEMPORAL:
        phi = tl.load(phi_ptr + pos, mask=rmask, other=0.0).to(tl.float32)
        za += tl.load(ca_ptr + head).to(tl.float32) * phi
        zb += tl.load(cb_ptr + head).to(tl.float32) * phi
    g = -tl.exp(tl.load(alog_ptr + head).to(tl.float32)) * _softplus(za) * m
    b = tl.sigmoid(zb) * m
    beta = b
    if MEMORY:
        ck = tl.arange(0, BK)
        cv = tl.arange(0, BV)
        mk = rmask[:, None] & (ck[None, :] < K)
        mv = rmask[:, None] & (cv[None, :] < V)
        ok = rows[:, None] * K + ck[None, :]  # [BLOCK, BK] offsets
        ov = rows[:, None] * V + cv[None, :]  # [BLOCK, BV] offsets
        q = tl.load(q_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        km = tl.load(km_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + ov, mask=mv, other=0.0).to(tl.float32)
        vm = tl.load(vm_ptr + ov, mask=mv, other=0.0).to(tl.float32)
        rho = tl.sigmoid(tl.load(srho_ptr + head).to(tl.float32) * tl.sum(k * km, 1)
                         + tl.load(brho_ptr + head).to(tl.float32))
        tl.store(r_ptr + rows, rho * tl.sum(q * km, 1), mask=rmask)
        if PURIFY:
            beta = b * (1.0 - rho)
            v = v - rho[:, None] * vm
        if DIFF:
            lam = tl.sigmoid(tl.load(lx_ptr + rows, mask=rmask, other=0.0).to(tl.float32))
            q = q - lam[:, None] * km
        tl.store(qt_ptr + ok, q.to(qt_ptr.dtype.element_ty), mask=mk)
        tl.store(vt_ptr + ov, v.to(vt_ptr.dtype.element_ty), mask=mv)
    tl.store(g_ptr + rows, g, mask=rmask)
    tl.store(beta_ptr + rows, beta, mask=rmask)


@triton.jit
def _gates_bwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, ax_ptr, bx_ptr, lx_ptr, phi_ptr, mask_ptr,
    alog_ptr, dtb_ptr, ca_ptr, cb_ptr, srho_ptr, brho_ptr,
    dqt_ptr, dvt_ptr, dg_ptr, dbeta_ptr, dr_ptr,
    dq_ptr, dk_ptr, dkm_ptr, dvm_ptr, dax_ptr, dbx_ptr, dlx_ptr,
    dalog_ptr, dca_ptr, dcb_ptr, dsrho_ptr, dbrho_ptr,  # per-row parameter grads [N]
    N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BLOCK: tl.constexpr, MEMORY: tl.constexpr, PURIFY: tl.constexpr, DIFF: tl.constexpr,
    TEMPORAL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    head, pos = rows % H, rows // H
    m = tl.load(mask_ptr + pos, mask=rmask, other=0.0).to(tl.float32)
    za = tl.load(ax_ptr + rows, mask=rmask, other=0.0).to(tl.float32) + tl.load(dtb_ptr + head).to(tl.float32)
    zb = tl.load(bx_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    phi = tl.zeros([BLOCK], dtype=tl.float32)
    if TEMPORAL:
        phi = tl.load(phi_ptr + pos, mask=rmask, other=0.0).to(tl.float32)
        za += tl.load(ca_ptr + head).to(tl.float32) * phi
        zb += tl.load(cb_ptr + head).to(tl.float32) * phi
    A = tl.exp(tl.load(alog_ptr + head).to(tl.float32))
    sig_b = tl.sigmoid(zb)
    b = sig_b * m
    dg = tl.load(dg_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    dbeta = tl.load(dbeta_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    db = dbeta
    if MEMORY:
        ck = tl.arange(0, BK)
        cv = tl.arange(0, BV)
        mk = rmask[:, None] & (ck[None, :] < K)
        mv = rmask[:, None] & (cv[None, :] < V)
        ok = rows[:, None] * K + ck[None, :]
        ov = rows[:, None] * V + cv[None, :]
        q = tl.load(q_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        km = tl.load(km_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        vm = tl.load(vm_ptr + ov, mask=mv, other=0.0).to(tl.float32)
        dqt = tl.load(dqt_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        dvt = tl.load(dvt_ptr + ov, mask=mv, other=0.0).to(tl.float32)
        dr = tl.load(dr_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        s_rho = tl.load(srho_ptr + head).to(tl.float32)
        sk = tl.sum(k * km, 1)
        sq = tl.sum(q * km, 1)
        rho = tl.sigmoid(s_rho * sk + tl.load(brho_ptr + head).to(tl.float32))
        # r = rho * <q, km>
        drho = dr * sq
        dq = dqt + (dr * rho)[:, None] * km
        dkm = (dr * rho)[:, None] * q
        dvm = tl.zeros([BLOCK, BV], dtype=tl.float32)
        if PURIFY:  # beta = b (1 - rho), v~ = v - rho vm
            drho += -dbeta * b - tl.sum(dvt * vm, 1)
            db = dbeta * (1.0 - rho)
            dvm = -rho[:, None] * dvt
        if DIFF:  # q~ = q - lam km
            lam = tl.sigmoid(tl.load(lx_ptr + rows, mask=rmask, other=0.0).to(tl.float32))
            dkm += -lam[:, None] * dqt
            tl.store(dlx_ptr + rows, -tl.sum(dqt * km, 1) * lam * (1.0 - lam), mask=rmask)
        dz = drho * rho * (1.0 - rho)  # through rho = sigmoid(s_rho <k, km> + b_rho)
        dkm += (dz * s_rho)[:, None] * k
        tl.store(dq_ptr + ok, dq.to(dq_ptr.dtype.element_ty), mask=mk)
        tl.store(dk_ptr + ok, ((dz * s_rho)[:, None] * km).to(dk_ptr.dtype.element_ty), mask=mk)
        tl.store(dkm_ptr + ok, dkm.to(dkm_ptr.dtype.element_ty), mask=mk)
        tl.store(dvm_ptr + ov, dvm.to(dvm_ptr.dtype.element_ty), mask=mv)
        tl.store(dsrho_ptr + rows, dz * sk, mask=rmask)
        tl.store(dbrho_ptr + rows, dz, mask=rmask)
    # g = -A softplus(za) m  =>  dg/dza = -A sigmoid(za) m,  dg/dA_log = g
    dza = dg * (-A) * tl.sigmoid(za) * m
    dzb = db * m * sig_b * (1.0 - sig_b)
    tl.store(dax_ptr + rows, dza, mask=rmask)
    tl.store(dbx_ptr + rows, dzb, mask=rmask)
    tl.store(dalog_ptr + rows, dg * (-A) * _softplus(za) * m, mask=rmask)
    tl.store(dca_ptr + rows, dza * phi, mask=rmask)
    tl.store(dcb_ptr + rows, dzb * phi, mask=rmask)


def _launch_args(N: int, K: int, V: int) -> tuple:
    return (triton.cdiv(N, BLOCK_N),), {"BK": triton.next_power_of_2(K), "BV": triton.next_power_of_2(V), "BLOCK": BLOCK_N}


class _FusedGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b, s_rho, b_rho, flags):
        memory, purify, diff, temporal = flags
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B * T * H
        # contiguous [B, T, H, ...] so that row n = (b * T + t) * H + h
        q, k, v, a_x, b_x = (x.contiguous() for x in (q, k, v, a_x, b_x))
        km = km.contiguous() if memory else q
        vm = vm.contiguous() if memory else v
        l_x = l_x.contiguous() if (memory and diff) else a_x
        phi, mask = phi.float().contiguous(), mask.float().contiguous()
        params = [p.contiguous() for p in (A_log, dt_bias, c_a, c_b, s_rho, b_rho)]
        g = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
        beta, r = torch.empty_like(g), torch.empty_like(g)
        qt = torch.empty_like(q) if memory else q
        vt = torch.empty_like(v) if memory else v
        grid, meta = _launch_args(N, K, V)
        _gates_fwd_kernel[grid](
            q, k, v, km, vm, a_x, b_x, l_x, phi, mask, *params, qt, vt, g, beta, r,
            N, H=H, K=K, V=V, MEMORY=memory, PURIFY=purify, DIFF=diff, TEMPORAL=temporal, **meta,
        )
        ctx.save_for_backward(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, *params)
        ctx.flags, ctx.dtypes = flags, (a_x.dtype, b_x.dtype, l_x.dtype)
        if memory:
            return qt, vt, g.to(a_x.dtype), beta.to(a_x.dtype), r.to(a_x.dtype)
        return g.to(a_x.dtype), beta.to(a_x.dtype)

    @staticmethod
    def backward(ctx, *grads):
        memory, purify, diff, temporal = ctx.flags
        q, k, v, km, vm, a_x, b_x, l_x, phi, mask, *params = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B * T * H
        if memory:
            dqt, dvt, dg, dbeta, dr = (x.contiguous() for x in grads)
        else:
            dg, dbeta = (x.contiguous() for x in grads)
            dqt, dvt, dr = q, v, dg  # never read
        dq, dk, dkm = (torch.zeros_like(q) for _ in range(3))
        dvm = torch.zeros_like(v)
        row = lambda: torch.zeros(N, device=q.device, dtype=torch.float32)
        dax, dbx, dlx = row(), row(), row()
        dalog, dca, dcb, dsrho, dbrho = row(), row(), row(), row(), row()
        grid, meta = _launch_args(N, K, V)
        _gates_bwd_kernel[grid](
            q, k, v, km, vm, a_x, b_x, l_x, phi, mask, *params, dqt, dvt, dg, dbeta, dr,
            dq, dk, dkm, dvm, dax, dbx, dlx, dalog, dca, dcb, dsrho, dbrho,
            N, H=H, K=K, V=V, MEMORY=memory, PURIFY=purify, DIFF=diff, TEMPORAL=temporal, **meta,
        )
        per_head = lambda x, p: x.view(-1, H).sum(0).to(p.dtype)
        A_log, dt_bias, c_a, c_b, s_rho, b_rho = params
        shape = (B, T, H)
        d_params = (per_head(dalog, A_log), per_head(dax, dt_bias),
                    per_head(dca, c_a) if temporal else None, per_head(dcb, c_b) if temporal else None,
                    per_head(dsrho, s_rho) if memory else None, per_head(dbrho, b_rho) if memory else None)
        if not memory:
            return (None, None, None, None, None, dax.view(shape).to(ctx.dtypes[0]),
                    dbx.view(shape).to(ctx.dtypes[1]), None, None, None, *d_params, None)
        return (dq, dk, dvt, dkm, dvm, dax.view(shape).to(ctx.dtypes[0]), dbx.view(shape).to(ctx.dtypes[1]),
                dlx.view(shape).to(ctx.dtypes[2]) if diff else None, None, None, *d_params, None)


def gates_triton(
    q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b, s_rho, b_rho,
    memory: bool = True, purify_write: bool = True, diff_read: bool = True, temporal: bool = True,
) -> GateOut:
    """Same contract as `gates_reference`, one kernel each way."""
    flags = (bool(memory), bool(purify_write), bool(diff_read), bool(temporal))
    out = _FusedGates.apply(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b, s_rho, b_rho,
                            flags)
    if memory:
        return GateOut(*out)
    return GateOut(q, v, out[0], out[1], None)  # q and v pass through untouched
