"""One-kernel all-reduce over peer-mapped buffers (a "Lamport" all-reduce), plus a residual.

``out = residual + Σ_ranks x_rank`` for the small messages of a tensor-parallel decode step
(one token's hidden state: 8 KB for a 7B model), where a collective's cost is latency, not
bandwidth.  NCCL and the two-barrier one-shot all-reduce of symmetric memory pay at least two
NVLink round trips per call (a barrier before reading the peers, one after); this kernel pays
one one-way trip and needs no barrier:

* every rank owns a buffer of ``2 (halves) × world (slots) × capacity`` elements, mapped into
  every peer's address space (``torch.distributed._symmetric_memory``, the caller's business)
  and filled with a sentinel: the bits of ``-0.0``;
* **push**: rank ``r`` stores its ``x`` into slot ``r`` of the current half of *every* rank's
  buffer (its own included), with ``-0.0`` written as ``+0.0`` so that no value equals the
  sentinel;
* **reduce**: each rank spins on volatile loads of its own buffer's slots until no element is
  the sentinel (every peer's store has landed), sums the slots in rank order in fp32 (the same
  order on every rank: all ranks get the same bits), adds ``residual`` and writes ``out``;
* **clear**: it writes the sentinel back over what it read, and moves to the other half.

Why two halves suffice: a peer can be at most one call ahead (it cannot finish call ``i+1``
before this rank has pushed its part of call ``i+1``, which it does after finishing call
``i``), so the peer's pushes of call ``i+1`` land in the half this rank is not reading.
Which half a call uses is a per-program flag in device memory (read at the start,
flipped at the end by the program itself), so the kernel needs nothing from the host and
replays under CUDA graphs.  Element ``e`` is always handled by program ``e // BLOCK`` at the
same place in its slot, whatever the message size, so calls of different sizes keep every
program's flag and halves consistent across ranks.

All ranks must call it with the same sizes in the same order (SPMD).  Program ``j`` of a
rank waits only for program ``j`` of each peer, which pushes before it spins, so programs need
not all be resident at once; the grid is ``ceil(n / BLOCK)`` programs, at most
``capacity / BLOCK``.

``lamport_all_reduce_ref`` is the definition (given every rank's ``x``); the kernel is
``lamport_all_reduce_triton``.  The distributed op (buffers, rendezvous, the traced custom
op) is :mod:`fastzoo.llama._allreduce`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import gdc_launch_dependents, gdc_wait, next_pow2, pdl_options, triton_available

__all__ = ["lamport_all_reduce_ref", "lamport_all_reduce_triton", "LAMPORT_BLOCK", "LAMPORT_DTYPES",
           "lamport_sentinel_fill_"]

LAMPORT_BLOCK = 1024  # elements per program (16-byte vectors of 2-byte values over 4 warps)
# dtype -> the integer type of the same width the kernel compares to the sentinel
_INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
LAMPORT_DTYPES = tuple(_INT_OF)


def lamport_all_reduce_ref(xs: Sequence[torch.Tensor], residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + Σ xs`` in fp32 (``xs`` in rank order), rounded to ``xs[0]``'s dtype."""
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x in xs:
        acc += x.float()
    if residual is not None:
        acc += residual.float()
    return acc.to(xs[0].dtype)


def lamport_sentinel_fill_(buf: torch.Tensor) -> torch.Tensor:
    """Fill a lamport buffer (any float dtype of :data:`LAMPORT_DTYPES`) with the sentinel: ``-0.0``."""
    buf.view(_INT_OF[buf.dtype]).fill_(torch.iinfo(_INT_OF[buf.dtype]).min)
    return buf


