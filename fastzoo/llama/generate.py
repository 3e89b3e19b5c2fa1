"""Text generation for Llama-family models: library API and the ``fastzoo-generate`` CLI.

    python -m fastzoo.llama.generate --checkpoint DIR --prompt "Hello" [--prompt "Other"] ...

Design
------
* Prompts of different lengths are right-padded into one batch; every sequence has its
  own positions (``0..len-1`` for its prompt, then ``len, len+1, ...``) kept in a device
  tensor, and attention is masked per sequence from those positions (see
  :mod:`fastzoo.llama.model`).
* Prefill runs on the padded batch with the length rounded up to a power of two (at least
  32), so a compiled prefill (``dynamic=False``) is compiled once per bucket, not once
  per prompt length. At least 32 rows make every prefill a GEMM (cuBLAS): the decode
  kernels (at most 16 rows) are left to the decode steps, so a short prompt does not
  autotune them for its prefill too (start-up time); padding a memory-bound prefill is free.
* The decode step (one token for the whole batch, sampling and end-of-sequence
  bookkeeping included) has static shapes and is compiled with CUDA graphs.
* The decode loop never synchronises with the host: tokens, positions and the
  per-sequence "finished" flags stay on the device.  On CUDA, whether all sequences have
  finished is copied asynchronously into pinned host memory every few steps and read
  once the copy has landed (``Event.query``), so the loop ends a few steps after the last
  sequence hits a stop token without ever waiting for the GPU.  Only streaming (a
  callback) reads tokens back per step.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_model, resolve_run_args
from .config import LlamaError
from .model import Transformer
from ..utils import torchrun_env

MIN_PREFILL_BUCKET = 32  # > fastzoo.ops' decode-kernel rows (16): prefill is a GEMM


# ---------------------------------------------------------------------------- sampling
def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or not (temperature >= 0) or temperature != temperature:
        raise LlamaError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise LlamaError(f"top-k must be >= 1, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise LlamaError(f"top-p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> torch.Tensor:
    """Next token ``[B]`` from logits ``[B, V]``; greedy at temperature 0. Sync-free."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.shape[-1] and (top_p is None or top_p >= 1.0):
        # top-k alone: sample among the k candidates, not over the whole vocabulary — an
        # unsorted top-k (no sort kernel) and a softmax over k values instead of V; the
        # same distribution as logits_to_probs' masking (up to ties at the k-th value)
        values, indices = torch.topk(logits, top_k, dim=-1, sorted=False)
        pick = sample_probs((values.float() / temperature).softmax(dim=-1))
        return indices.gather(-1, pick[..., None]).squeeze(-1)
    return sample_probs(logits_to_probs(logits, temperature, top_k, top_p))


