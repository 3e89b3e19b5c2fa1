"""Perplexity of a Llama checkpoint on a text file (sliding window).

    python -m fastzoo.llama.eval --checkpoint DIR --text FILE [--max-seq-length 2048] [--stride 1024]

The text is tokenized with the checkpoint's tokenizer (BOS first).  The first window holds
the first ``--max-seq-length`` tokens; each next window scores the next ``--stride``
tokens (``stride < max_seq_length``) with the preceding tokens as context, so every token
is scored once and, past the first window, with at least ``max_seq_length − stride``
tokens of context.  Reports the mean negative log-likelihood per token, the
perplexity ``exp(NLL)`` and the number of scored tokens (all but the first).
The checkpoint may be quantized (its config records it); ``--quantize`` quantizes a
float checkpoint in memory first.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_model, resolve_run_args
from .config import LlamaError
from .model import Transformer


@dataclass
class PerplexityResult:
    nll_sum: float      # sum of -log p(token | context) over the scored tokens (nats)
    tokens: int         # scored tokens
    windows: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def windows(n_tokens: int, max_seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: tokens ``[begin, end)`` are fed and tokens
    ``[first_scored, end)`` scored; every token ``1..n_tokens-1`` is scored exactly once.

    The first window is ``[0, min(max_seq_length, n))``; each next one scores the next
    ``stride`` tokens and ends there, starting ``max_seq_length`` tokens earlier, so each
    scored token sees at least ``max_seq_length − stride`` tokens of context."""
    if max_seq_length < 2:
        raise LlamaError(f"max_seq_length must be >= 2, got {max_seq_length}")
    if not 1 <= stride < max_seq_length:
        raise LlamaError(f"stride must be in [1, max_seq_length - 1 = {max_seq_length - 1}], got {stride}")
    end = min(max_seq_length, n_tokens)
    out = [(0, end, 1)] if n_tokens > 1 else []
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        out.append((max(0, end - max_seq_length), end, first))
    return out


@torch.no_grad()
def perplexity(model: Transformer, tokens, max_seq_length: int = 2048, stride: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity of ``tokens`` (1-D ids) under ``model`` (run without KV caches)."""
    if model.has_caches:
        raise LlamaError("perplexity runs full forwards; call model.clear_caches() first")
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() < 2:
        raise LlamaError(f"need at least 2 tokens to compute a perplexity, got {tokens.numel()}")
    if max_seq_length > model.config.max_position_embeddings:
        raise LlamaError(f"max_seq_length {max_seq_length} exceeds the model's maximum "
                         f"{model.config.max_position_embeddings}")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise LlamaError(f"token ids must be in [0, {vocab})")
    stride = stride or max_seq_length // 2
    wins = windows(tokens.numel(), max_seq_length, stride)
    device = model.tok_embeddings.weight.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for begin, end, first in tqdm(wins, desc="perplexity", unit="window", disable=not progress):
        ids = tokens[begin:end].to(device)
        logits = model(ids[None])[0]  # [T, V]
        pred = logits[first - begin - 1:end - begin - 1].float()  # logits of positions predicting first..end-1
        total += F.cross_entropy(pred, ids[first - begin:], reduction="sum").double()
    return PerplexityResult(nll_sum=float(total), tokens=tokens.numel() - 1, windows=len(wins))


@torch.no_grad()
def continuation_logprob(model: Transformer, context: list[int], continuation: list[int],
                         max_seq_length: int | None = None) -> tuple[float, bool]:
    """``(log p(continuation | context), whether every continuation token is the argmax)``.

    The input is truncated on the left to ``max_seq_length`` (default: the model's maximum)
    tokens + 1; ``context`` must be non-empty (start it with BOS)."""
    if model.has_caches:
        raise LlamaError("continuation_logprob runs a full forward; call model.clear_caches() first")
    if not context or not continuation:
        raise LlamaError("context and continuation must each have at least one token")
    L = max_seq_length or model.config.max_position_embeddings
    ids = (list(context) + list(continuation))[-(L + 1):]
    n = len(continuation)
    if n > len(ids) - 1:
        raise LlamaError(f"continuation of {n} tokens does not fit a window of {L} tokens")
    device = model.tok_embeddings.weight.device
    x = torch.tensor(ids[:-1], dtype=torch.long, device=device)[None]
    logp = model(x)[0, -n:].float().log_softmax(dim=-1)
    target = torch.tensor(ids[-n:], dtype=torch.long, device=device)
    ll = logp.gather(-1, target[:, None]).sum()
    return float(ll), bool((logp.argmax(dim=-1) == target).all())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastzoo-llama-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file")
    p.add_argument("--max-seq-length", type=int, default=None, help="window length (default min(2048, model max))")
    p.add_argument("--stride", type=int, default=None, help="window start spacing (default max-seq-length / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--quantize", default=None, help="quantize a float checkpoint in memory (int8, int4-g128, ...)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--tokenizer", type=Path, help="default: CHECKPOINT/tokenizer.model")
    a = p.parse_args(argv)
    try:
        from .tokenizer import load_tokenizer
        if not a.text.is_file():
            raise LlamaError(f"text file not found: {a.text}")
        device, dtype, tok_path = resolve_run_args(a.checkpoint, a.device, a.dtype, a.tokenizer)
        model = load_model(a.checkpoint, device=device, dtype=dtype)
        if a.quantize:
            from fastzoo.quant import quantize_
            try:
                quantize_(model, a.quantize)
            except (ValueError, TypeError) as e:
                raise LlamaError(f"--quantize {a.quantize}: {e}") from None
        ids = load_tokenizer(tok_path).encode(a.text.read_text(encoding="utf-8"), bos=True)
        if a.max_tokens is not None:
            ids = ids[:a.max_tokens]
        L = a.max_seq_length or min(2048, model.config.max_position_embeddings)
        stride = a.stride or max(1, L // 2)
        res = perplexity(model, ids, L, stride)
    except LlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"perplexity: {res.perplexity:.4f}  (NLL {res.nll:.4f} nats/token over {res.tokens} tokens, "
          f"{res.windows} windows of <= {L} tokens, stride {stride})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