if triton_available():
    import triton
    import triton.language as tl

    # rank not specialised: one compiled kernel serves every rank (a rank-specialised variant
    # loaded while a peer's kernel spins on the same GPU could wait for that GPU to idle)
    @triton.jit(do_not_specialize=["rank"])
    def _lamport_all_reduce_kernel(x_ptr, res_ptr, out_ptr, bufs_ptr, counters_ptr, n, rank,
                                   WORLD: tl.constexpr, WORLD_P2: tl.constexpr, CAPACITY: tl.constexpr,
                                   BLOCK: tl.constexpr, ITYPE: tl.constexpr, SENTINEL: tl.constexpr,
                                   HAS_RES: tl.constexpr, PUSH: tl.constexpr, REDUCE: tl.constexpr,
                                   PDL: tl.constexpr):
        if PDL:
            # the next kernel (a decode GEMV, launched with PDL) may start now and request its
            # first weight tiles while this one waits for the peers; it waits for these writes
            gdc_launch_dependents()
            gdc_wait()  # launched while the previous kernel drains: its writes (x) first
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        count = tl.load(counters_ptr + pid)  # 0 or 1: the half this program uses in this call
        half = (count & 1).to(tl.int64) * (WORLD * CAPACITY)
        if PUSH:
            bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ITYPE, bitcast=True)
            bits = tl.where(bits == SENTINEL, 0, bits)  # -0.0 -> +0.0: no value is the sentinel
            for p in tl.static_range(WORLD):
                peer = tl.load(bufs_ptr + p).to(tl.pointer_type(ITYPE))
                tl.store(peer + half + rank * CAPACITY + offs, bits, mask=mask)
        if REDUCE:
            mine = tl.load(bufs_ptr + rank).to(tl.pointer_type(ITYPE))
            slots = tl.arange(0, WORLD_P2)
            ptrs = mine + half + slots[:, None] * CAPACITY + offs[None, :]
            m2 = (slots[:, None] < WORLD) & mask[None, :]
            v = tl.load(ptrs, mask=m2, other=0, volatile=True)
            while tl.max(tl.where(v == SENTINEL, 1, 0)) > 0:  # a peer's store has not landed yet
                v = tl.load(ptrs, mask=m2, other=0, volatile=True)
            acc = tl.sum(v.to(out_ptr.dtype.element_ty, bitcast=True).to(tl.float32), axis=0)
            if HAS_RES:
                acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(ptrs, tl.full([WORLD_P2, BLOCK], SENTINEL, ITYPE), mask=m2)  # clear for the call after next
            tl.store(counters_ptr + pid, 1 - (count & 1))  # flips between 0 and 1: never overflows


_TL_INT = {torch.int16: "int16", torch.int32: "int32"}


def lamport_all_reduce_triton(x: torch.Tensor, residual: torch.Tensor | None, bufs: torch.Tensor,
                              counters: torch.Tensor, rank: int, world_size: int, capacity: int,
                              *, push: bool = True, reduce: bool = True) -> torch.Tensor:
    """Launch the kernel for this rank: ``x`` (contiguous, ≤ ``capacity`` elements, a dtype of
    :data:`LAMPORT_DTYPES`), ``bufs`` int64 ``[world_size]``: every rank's buffer address as
    mapped in this process (each buffer ``2 · world_size · capacity`` elements of ``x.dtype``,
    filled with the sentinel), ``counters`` int32 ``[capacity / LAMPORT_BLOCK]``: the
    per-program half flags (zeros at first).
    Returns ``out`` (``x``'s shape and dtype).  ``push`` / ``reduce`` = False run one phase
    only: the tests simulate several ranks in one process (push all, then reduce all)."""
    import triton.language as tl
    if x.dtype not in _INT_OF:
        raise ValueError(f"lamport_all_reduce: expected one of {LAMPORT_DTYPES}, got {x.dtype}")
    if not x.is_contiguous() or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)):
        raise ValueError(f"lamport_all_reduce: x must be contiguous and residual of its shape and dtype, got "
                         f"x {tuple(x.shape)} {x.dtype}, residual "
                         f"{None if residual is None else (tuple(residual.shape), residual.dtype)}")
    n = x.numel()
    if n > capacity or capacity % LAMPORT_BLOCK or counters.numel() < capacity // LAMPORT_BLOCK:
        raise ValueError(f"lamport_all_reduce: {n} elements for a capacity of {capacity} "
                         f"(a multiple of {LAMPORT_BLOCK}) and {counters.numel()} counters")
    out = torch.empty_like(x)
    if n == 0:
        return out
    itype = _INT_OF[x.dtype]
    res = residual.contiguous() if residual is not None else x
    grid = (triton.cdiv(n, LAMPORT_BLOCK),)
    _lamport_all_reduce_kernel[grid](
        x, res, out, bufs, counters, n, rank,
        WORLD=world_size, WORLD_P2=next_pow2(world_size), CAPACITY=capacity, BLOCK=LAMPORT_BLOCK,
        ITYPE=getattr(tl, _TL_INT[itype]), SENTINEL=torch.iinfo(itype).min,
        HAS_RES=residual is not None, PUSH=push, REDUCE=reduce, num_warps=4, **pdl_options(x))
    return out