def sample_probs(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of (possibly unnormalised) ``probs [..., V]``, without a host sync."""
    # exponential-race sampling == multinomial
    q = torch.empty_like(probs).exponential_(1)
    return (probs / q).argmax(dim=-1)


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution (fp32, ``[..., V]``) of ``sample`` at ``temperature > 0``."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------- steps
def prefill_step(model: Transformer, tokens, lengths, temperature: float, top_k, top_p):
    """Run the padded prompts ``tokens [B, Tb]`` (positions 0..Tb-1); sample at ``lengths - 1``."""
    Tb = tokens.shape[1]
    logits = model(tokens, torch.arange(Tb, device=tokens.device), kv_len=Tb, logits_at=lengths - 1)
    return sample(logits, temperature, top_k, top_p)


def decode_step(model: Transformer, cur, pos, done, stop_ids, pad_id: int, temperature: float, top_k, top_p):
    """One token for every sequence: ``cur [B]`` at positions ``pos [B]`` → (next ``[B]``, done ``[B]``)."""
    logits = model(cur[:, None], pos[:, None])[:, -1]
    nxt = sample(logits, temperature, top_k, top_p)
    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
    done = done | (nxt[:, None] == stop_ids[None, :]).any(dim=-1)
    return nxt, done


def prefill_bucket(n: int, limit: int) -> int:
    b = MIN_PREFILL_BUCKET
    while b < n:
        b *= 2
    return min(b, limit)


@contextlib.contextmanager
def _recompile_limit(n: int):
    import torch._dynamo.config as dcfg
    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    with dcfg.patch(**{name: max(getattr(dcfg, name), n)}):
        yield


def _inductor_options(backend: str, cudagraphs: bool) -> dict | None:
    """``torch.compile`` options of the compiled steps (passed per call: no global inductor
    configuration changes); None for another backend (e.g. "eager", a trace-only check).
    The decode steps (``cudagraphs``) also get coordinate-descent tuning of their few
    inductor kernels; a prefill does not: its time is in GEMMs and attention, and tuning
    each of its many fused kernels would lengthen the start-up. The decode steps' inductor
    kernels also use programmatic dependent launch where this PyTorch offers it
    (``triton.enable_pdl``; inductor applies it on Hopper and newer only): like fastzoo's
    decode kernels they launch while the previous kernel drains and wait for it before
    touching what it wrote, so the RMSNorm / SwiGLU / residual-add kernels between the
    GEMVs no longer stop the stream: int4-g128 Llama-2-7B 367.7 -> 380.9 tok/s on an H100,
    int8 no gain (334.0 -> 332.0) (``llama_decode_inductor_pdl_ab.json``,
    ``..._int8_ab.json``). The speculative draft / verify steps (and so tensor-parallel
    decoding) get the same options; those were not timed with and without it."""
    if backend != "inductor":
        return None
    if not cudagraphs:
        return {}
    opts = {"coordinate_descent_tuning": True, "triton.cudagraphs": True}
    import torch._inductor.config as icfg
    if hasattr(icfg.triton, "enable_pdl"):
        opts["triton.enable_pdl"] = True
    return opts


def _decode_sdpa(compiled: bool):
    """Attention backend for compiled decode steps: the math path, which inductor fuses
    (the decode attention is tiny); nothing for eager runs."""
    if not compiled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


class _DoneFlag:
    """Tells the host whether every sequence is done without making it wait for the GPU.

    On CUDA, ``done.all()`` is copied asynchronously into pinned host memory every
    ``every`` steps and read once the copy has landed (``Event.query``); on the CPU it is
    read directly.  ``every=0``: never looks (the loop runs all its steps).
    """

    def __init__(self, device: torch.device, every: int):
        self.every, self.cuda = every, device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.bool, pin_memory=True) if (self.cuda and every) else None
        self.event = None

    def all_done(self, done: torch.Tensor, step: int) -> bool:
        if not self.every:
            return False
        if not self.cuda:
            return bool(done.all())
        if self.event is not None and self.event.query():  # the flag copy has landed
            if bool(self.flag[0]):  # host memory: no GPU sync
                return True
            self.event = None
        if self.event is None and step % self.every == 0:
            self.flag.copy_(done.all().view(1), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return False


def _stop_check(model: Transformer, device: torch.device, check_every: int):
    """``stop_now(step, done) -> bool`` for a decode loop: called before each step with the
    device-side ``done`` flags, true when the loop should end.

    One process: :class:`_DoneFlag` (never waits for the GPU).  Tensor parallel
    (``model.tp_world_size > 1``, :mod:`fastzoo.llama.tp`): every step runs collectives, so
    every rank must run the same number of steps; :class:`~fastzoo.llama.tp.LockstepStop`
    all-reduces the flags so the ranks agree.  ``check_every=0``: never stops early."""
    if check_every and getattr(model, "tp_world_size", 1) > 1:
        from .tp import LockstepStop
        return LockstepStop(model, device, check_every)
    flag = _DoneFlag(device, check_every)
    return lambda step, done: flag.all_done(done, step)


@dataclass
class DecodeState:
    """Device-side state between prefill and decode."""
    cur: torch.Tensor        # [B] last token
    pos: torch.Tensor        # [B] position of `cur`
    done: torch.Tensor       # [B] bool
    out: torch.Tensor        # [B, max_new_tokens] generated tokens (pad after a stop)
    stop: torch.Tensor       # stop token ids (device)
    sampling: tuple          # (temperature, top_k, top_p) of this request
    pad_id: int = 0
    n_written: int = 1


@dataclass
class GenerationOutput:
    tokens: list[list[int]]                 # generated ids per prompt, stop token excluded
    finished: list[bool]                    # stopped at a stop token
    prefill_s: float = 0.0                  # time to first token
    decode_s: float = 0.0
    steps: int = 0                          # decode steps run (after the first token)
    stats: dict = field(default_factory=dict)


def _timed_prefill(gen, prompts, max_new_tokens: int, timed: bool, **kw):
    """``gen.prefill`` between host-clock reads (synchronized on CUDA when ``timed``):
    ``(state, sync, t0, t1)``; ``sync`` is for the caller's end of decode."""
    sync = torch.cuda.synchronize if (timed and gen.device.type == "cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    state = gen.prefill(prompts, max_new_tokens, **kw)
    sync()
    return state, sync, t0, time.perf_counter()


class Generator:
    """Batched generation with a static KV cache; optionally compiled.

    ``compile=True``: the decode step is compiled with CUDA graphs (on CUDA) and the
    prefill with ``dynamic=False`` per power-of-two length bucket.  Inductor options are
    passed to ``torch.compile`` directly, so no global configuration is changed.
    """

    def __init__(self, model: Transformer, compile: bool = False, max_seq_length: int | None = None,
                 compile_backend: str = "inductor", kv_cache_dtype: torch.dtype | None = None,
                 compile_prefill: bool = True):
        if kv_cache_dtype not in (None, torch.int8):
            raise LlamaError(f"kv_cache_dtype must be None (the model's dtype) or torch.int8, got {kv_cache_dtype}")
        self.kv_cache_dtype = kv_cache_dtype
        self.model = model
        self.compile = compile
        self.fixed_seq_length = max_seq_length
        self.device = model.tok_embeddings.weight.device
        self._prefill = prefill_step
        self._decode = decode_step
        if compile:
            opts = _inductor_options(compile_backend, cudagraphs=False)
            dopts = _inductor_options(compile_backend, cudagraphs=self.device.type == "cuda")
            self._decode = torch.compile(decode_step, fullgraph=True, dynamic=False, options=dopts,
                                         backend=compile_backend)
            if compile_prefill:  # False: only the decode step is compiled (shorter start-up)
                self._prefill = torch.compile(prefill_step, fullgraph=True, dynamic=False, options=opts,
                                              backend=compile_backend)

    # -------------------------------------------------------------- set-up
    def _cache_length(self, max_prompt: int, max_new_tokens: int) -> int:
        cfg = self.model.config
        need = max_prompt + max_new_tokens
        if self.fixed_seq_length is not None:
            limit = self.fixed_seq_length
        else:
            limit = cfg.max_position_embeddings
        if need > limit:
            raise LlamaError(f"prompt of {max_prompt} tokens + {max_new_tokens} new tokens exceeds the maximum "
                             f"sequence length {limit}")
        if self.fixed_seq_length is not None:
            return self.fixed_seq_length
        # A power-of-two bucket (≥ the prefill bucket): the compiled steps specialise on the
        # cache's shape, so requests of similar length share one compilation, while decode
        # attention reads at most twice the slots it needs.
        return prefill_bucket(need, limit)

    def _ensure_caches(self, B: int, S: int):
        m = self.model
        int8 = self.kv_cache_dtype == torch.int8
        if (m.has_caches and m.max_seq_length == S and m.max_batch_size >= B
                and (m.layers[0].attention.kv_cache.k_cache.dtype == torch.int8) == int8):
            return
        m.setup_caches(B, S, dtype=m.tok_embeddings.weight.dtype, device=self.device,
                       kv_cache_dtype=self.kv_cache_dtype)

    # -------------------------------------------------------------- phases
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
                top_p=None, stop_ids=(), pad_id: int = 0) -> DecodeState:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LlamaError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise LlamaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        validate_sampling(temperature, top_k, top_p)
        vocab = self.model.config.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < vocab]
        if bad:
            raise LlamaError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
        B, lens = len(prompts), [len(p) for p in prompts]
        S = self._cache_length(max(lens), max_new_tokens)
        self._ensure_caches(B, S)
        Tb = min(prefill_bucket(max(lens), S), S)
        dev = self.device
        padded = torch.full((B, Tb), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = padded.to(dev)
        lengths = torch.tensor(lens, dtype=torch.long).to(dev)
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long).to(dev)
        with _recompile_limit(64):
            first = self._prefill(self.model, tokens, lengths, temperature, top_k, top_p)
        first = first.clone()
        done = (first[:, None] == stop[None, :]).any(dim=-1)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        out[:, 0] = first
        return DecodeState(cur=first, pos=lengths.clone(), done=done, out=out, stop=stop,
                           sampling=(temperature, top_k, top_p), pad_id=pad_id)

    @torch.no_grad()
    def decode(self, state: DecodeState, callback=None, check_every: int = 8) -> DecodeState:
        """Fill ``state.out`` up to ``max_new_tokens``; stop early once all sequences are done.

        ``callback(step, tokens[B])`` is called per step (streaming; it may sync).  With
        ``check_every=0`` the loop runs all steps and never looks at the flags.
        """
        temperature, top_k, top_p = state.sampling
        n = state.out.shape[1]
        cuda = state.out.device.type == "cuda"
        cur, pos, done = state.cur, state.pos, state.done
        if callback is not None:
            callback(0, cur)
        i = state.n_written
        stop_now = _stop_check(self.model, state.out.device, check_every)
        with self._sdpa(), _recompile_limit(64):
            while i < n:
                if stop_now(i, done):
                    break
                if self.compile and cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                nxt, new_done = self._decode(self.model, cur, pos, done, state.stop, state.pad_id,
                                             temperature, top_k, top_p)
                cur, done = nxt.clone(), new_done.clone()
                pos = pos + 1
                state.out[:, i] = cur
                if callback is not None:
                    callback(i, cur)
                i += 1
        state.cur, state.pos, state.done, state.n_written = cur, pos, done, i
        return state

    def _sdpa(self):
        return _decode_sdpa(self.compile)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
                 top_p=None, stop_ids=(), pad_id: int = 0, callback=None, check_every: int = 8,
                 timed: bool = True) -> GenerationOutput:
        state, sync, t0, t1 = _timed_prefill(self, prompts, max_new_tokens, timed, temperature=temperature,
                                             top_k=top_k, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
        self.decode(state, callback=callback, check_every=check_every)
        out = state.out.cpu()  # the one sync of the decode phase
        t2 = time.perf_counter()
        stops = set(stop_ids)
        tokens, finished = [], []
        for row in out[:, :state.n_written].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            tokens.append(row if cut is None else row[:cut])
            finished.append(cut is not None)
        return GenerationOutput(tokens=tokens, finished=finished, prefill_s=t1 - t0, decode_s=t2 - t1,
                                steps=state.n_written - 1)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, compile: bool = False,
             **kw) -> GenerationOutput:
    """One-shot convenience wrapper around :class:`Generator`."""
    return Generator(model, compile=compile).generate(prompts, max_new_tokens, **kw)


