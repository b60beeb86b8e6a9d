"""Fused Triton grouped LoRA (Punica / S-LoRA "SGMV" style), forward and backward.

The ``M = N * k`` assignments are sorted by expert on the device (two small kernels, no host
synchronisation) and laid out in blocks of ``BLOCK_M`` slots, each block holding assignments of a
single expert (an expert's last block is padded with the out-of-range id ``M``). A fixed grid of
``min(cdiv(M, BLOCK_M) + E, M)`` row blocks covers every possible layout, so no launch needs a count
from the device; unused blocks exit at once. Three kernels then do the work:

- ``_grouped_gemm_kernel``: ``Y[m] = s * w[m] * X[row(m)] @ W[e(m)]^T`` for every assignment ``m``,
  ``row(m) = m // ROW_DIV`` (a row of ``x`` or ``dy`` shared by its ``k`` slots is read in place),
  with any strides for ``W`` (``A``, ``B`` and their transposes need no copy) and an optional split
  of the reduction (atomic adds into fp32) when the row blocks alone would not fill the GPU. It is
  the "shrink" ``t = A x`` (reduction over ``in``; exactly the selected experts' FLOPs), the backward
  shrink ``u = B^T dy``, and, without ``combine``, the "expand" ``y = w s B t`` and ``dx = w s A^T u``.
- ``_combine_expand_kernel``: the expand summed over a token's slots in registers, tiles of tokens
  at a time (loop over the experts): ``y[n] = sum_j w s B[e_j] t_j`` (``combine``) and
  ``dx[n] = sum_j w s A[e_j]^T u_j`` (a shared 2-D ``x``), each output row written once.
- ``_grouped_outer_kernel``: per expert, ``OUT[e] = sum_{m of e} P[row(m)]^T (s w[m] Q[m])``, a
  segmented reduction over the expert's blocks: ``dA[e] = sum w s u_m x_m^T`` and
  ``dB[e] = sum w s dy_m t_m^T``. ``dw[m] = s <u_m, t_m>`` is one small torch reduction.

Precision: the matmuls read operands in the parameters' dtype and accumulate in fp32 (fp64 for fp64
inputs); the rank-``r`` intermediates ``t`` and ``u`` are kept in fp32 and rounded to the compute
dtype before the expand (as the dense backend's bf16 intermediate is). ``x``, ``A`` and ``B`` must
share one dtype (as for the other backends; ``LoraWeights.delta`` casts ``x`` to the parameters').
On the GPU fp32 runs as three TF32 products ("tf32x3", about fp32 accuracy) or as plain TF32 where
``torch.backends.cuda.matmul.allow_tf32`` is set.

CUDA tensors run the compiled kernels. CPU tensors run them through Triton's interpreter (slow: for
tests without a GPU); where ``TRITON_INTERPRET=1`` was not set before Triton was imported, only the
gemm and outer kernels can be interpreted, and the layout and the slot sum fall back to torch ops.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["weighted_lora_triton"]


def _grouped_gemm_kernel(
    X, W, Y, ROW_SCALE, sorted_ids_ptr, block_expert_ptr,
    M, N, K, ROW_DIV, scale,
    stride_xm, stride_we, stride_wn, stride_wk, stride_ym,
    HAS_ROW_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``Y[m, n] (+)= scale * ROW_SCALE[m] * sum_k X[m // ROW_DIV, k] * W[e(m), n, k]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:  # blocks past the last expert's are unused
        ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # assignment ids; M = padding
        valid = ids < M
        rows = ids // ROW_DIV
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k_span = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K  # this program's share of K
        w_base = W + expert.to(tl.int64) * stride_we
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=ACC_DTYPE)  # (tl.full: tl.zeros is not interpretable here)
        for k0 in range(pid_k * k_span, (pid_k + 1) * k_span, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                        mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        acc = acc * scale
        if HAS_ROW_SCALE:
            acc = acc * tl.load(ROW_SCALE + ids, mask=valid, other=0.0).to(ACC_DTYPE)[:, None]
        y_ptrs = Y + ids.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = valid[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y_ptrs, acc, mask=mask)


def _grouped_outer_kernel(
    P, Q, OUT, ROW_SCALE, sorted_ids_ptr, expert_block_ptr,
    M, NP, R, P_ROW_DIV, scale,
    stride_pm, stride_qm, stride_oe, stride_on, stride_or,
    HAS_ROW_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``OUT[e, n, r] = sum_{m of e} P[m // P_ROW_DIV, n] * scale * ROW_SCALE[m] * Q[m, r]`` (no rows: 0)."""
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    first = tl.load(expert_block_ptr + expert)
    last = tl.load(expert_block_ptr + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < NP
    r_mask = offs_r < R
    acc = tl.full((BLOCK_N, BLOCK_R), 0, dtype=ACC_DTYPE)
    for b in range(first, last):
        ids = tl.load(sorted_ids_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = ids < M
        p = tl.load(P + (ids // P_ROW_DIV).to(tl.int64)[:, None] * stride_pm + offs_n[None, :],
                    mask=valid[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        q = tl.load(Q + ids.to(tl.int64)[:, None] * stride_qm + offs_r[None, :],
                    mask=valid[:, None] & r_mask[None, :], other=0.0).to(ACC_DTYPE)  # (BLOCK_M, BLOCK_R)
        q = q * scale
        if HAS_ROW_SCALE:
            q = q * tl.load(ROW_SCALE + ids, mask=valid, other=0.0).to(ACC_DTYPE)[:, None]
        acc = tl.dot(tl.trans(p), q.to(p.dtype), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    out_ptrs = OUT + expert.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=n_mask[:, None] & r_mask[None, :])


def _combine_expand_kernel(
    T, W, Y, ROW_SCALE, IDX, NTOK, N, R, E, scale,
    stride_tm, stride_we, stride_wn, stride_wk, stride_yn,
    KSLOTS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SKIP_ABSENT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``Y[n] = sum_j scale * w[n, j] * W[e(n, j)] @ T[n * KSLOTS + j]``, a tile of tokens at a time.

    The expand with the sum over a token's ``k`` slots done in registers: each output row is written
    once (no ``(N, k, out)`` intermediate). Loops over the experts; with ``SKIP_ABSENT`` (small token
    tiles, where few experts occur) it skips those absent from the tile.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.arange(0, BLOCK_S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    r_mask = offs_r < R
    m = toks.to(tl.int64)[:, None] * KSLOTS + slots[None, :]  # (BLOCK_T, BLOCK_S) assignment ids
    valid = (toks < NTOK)[:, None] & (slots < KSLOTS)[None, :]
    experts = tl.load(IDX + m, mask=valid, other=-1)
    coef = tl.full((BLOCK_T, BLOCK_S), 1, ACC_DTYPE) * scale
    if HAS_ROW_SCALE:
        coef = coef * tl.load(ROW_SCALE + m, mask=valid, other=0.0).to(ACC_DTYPE)
    t = tl.load(T + m[:, :, None] * stride_tm + offs_r[None, None, :],
                mask=valid[:, :, None] & r_mask[None, None, :], other=0.0).to(ACC_DTYPE)
    t = t * coef[:, :, None]  # (BLOCK_T, BLOCK_S, BLOCK_R)
    acc = tl.full((BLOCK_T, BLOCK_N), 0, dtype=ACC_DTYPE)
    for e in range(0, E):
        sel = experts == e
        if not SKIP_ABSENT or tl.max(sel.to(tl.int32)) > 0:
            u = tl.sum(tl.where(sel[:, :, None], t, 0.0), axis=1)  # (BLOCK_T, BLOCK_R)
            w = tl.load(W + e * stride_we + offs_r[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(u.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    y_ptrs = Y + toks.to(tl.int64)[:, None] * stride_yn + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(toks < NTOK)[:, None] & n_mask[None, :])


def _count_kernel(flat_ptr, counts_ptr, ranks_ptr, M, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """Layout, step 1 (one program per chunk of assignments): per-expert counts and in-chunk ranks."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(flat_ptr + offs, mask=offs < M, other=-1)
    onehot = (e[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)  # (CHUNK, BLOCK_E)
    before = tl.cumsum(onehot, axis=0) - onehot  # earlier assignments of the same expert in the chunk
    tl.store(ranks_ptr + offs, tl.sum(before * onehot, axis=1), mask=offs < M)
    tl.store(counts_ptr + c * BLOCK_E + tl.arange(0, BLOCK_E), tl.sum(onehot, axis=0))


def _scatter_kernel(
    flat_ptr, counts_ptr, ranks_ptr, sorted_ids_ptr, block_expert_ptr, expert_block_ptr,
    M, E, num_chunks, num_blocks,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Layout, step 2: place chunk ``c``'s assignments; pad, and name the expert of, its share of blocks."""
    c = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    total = tl.full((BLOCK_E,), 0, tl.int32)
    earlier = tl.full((BLOCK_E,), 0, tl.int32)  # assignments of each expert in chunks before c
    for c0 in range(0, num_chunks, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        cnt = tl.load(counts_ptr + rows[:, None] * BLOCK_E + experts[None, :], mask=(rows < num_chunks)[:, None],
                      other=0)
        total += tl.sum(cnt, axis=0)
        earlier += tl.sum(tl.where((rows < c)[:, None], cnt, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    # this chunk's assignments: expert start + earlier chunks + rank in the chunk (stable order)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(flat_ptr + offs, mask=offs < M, other=-1)
    base = tl.sum(tl.where(e[:, None] == experts[None, :], (padded_start + earlier)[None, :], 0), axis=1)
    pos = base + tl.load(ranks_ptr + offs, mask=offs < M, other=0)
    tl.store(sorted_ids_ptr + pos, offs.to(tl.int32), mask=(offs < M) & (e >= 0) & (e < E))
    # slots c*CHUNK.. that no assignment takes hold M
    slots = c * CHUNK + tl.arange(0, CHUNK)
    taken = (slots[:, None] >= padded_start[None, :]) & (slots[:, None] < (padded_start + total)[None, :])
    tl.store(sorted_ids_ptr + slots, M, mask=(slots < num_blocks * BLOCK_M) & (tl.max(taken.to(tl.int32), axis=1) == 0))
    # blocks c*CHUNK..: their expert is the number of experts that end at or before their start
    blocks = c * CHUNK + tl.arange(0, CHUNK)
    owner = tl.sum((padded_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + blocks, tl.where(owner < E, owner, -1), mask=blocks < num_blocks)
    if c == 0:
        tl.store(expert_block_ptr + 1 + experts, padded_end // BLOCK_M, mask=experts < E)
        tl.store(expert_block_ptr + experts, padded_start, mask=experts == 0)


_SOURCES = {
    "gemm": _grouped_gemm_kernel, "outer": _grouped_outer_kernel, "combine": _combine_expand_kernel,
    "count": _count_kernel, "scatter": _scatter_kernel,
}
_COMPILED = {name: triton.jit(fn) for name, fn in _SOURCES.items()}
_INTERPRETED: dict = {}
# With TRITON_INTERPRET=1 set before Triton was imported, triton.jit (and Triton's own library
# functions, tl.sum and tl.cumsum among them) interpret. Otherwise only kernels that use none of
# those (gemm, outer) can run interpreted on CPU tensors; the others (layout, combine) need CUDA.
_INTERPRET_ALL = not isinstance(_COMPILED["gemm"], triton.runtime.jit.JITFunction)


def _all_kernels(device: torch.device) -> bool:
    """Whether the kernels that use Triton's library reductions can run on ``device``."""
    return device.type == "cuda" or _INTERPRET_ALL


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def _check_interpreter() -> None:
    """Triton < 3.7's interpreter breaks on numpy >= 2.4 (triton-lang/triton#9171): say so plainly."""
    import numpy

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"the 'triton' LoRA backend runs CPU tensors through Triton's interpreter, which in Triton "
            f"{triton.__version__} fails with numpy {numpy.__version__} (fixed in Triton 3.7); use CUDA tensors, "
            "triton>=3.7 or numpy<2.4"
        )


def _kernel(name: str, device: torch.device):
    """The compiled kernel for CUDA tensors; the interpreted one (Triton's CPU interpreter) otherwise."""
    if device.type != "cuda":
        _check_interpreter()
    if device.type == "cuda" or _INTERPRET_ALL:
        return _COMPILED[name]
    if not _INTERPRETED:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError as err:  # pragma: no cover - depends on the Triton version
            raise RuntimeError(f"the 'triton' LoRA backend needs CUDA tensors here (no Triton interpreter: {err})") from err
        _INTERPRETED.update({name: InterpretedFunction(fn) for name, fn in _SOURCES.items()})
    return _INTERPRETED[name]


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


class _Config:
    """Launch parameters for one call: block sizes by device, problem size and rank."""

    def __init__(self, device: torch.device, M: int, E: int, r: int, dtype: torch.dtype) -> None:
        cuda = device.type == "cuda"
        per_expert = triton.cdiv(M, E)
        self.block_m = min(64, max(16, triton.next_power_of_2(per_expert)))
        self.num_blocks = min(triton.cdiv(M, self.block_m) + E, M)  # an upper bound on the blocks in use
        self.block_r = max(16, triton.next_power_of_2(r))
        self.block_k = 128 if cuda else 32  # reduction tile of the shrink (over in / out)
        self.block_n = 128 if cuda else 32  # output tile of the expand (over out / in)
        self.block_outer = 64 if cuda else 32  # output tile of the dA / dB reduction
        self.block_t = 64 if M >= 64 * E else 16  # token tile of the combined expand
        self.programs = 2 * _num_sms(device)
        self.acc = tl.float64 if dtype == torch.float64 else tl.float32
        self.acc_torch = torch.float64 if dtype == torch.float64 else torch.float32
        # fp32: TF32 where torch.matmul would use it, else three TF32 products (about fp32 accuracy)
        if cuda and dtype == torch.float32:
            self.precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
        else:
            self.precision = "ieee"

    def split_k(self, K: int) -> int:
        """Split a long reduction (the shrink) when the row blocks alone would not fill the device."""
        if self.num_blocks >= self.programs:
            return 1
        return max(1, min(triton.cdiv(K, self.block_k), triton.cdiv(self.programs, self.num_blocks)))


def _layout(flat: torch.Tensor, E: int, cfg: _Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignments sorted by expert in single-expert blocks of ``cfg.block_m`` slots, on the device.

    Returns ``sorted_ids`` (``num_blocks * block_m`` assignment ids, each expert's in order, its last
    block padded with ``M``), ``block_expert`` (``num_blocks``, ``-1`` for unused blocks) and
    ``expert_block`` (``E + 1``: expert ``e`` owns blocks ``expert_block[e] : expert_block[e + 1]``).
    Two small Triton launches where the layout kernels can run (CUDA, or an interpreting Triton);
    torch ops otherwise. Neither synchronises with the host.
    """
    M, bm, dev = flat.numel(), cfg.block_m, flat.device
    if not _all_kernels(dev):
        return _layout_torch(flat, E, cfg)
    block_e = triton.next_power_of_2(E)
    chunk = max(16, min(1024, 4096 // block_e))
    num_chunks = triton.cdiv(M, chunk)
    counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=dev)
    ranks = torch.empty(M, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(cfg.num_blocks * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(cfg.num_blocks, dtype=torch.int32, device=dev)
    expert_block = torch.empty(E + 1, dtype=torch.int32, device=dev)
    _kernel("count", dev)[(num_chunks,)](flat, counts, ranks, M, BLOCK_E=block_e, CHUNK=chunk)
    grid = (max(num_chunks, triton.cdiv(cfg.num_blocks * bm, chunk)),)
    _kernel("scatter", dev)[grid](
        flat, counts, ranks, sorted_ids, block_expert, expert_block, M, E, num_chunks, cfg.num_blocks,
        BLOCK_M=bm, BLOCK_E=block_e, CHUNK=chunk, BLOCK_C=max(1, min(64, 4096 // block_e)),
    )
    return sorted_ids, block_expert, expert_block


def _layout_torch(flat: torch.Tensor, E: int, cfg: _Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_layout`` with torch ops (about 25 small launches; used where the layout kernel cannot run)."""
    M, bm, dev = flat.numel(), cfg.block_m, flat.device
    counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    pos = padded_start[expert_of] + torch.arange(M, device=dev) - start[expert_of]
    sorted_ids = torch.full((cfg.num_blocks * bm,), M, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(cfg.num_blocks, device=dev) * bm
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    expert_block = torch.cat([padded_start.new_zeros(1), padded_end // bm]).to(torch.int32)
    return sorted_ids, block_expert, expert_block


def _gemm(X, row_div, W, w_strides, N, K, layout, cfg, M, out_dtype, scale=1.0, row_scale=None, split=1):
    """Launch ``_grouped_gemm_kernel``: returns ``(M, N)`` of ``out_dtype`` (``cfg.acc_torch`` when split)."""
    sorted_ids, block_expert, _ = layout
    if split > 1:
        Y = torch.zeros(M, N, dtype=cfg.acc_torch, device=X.device)
        block_n, block_k = cfg.block_r, cfg.block_k
    elif N <= cfg.block_r:  # a shrink: all r outputs in one tile
        Y = torch.empty(M, N, dtype=out_dtype, device=X.device)
        block_n, block_k = cfg.block_r, cfg.block_k
    else:  # an expand: the reduction (r) in one tile
        Y = torch.empty(M, N, dtype=out_dtype, device=X.device)
        block_n, block_k = cfg.block_n, cfg.block_r
    grid = (cfg.num_blocks, triton.cdiv(N, block_n), split)
    _kernel("gemm", X.device)[grid](
        X, W, Y, row_scale if row_scale is not None else Y, sorted_ids, block_expert,
        M, N, K, row_div, float(scale),
        X.stride(0), *w_strides, Y.stride(0),
        HAS_ROW_SCALE=row_scale is not None, SPLIT_K=split, ACC_DTYPE=cfg.acc, PRECISION=cfg.precision,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return Y


def _combine(T, W, w_strides, N, R, idx, k, cfg, out_dtype, scale=1.0, row_scale=None):
    """Launch ``_combine_expand_kernel``: ``(idx.numel() // k, N)`` of ``out_dtype``."""
    ntok = idx.numel() // k
    Y = torch.empty(ntok, N, dtype=out_dtype, device=T.device)
    grid = (triton.cdiv(ntok, cfg.block_t), triton.cdiv(N, cfg.block_n))
    _kernel("combine", T.device)[grid](
        T, W, Y, row_scale if row_scale is not None else T, idx, ntok, N, R, W.shape[0], float(scale),
        T.stride(0), *w_strides, Y.stride(0),
        KSLOTS=k, HAS_ROW_SCALE=row_scale is not None, ACC_DTYPE=cfg.acc, PRECISION=cfg.precision,
        SKIP_ABSENT=cfg.block_t < 64, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        BLOCK_S=triton.next_power_of_2(k),
    )
    return Y


def _outer(P, row_div, Q, out, out_strides, layout, cfg, M, scale=1.0, row_scale=None):
    """Launch ``_grouped_outer_kernel`` into ``out`` (``E`` experts, ``P.shape[1]`` by ``Q.shape[1]``)."""
    sorted_ids, _, expert_block = layout
    NP, R = P.shape[1], Q.shape[1]
    grid = (out.shape[0], triton.cdiv(NP, cfg.block_outer))
    _kernel("outer", P.device)[grid](
        P, Q, out, row_scale if row_scale is not None else Q, sorted_ids, expert_block,
        M, NP, R, row_div, float(scale),
        P.stride(0), Q.stride(0), *out_strides,
        HAS_ROW_SCALE=row_scale is not None, ACC_DTYPE=cfg.acc, PRECISION=cfg.precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_outer, BLOCK_R=cfg.block_r,
    )
    return out


class _WeightedLoraTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, A, B, weights_flat, flat, scaling, k, shared, combine):
        """``x2``: ``(rows, in)``; ``flat``: ``(M,)`` experts; returns ``(N, out)`` if combine else ``(M, out)``."""
        E, r, d_in = A.shape
        d_out = B.shape[1]
        M = flat.numel()
        cfg = _Config(x2.device, M, E, r, x2.dtype)
        layout = _layout(flat, E, cfg)
        row_div = k if shared else 1
        # shrink: t[m] = A[e] @ x[row(m)], kept in the accumulation dtype
        t = _gemm(x2, row_div, A, (A.stride(0), A.stride(1), A.stride(2)), r, d_in, layout, cfg, M,
                  cfg.acc_torch, split=cfg.split_k(d_in))
        # expand: y[m] = w[m] * s * B[e] @ t[m], summed over a token's slots if combine
        b_strides = (B.stride(0), B.stride(1), B.stride(2))
        if combine and k > 1 and _all_kernels(x2.device):
            y = _combine(t, B, b_strides, d_out, r, flat, k, cfg, x2.dtype, scale=scaling, row_scale=weights_flat)
        else:
            y = _gemm(t, 1, B, b_strides, d_out, r, layout, cfg, M, x2.dtype, scale=scaling, row_scale=weights_flat)
            if combine and k > 1:
                y = y.view(-1, k, d_out).sum(1)  # (N, out)
        ctx.save_for_backward(x2, A, B, weights_flat, flat, t, *layout)
        ctx.cfg, ctx.scaling, ctx.k, ctx.shared, ctx.combine = cfg, scaling, k, shared, combine
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, A, B, weights_flat, flat, t, *layout = ctx.saved_tensors
        cfg, s, k, shared = ctx.cfg, ctx.scaling, ctx.k, ctx.shared
        E, r, d_in = A.shape
        d_out = B.shape[1]
        M = t.shape[0]
        dy = dy.contiguous()  # (N, out) combined: row(m) = m // k; else (M, out)
        dy_div = k if ctx.combine else 1
        # u[m] = B[e]^T dy[row(m)]: a shrink over out, with B read transposed in place
        u = _gemm(dy, dy_div, B, (B.stride(0), B.stride(2), B.stride(1)), r, d_out, layout, cfg, M,
                  cfg.acc_torch, split=cfg.split_k(d_out))
        dw = None
        if ctx.needs_input_grad[3]:  # dw[m] = s <u[m], t[m]>
            dw = ((u * t).sum(1) * s).to(weights_flat.dtype)
        # t's gradient is dt[m] = w[m] s u[m]: the kernels below apply the w s row scale themselves
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:  # dx[m] = A[e]^T dt[m]: an expand over in (summed over slots if shared)
            a_strides = (A.stride(0), A.stride(2), A.stride(1))
            if shared and k > 1 and _all_kernels(x2.device):
                dx = _combine(u, A, a_strides, d_in, r, flat, k, cfg, x2.dtype, scale=s, row_scale=weights_flat)
            else:
                dx = _gemm(u, 1, A, a_strides, d_in, r, layout, cfg, M, x2.dtype, scale=s, row_scale=weights_flat)
                if shared and k > 1:
                    dx = dx.view(-1, k, d_in).sum(1)
        if ctx.needs_input_grad[1]:  # dA[e] = sum_m dt[m] x[row(m)]^T, written transposed into (E, r, in)
            dA = torch.empty_like(A)
            _outer(x2, k if shared else 1, u, dA, (dA.stride(0), dA.stride(2), dA.stride(1)), layout, cfg, M,
                   scale=s, row_scale=weights_flat)
        if ctx.needs_input_grad[2]:  # dB[e] = sum_m dy[row(m)] (w[m] s t[m])^T
            dB = torch.empty_like(B)
            _outer(dy, dy_div, t, dB, (dB.stride(0), dB.stride(1), dB.stride(2)), layout, cfg, M,
                   scale=s, row_scale=weights_flat)
        return dx, dA, dB, dw, None, None, None, None, None


def weighted_lora_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    indices: torch.Tensor | None,
    weights: torch.Tensor | None,
    combine: bool,
) -> torch.Tensor:
    if not (x.dtype == A.dtype == B.dtype):
        raise TypeError(
            f"the 'triton' LoRA backend needs x, A and B of one dtype (got {x.dtype}, {A.dtype}, {B.dtype}); "
            "cast x to the parameters' dtype first"
        )
    N, d_in, d_out = x.shape[0], x.shape[-1], B.shape[1]
    if indices is None:  # expert 0 for every slot (k = 1 for a 2-D x), as the dense fast path does
        k = 1 if x.dim() == 2 else x.shape[1]
        indices = torch.zeros(N, k, dtype=torch.long, device=x.device)
    k = indices.shape[1]
    shared = x.dim() == 2
    x2 = x.contiguous() if shared else x.reshape(N * k, d_in).contiguous()
    w_flat = None if weights is None else weights.reshape(N * k)
    if w_flat is not None and not w_flat.is_contiguous():
        w_flat = w_flat.contiguous()
    if N == 0:
        return x.new_zeros((N, d_out) if combine else (N, k, d_out))
    y = _WeightedLoraTriton.apply(
        x2, A.contiguous(), B.contiguous(), w_flat, indices.reshape(-1).long(), float(scaling), k, shared, combine,
    )
    return y if combine else y.view(N, k, d_out)