# ---------------------------------------------------------------------------- speculative decoding
def accept_draft(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor, greedy: bool):
    """Speculative-sampling acceptance (Leviathan et al. / Chen et al., 2023), batched, sync-free.

    p: the target's distributions ``[..., k+1, V]`` at the k draft positions and one past
       them (logits when ``greedy``); q: the draft's distributions ``[..., k, V]`` (unused
       when greedy); draft: the draft tokens ``[..., k]`` (drawn from q).

    Draft token i is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first
    rejection the token is resampled from ``norm(max(0, p_i − q_i))``, and if all k are
    accepted a bonus token is drawn from ``p_k``; so every emitted token follows the
    target's distribution.  Greedy: a draft token is accepted when it is the target's
    argmax, and the extra token is the target's argmax.

    Returns ``(n [...], tokens [..., k+1])``: n accepted draft tokens; ``tokens[..., :n]``
    are the accepted drafts and ``tokens[..., n]`` the resampled / bonus token (later
    entries are meaningless).
    """
    k = draft.shape[-1]
    if greedy:
        best = p.argmax(dim=-1)  # [..., k+1]
        accept = draft == best[..., :k]
    else:
        pd = p[..., :k, :].gather(-1, draft[..., None])[..., 0]
        qd = q.gather(-1, draft[..., None])[..., 0]
        accept = torch.rand_like(pd) * qd < pd  # u < p/q without dividing (q(d) > 0: d was drawn from q)
    n = accept.long().cumprod(dim=-1).sum(dim=-1)  # length of the accepted prefix
    if greedy:
        extra = best.gather(-1, n[..., None])[..., 0]
    else:
        V = p.shape[-1]
        q_ext = torch.cat([q, torch.zeros_like(q[..., :1, :])], dim=-2)  # row k: residual = p (bonus)
        row_idx = n[..., None, None].expand(*n.shape, 1, V)
        resid = (p - q_ext).clamp(min=0).gather(-2, row_idx)[..., 0, :]
        p_row = p.gather(-2, row_idx)[..., 0, :]
        # p_i == q_i leaves no residual, but then d_i is always accepted; guard against rounding
        resid = torch.where(resid.sum(dim=-1, keepdim=True) > 0, resid, p_row)
        extra = sample_probs(resid)  # unnormalised is fine for the exponential race
    toks = torch.cat([draft, torch.zeros_like(draft[..., :1])], dim=-1)
    idx = torch.arange(k + 1, device=draft.device)
    return n, torch.where(idx == n[..., None], extra[..., None], toks)


def draft_step(draft: Transformer, cur, pos, temperature: float, top_k, top_p):
    """One draft token: ``cur [1]`` at ``pos [1]`` → (token ``[1]``, its distribution ``[1, V]``,
    or None when greedy)."""
    logits = draft(cur[:, None], pos[:, None])[:, -1]
    if temperature == 0:
        return logits.argmax(dim=-1), None
    q = logits_to_probs(logits, temperature, top_k, top_p)
    return sample_probs(q), q


def verify_step(target: Transformer, seq, pos, q, temperature: float, top_k, top_p):
    """The target scores ``seq [1, k+1] = [cur, d_1..d_k]`` at positions ``pos..pos+k`` in one
    forward; :func:`accept_draft` decides (``q [1, k, V]``: the draft's distributions)."""
    k = seq.shape[1] - 1
    logits = target(seq, pos[:, None] + torch.arange(k + 1, device=pos.device))  # [1, k+1, V]
    greedy = temperature == 0
    p = logits if greedy else logits_to_probs(logits, temperature, top_k, top_p)
    return accept_draft(p, q, seq[:, 1:], greedy)


def speculative_round(target: Transformer, draft: Transformer, cur, pos, k: int, temperature: float, top_k, top_p,
                      draft_fn=draft_step, verify_fn=verify_step, mark_step=None):
    """One round at batch 1: ``cur [1]`` at position ``pos [1]`` (in neither cache yet).

    The draft proposes k tokens in k + 1 single-token steps (the last only writes its final
    proposal into the draft's cache), the target verifies.  Returns ``(n [1], tokens [1, k+1])``
    (see :func:`accept_draft`).  Cache slots written for rejected tokens hold stale keys and
    values, masked until they are overwritten.  ``draft_fn`` / ``verify_fn`` may be compiled
    versions of :func:`draft_step` / :func:`verify_step`; ``mark_step`` is called before each
    (CUDA-graph step boundaries: every output is cloned before the next call).
    """
    seq, qs, c = [cur], [], cur
    for i in range(k + 1):
        if mark_step is not None:
            mark_step()
        tok, q = draft_fn(draft, c, pos + i, temperature, top_k, top_p)
        if i == k:
            break
        c = tok.clone()
        seq.append(c)
        if q is not None:
            qs.append(q.clone())
    if mark_step is not None:
        mark_step()
    n, toks = verify_fn(target, torch.stack(seq, dim=1), pos, torch.stack(qs, dim=1) if qs else None,
                        temperature, top_k, top_p)
    return n.clone(), toks.clone()


class SpeculativeGenerator:
    """Speculative decoding at batch 1: a draft model proposes ``speculate_k`` tokens, the
    target verifies them in one forward; the output follows the target's distribution
    (greedy: exactly the target's greedy tokens, up to numerical ties).

    ``draft`` may be the target itself (then both share one KV cache) or any model with the
    same vocabulary, e.g. a quantized copy of the target.  With ``compile``, the draft step
    and the verify forward are two compiled graphs (CUDA graphs on CUDA), replayed k + 2
    times per round.  The loop stays on the device: counts, positions and acceptance
    statistics are device tensors; the host only learns that generation ended through
    :class:`_DoneFlag`.

    Tensor parallel (:mod:`fastzoo.llama.tp`): the target, and the draft if it is sharded too
    (:func:`~fastzoo.llama.tp.load_tp_model`, or a quantized copy of the sharded target), over
    the same process group; every rank runs the same rounds (the stop decision is all-reduced,
    :class:`~fastzoo.llama.tp.LockstepStop`) and samples the same tokens given the same seed,
    as plain tensor-parallel generation.  An unsharded draft is replicated on every rank.
    """

    def __init__(self, target: Transformer, draft: Transformer, speculate_k: int, compile: bool = False,
                 max_seq_length: int | None = None, compile_backend: str = "inductor",
                 kv_cache_dtype: torch.dtype | None = None, compile_prefill: bool = True):
        if speculate_k < 1:
            raise LlamaError(f"speculate_k must be >= 1, got {speculate_k}")
        if draft.config.vocab_size != target.config.vocab_size:
            raise LlamaError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                             f"({target.config.vocab_size})")
        if draft.tok_embeddings.weight.device != target.tok_embeddings.weight.device:
            raise LlamaError("the draft and target models must be on the same device")
        tp, draft_tp = getattr(target, "tp_world_size", 1), getattr(draft, "tp_world_size", 1)
        if draft_tp > 1 and (draft_tp != tp or draft.tp_group is not target.tp_group):
            raise LlamaError(f"the draft is sharded over {draft_tp} tensor-parallel ranks, the target over {tp}: "
                             f"shard both over the same process group (or replicate an unsharded draft)")
        self.k = speculate_k
        self.target, self.draft, self.compile = target, draft, compile
        self.target_gen = Generator(target, compile=compile and compile_prefill, max_seq_length=max_seq_length,
                                    compile_backend=compile_backend, kv_cache_dtype=kv_cache_dtype)
        self.draft_gen = None if draft is target else Generator(
            draft, compile=False, max_seq_length=max_seq_length, kv_cache_dtype=kv_cache_dtype)
        self.device = self.target_gen.device
        self._draft, self._verify, self._mark_step = draft_step, verify_step, None
        if compile:  # two graphs (draft step, verify), CUDA graphs on CUDA
            if self.device.type == "cuda":
                self._mark_step = torch.compiler.cudagraph_mark_step_begin
            opts = _inductor_options(compile_backend, cudagraphs=self.device.type == "cuda")
            self._draft = torch.compile(draft_step, fullgraph=True, dynamic=False, backend=compile_backend,
                                        options=opts)
            self._verify = torch.compile(verify_step, fullgraph=True, dynamic=False, backend=compile_backend,
                                         options=opts)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
                top_p=None, stop_ids=(), pad_id: int = 0) -> DecodeState:
        """Prefill target and draft; the state's ``out`` has room for the k + 1 tokens a round may add."""
        if len(prompts) != 1:
            raise LlamaError(f"speculative decoding supports batch 1 (one prompt), got {len(prompts)} prompts")
        extra = self.k + 1
        state = self.target_gen.prefill(prompts, max_new_tokens + extra, temperature=temperature, top_k=top_k,
                                        top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
        if self.draft_gen is not None:
            self.draft_gen.prefill(prompts, max_new_tokens + extra, temperature=0.0)  # fills the draft's cache
        return state

    @torch.no_grad()
    def decode(self, state: DecodeState, max_new_tokens: int, callback=None, check_every: int = 1):
        """Speculative rounds until ``max_new_tokens`` are kept or a stop token; sync-free
        without a callback.  Returns ``(count, accepted, rounds)`` device tensors."""
        k = self.k
        temperature, top_k, top_p = state.sampling
        out, stop = state.out, state.stop
        dump = out.shape[1] - 1  # never reached by kept tokens: discarded writes go there
        cur, pos = state.cur, state.pos
        count = torch.ones(1, dtype=torch.long, device=self.device)
        done = state.done | (count >= max_new_tokens)
        accepted = torch.zeros(1, dtype=torch.long, device=self.device)
        rounds = torch.zeros(1, dtype=torch.long, device=self.device)
        ar = torch.arange(k + 1, device=self.device)
        # the same number of rounds on every rank under tensor parallelism (LockstepStop)
        stop_now = _stop_check(self.target, self.device, max(check_every, 1))
        if callback is not None:
            callback(0, cur)
        with _decode_sdpa(self.compile), _recompile_limit(64):
            for r in range(max_new_tokens - 1):  # every live round keeps at least one token
                if stop_now(r, done):
                    break
                n, toks = speculative_round(self.target, self.draft, cur, pos, k, temperature, top_k, top_p,
                                            self._draft, self._verify, self._mark_step)
                live = ~done
                valid = (ar[None, :] <= n[:, None]) & live[:, None]
                out.scatter_(1, torch.where(valid, count[:, None] + ar[None, :], dump), toks)
                hit_stop = (valid & (toks[..., None] == stop).any(dim=-1)).any(dim=-1)
                step = (n + 1) * live
                if callback is not None:
                    c0 = int(count[0])  # streaming reads the tokens back (syncs)
                    for j in range(min(int(step[0]), max_new_tokens - c0)):
                        callback(c0 + j, toks[:, j])
                accepted += n * live
                rounds += live.long()
                count = count + step
                cur = torch.where(live, toks.gather(1, n[:, None])[:, 0], cur)
                new_done = done | hit_stop | (count >= max_new_tokens)
                # a finished sequence keeps its position: rounds run after it finished (the host
                # learns of it late on CUDA) rewrite the cache slots of its last round, so they
                # stay within the k + 1 slots reserved past max_new_tokens
                pos = torch.where(new_done, pos, pos + step)
                done = new_done
        return count, accepted, rounds

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
                 top_p=None, stop_ids=(), pad_id: int = 0, callback=None, check_every: int = 1,
                 timed: bool = True) -> GenerationOutput:
        """As :meth:`Generator.generate` (one prompt); ``stats`` holds the acceptance rate."""
        state, sync, t0, t1 = _timed_prefill(self, prompts, max_new_tokens, timed, temperature=temperature,
                                             top_k=top_k, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
        count, accepted, rounds = self.decode(state, max_new_tokens, callback=callback, check_every=check_every)
        res = state.out[:, :max_new_tokens].cpu()  # the sync of the decode phase
        n_written = min(int(count[0]), max_new_tokens)
        n_acc, n_rounds, k = int(accepted[0]), int(rounds[0]), self.k
        t2 = time.perf_counter()
        stops = set(stop_ids)
        row = res[0, :n_written].tolist()
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        stats = {"speculate_k": k, "rounds": n_rounds, "accepted": n_acc, "proposed": n_rounds * k,
                 "acceptance_rate": n_acc / (n_rounds * k) if n_rounds else float("nan"),
                 "tokens_per_round": (n_acc + n_rounds) / n_rounds if n_rounds else float("nan")}
        return GenerationOutput(tokens=[row if cut is None else row[:cut]], finished=[cut is not None],
                                prefill_s=t1 - t0, decode_s=t2 - t1, steps=n_written - 1, stats=stats)


# ---------------------------------------------------------------------------- CLI
class _Streamer:
    """Prints the decoded text of one sequence incrementally (handles multi-token characters)."""

    def __init__(self, tokenizer, stop_ids, out=None):
        self.tok, self.stop, self.out = tokenizer, set(stop_ids), out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def __call__(self, step, tokens):
        if self.stopped:
            return
        t = int(tokens[0])
        if t in self.stop:
            self.stopped = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # incomplete UTF-8 sequence: wait for the next token
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def _build_parser():
    p = argparse.ArgumentParser(prog="fastzoo-generate", description="Generate text with a Llama-family model.")
    p.add_argument("--checkpoint", required=True, type=Path, help="fastzoo checkpoint directory (see fastzoo.llama.convert)")
    p.add_argument("--prompt", action="append", help="prompt (repeat for a batch of different prompts)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model family's chat template")
    p.add_argument("--system", help="system message for --chat / --interactive")
    p.add_argument("--interactive", action="store_true", help="chat on the terminal")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--max-seq-length", type=int, help="KV-cache length (default: prompt + new tokens; "
                                                      "interactive: min(4096, model maximum))")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile prefill and decode (CUDA graphs)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer file (default: CHECKPOINT/tokenizer.model)")
    p.add_argument("--kv-cache-dtype", choices=["int8"], default=None,
                   help="int8: quantized KV cache with per-token, per-head scales (default: the model's dtype)")
    p.add_argument("--tp-allreduce", choices=["auto", "nccl", "symm_mem", "lamport"], default="auto",
                   help="tensor parallel (torchrun): the all-reduce; lamport = one kernel over NVLink peer-to-peer "
                        "through symmetric memory, no barrier; symm_mem = torch's one-shot symmetric-memory "
                        "all-reduce; auto = symm_mem where the GPUs allow it, else nccl (gloo on CPUs)")
    s = p.add_argument_group("speculative decoding (one prompt)")
    s.add_argument("--speculate-k", type=int, default=None, help="draft tokens proposed per round")
    s.add_argument("--draft-checkpoint", type=Path, help="draft model checkpoint (may be a quantized checkpoint)")
    s.add_argument("--draft-quantize", default=None,
                   help="quantize the draft with this fastzoo.quant config (int8, int4-g128, ...); without "
                        "--draft-checkpoint the draft is a quantized copy of the target")
    return p


def _check_args(p, a):
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {a.num_samples}")
    try:
        validate_sampling(a.temperature, a.top_k, a.top_p)
    except LlamaError as e:
        p.error(str(e).replace("top-k", "--top-k").replace("top-p", "--top-p").replace("temperature", "--temperature", 1))
    if not a.interactive and not a.prompt:
        p.error("give at least one --prompt (or --interactive)")
    if a.interactive and a.prompt and len(a.prompt) > 1:
        p.error("--interactive takes at most one --prompt")
    drafting = a.draft_checkpoint is not None or a.draft_quantize is not None
    if a.speculate_k is not None:
        if a.speculate_k < 1:
            p.error(f"--speculate-k must be >= 1, got {a.speculate_k}")
        if not drafting:
            p.error("--speculate-k needs a draft: --draft-checkpoint DIR and/or --draft-quantize CONFIG")
        if a.interactive or len(a.prompt) != 1:
            p.error("speculative decoding runs one --prompt (batch 1), not --interactive or several prompts")
    elif drafting:
        p.error("--draft-checkpoint / --draft-quantize need --speculate-k K")


def _print_stats(model, res: GenerationOutput, batch: int, device, file=None, label=""):
    file = file or sys.stderr
    weight_bytes = model.weight_bytes()
    total = sum(len(t) for t in res.tokens)
    steps_per_s = res.steps / res.decode_s if res.decode_s > 0 else float("nan")
    print(f"{label}time to first token: {res.prefill_s * 1e3:.1f} ms", file=file)
    print(f"{label}decode: {res.steps} steps in {res.decode_s:.2f} s, {steps_per_s:.2f} tokens/s per sequence, "
          f"{batch * steps_per_s:.2f} tokens/s total (batch {batch}); {total} tokens kept", file=file)
    print(f"{label}bandwidth achieved: {weight_bytes * steps_per_s / 1e9:.2f} GB/s "
          f"(model {weight_bytes / 1e9:.2f} GB × {steps_per_s:.2f} steps/s)", file=file)
    if device.type == "cuda":
        print(f"{label}peak memory: {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB", file=file)


def main(argv=None) -> int:
    p = _build_parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    try:
        tp = torchrun_env()  # tensor parallel (fastzoo.llama.tp) when launched by torchrun
        if tp is not None:
            from .tp import run_cli
            return run_cli(_run, a, *tp)
        return _run(a)
    except LlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(a, load=load_model) -> int:
    from .tokenizer import load_tokenizer
    if not a.checkpoint.is_dir():
        raise LlamaError(f"checkpoint directory not found: {a.checkpoint}")
    device, dtype, tok_path = resolve_run_args(a.checkpoint, a.device, a.dtype, a.tokenizer)
    tokenizer = load_tokenizer(tok_path)
    model = load(a.checkpoint, device=device, dtype=dtype)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LlamaError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{cfg.vocab_size}: wrong tokenizer for this checkpoint?")
    if a.seed is not None:
        torch.manual_seed(a.seed)
    stop_ids = sorted(set(tokenizer.stop_ids) | set(cfg.eos_ids))
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, stop_ids=stop_ids, pad_id=tokenizer.pad_id)
    if a.max_seq_length is not None and a.max_seq_length > cfg.max_position_embeddings:
        raise LlamaError(f"--max-seq-length {a.max_seq_length} exceeds the model's maximum "
                         f"{cfg.max_position_embeddings}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    kv_dtype = torch.int8 if a.kv_cache_dtype == "int8" else None
    if a.interactive:
        S = a.max_seq_length or min(4096, cfg.max_position_embeddings)
        gen = Generator(model, compile=a.compile, max_seq_length=S, kv_cache_dtype=kv_dtype)
        return _interactive(gen, tokenizer, a, kw, device)

    if a.speculate_k is not None:
        gen = SpeculativeGenerator(model, _load_draft(a, model, load, device, dtype), a.speculate_k,
                                   compile=a.compile, max_seq_length=a.max_seq_length, kv_cache_dtype=kv_dtype)
    else:
        gen = Generator(model, compile=a.compile, max_seq_length=a.max_seq_length, kv_cache_dtype=kv_dtype)

    def encode(text):
        if a.chat:
            msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": text}]
            return tokenizer.encode_chat(msgs)
        return tokenizer.encode(text, bos=True)

    prompts = [encode(t) for t in a.prompt]
    for s in range(a.num_samples):
        streamer = None
        if len(prompts) == 1:
            streamer = _Streamer(tokenizer, stop_ids)
            sys.stdout.write(a.prompt[0])
            sys.stdout.flush()
        t0 = time.perf_counter()
        res = gen.generate(prompts, a.max_new_tokens, callback=streamer, **kw)
        if streamer is not None:
            sys.stdout.write("\n")
        else:
            for i, (text, toks) in enumerate(zip(a.prompt, res.tokens)):
                print(f"--- [{i}] {text}{tokenizer.decode(toks)}")
        sys.stdout.flush()
        label = f"[sample {s}] " if a.num_samples > 1 else ""
        if a.compile and s == 0:
            print(f"{label}first run (includes compilation): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        _print_stats(model, res, len(prompts), device, label=label)
        if "acceptance_rate" in res.stats:
            st = res.stats
            print(f"{label}speculative: acceptance rate {st['acceptance_rate']:.1%} ({st['accepted']}/{st['proposed']} "
                  f"draft tokens, k={st['speculate_k']}), {st['tokens_per_round']:.2f} tokens per target forward",
                  file=sys.stderr)
    return 0


def _load_draft(a, target, load, device, dtype):
    """The draft of --draft-checkpoint (quantized or not, as its config records) and/or --draft-quantize.

    Under torchrun ``load`` is the tensor-parallel loader, so the draft is sharded like the
    target; --draft-quantize then quantizes the rank's shard (see :mod:`fastzoo.llama.tp`: the
    single-process quantization except int8's per-channel scales of the row-parallel ``wo`` /
    ``w2``, taken over the rank's input columns; the draft changes the acceptance rate only)."""
    import copy
    from fastzoo.quant import quantize_
    if a.draft_checkpoint is not None:
        if not a.draft_checkpoint.is_dir():
            raise LlamaError(f"draft checkpoint directory not found: {a.draft_checkpoint}")
        draft = load(a.draft_checkpoint, device=device, dtype=dtype)
    else:  # under tensor parallelism a copy of the rank's shard, sharing the process group
        group = getattr(target, "tp_group", None)
        draft = copy.deepcopy(target, memo={} if group is None else {id(group): group})
    if a.draft_quantize is not None:
        if not any(isinstance(m, torch.nn.Linear) for m in draft.modules()):
            raise LlamaError(f"--draft-quantize {a.draft_quantize}: the draft is already quantized "
                             f"({'its checkpoint' if a.draft_checkpoint else 'the target checkpoint'} is)")
        try:
            quantize_(draft, a.draft_quantize)
        except (ValueError, TypeError) as e:
            raise LlamaError(f"--draft-quantize {a.draft_quantize}: {e}") from None
    return draft


def _interactive(gen: Generator, tokenizer, a, kw, device) -> int:
    messages = [{"role": "system", "content": a.system}] if a.system else []
    first = a.prompt[0] if a.prompt else None
    while True:
        if first is not None:
            user, first = first, None
            print(f"> {user}")
        else:
            try:
                user = input("> ")
            except EOFError:
                print()
                return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        messages.append({"role": "user", "content": user})
        ids = tokenizer.encode_chat(messages)
        room = gen.fixed_seq_length - len(ids)
        if room < 1:
            raise LlamaError(f"the conversation ({len(ids)} tokens) no longer fits the maximum sequence length "
                             f"{gen.fixed_seq_length}")
        streamer = _Streamer(tokenizer, kw["stop_ids"])
        res = gen.generate([ids], min(a.max_new_tokens, room), callback=streamer, **kw)
        print()
        messages.append({"role": "assistant", "content": tokenizer.decode(res.tokens[0])})
        _print_stats(gen.model, res, 1, device)


if __name__ == "__main__":
    sys.exit(main())
