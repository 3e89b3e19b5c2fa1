"""Quantize a fastzoo Llama checkpoint: int8 / int4 (round to nearest) or GPTQ int4.

    python -m fastzoo.llama.quantize --checkpoint DIR --mode int8 --out DIR_INT8
    python -m fastzoo.llama.quantize --checkpoint DIR --mode int4 --group-size 128 --out DIR_INT4
    python -m fastzoo.llama.quantize --checkpoint DIR --mode int4 --gptq --calibration text.txt --out DIR_GPTQ
    python -m fastzoo.llama.quantize --checkpoint DIR --mode int4 --gptq --calibration-ids ids.pt --out DIR_GPTQ

The output directory holds ``model.pth`` (the quantized state dict: int8 / packed uint8
weights, scales, zeros), the tokenizer, and ``config.json`` whose ``fastzoo_quantization``
field records the quantization (``{"mode": "int4", "group_size": 128, "method": "gptq", ...}``).
:func:`fastzoo.llama.load_model` (and so ``generate --checkpoint``) reads that field and
builds the quantized modules on the meta device before a strict ``assign=True`` load.
The output is written to a temporary directory and renamed at the end.

GPTQ runs layer by layer on ``--device``: the calibration activations go through one
decoder layer at a time (moved to the device, its Hessians collected, quantized, then run
again to produce the next layer's inputs, and moved back), so device memory stays near one
layer's weights plus the activations.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastzoo.quant import Int4WeightOnly, quantize_
from fastzoo.quant.gptq import GPTQ, gptq_quantize_block_
from fastzoo.quant.linear import INT4_GROUP_SIZES

from .checkpoint import QUANT_FIELD, TOKENIZER_NAME, load_model, parse_dtype
from .checkpoint import QUANT_MODES as MODES
from .checkpoint import quant_config_for, quantization_of, write_checkpoint_dir
from .config import LlamaConfig, LlamaError
from .model import Transformer, rope_cos_sin

def _check_divisible(model: Transformer, group_size: int):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.in_features % group_size:
            raise LlamaError(f"int4 group size {group_size} does not divide {name}'s {m.in_features} input "
                             f"features; choose one of {INT4_GROUP_SIZES} that does")


def _linear_units(model: Transformer):
    """(name, module) units quantized one at a time: each decoder layer, then the output head."""
    return [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)] + [("output", model.output)]


@torch.no_grad()
def quantize_model_(model: Transformer, config, device=None, progress: bool = True) -> Transformer:
    """Round-to-nearest ``quantize_`` one layer at a time on ``device`` (then back where it was)."""
    if isinstance(config, Int4WeightOnly):
        _check_divisible(model, config.group_size)
    for name, unit in tqdm(_linear_units(model), desc=f"quantizing ({config.name})", unit="layer",
                           disable=not progress):
        home = next(unit.parameters()).device
        if name == "output":
            q = config.quantize_linear(unit.to(device or home))
            model.output = q.to(home)
        else:
            quantize_(unit.to(device or home), config)
            unit.to(home)
    return model


def calibration_tokens(source, tokenizer=None, n_samples: int = 128, seq_len: int = 2048) -> torch.Tensor:
    """Calibration batch ``[n, T]`` (long) from a text file (tokenized with ``tokenizer``),
    a string, or token ids (a 1-D or 2-D tensor / list): consecutive chunks of ``seq_len``
    tokens, at most ``n_samples`` of them (one shorter chunk if the text is shorter)."""
    if isinstance(source, (str, Path)) and not isinstance(source, torch.Tensor):
        path = Path(source)
        if not path.is_file():
            raise LlamaError(f"calibration file not found: {path}")
        if tokenizer is None:
            raise LlamaError("a tokenizer is needed to tokenize the calibration text")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LlamaError(f"calibration file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             f"token ids go in a torch.save'd tensor (--calibration-ids)") from None
        ids = torch.tensor(tokenizer.encode(text, bos=True), dtype=torch.long)
    else:
        ids = torch.as_tensor(source, dtype=torch.long)
        if ids.dim() == 2:
            return ids[:n_samples]
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise LlamaError(f"calibration data has {ids.numel()} tokens; need at least 2")
    T = min(seq_len, ids.numel())
    n = min(n_samples, ids.numel() // T)
    return ids[:n * T].view(n, T)


@torch.no_grad()
def gptq_quantize_llama_(model: Transformer, tokens: torch.Tensor, config: GPTQ = GPTQ(), device=None,
                         batch_size: int = 1, progress: bool = True) -> Transformer:
    """GPTQ-quantize every linear of ``model`` in place, layer by layer on ``device``.

    ``tokens [n, T]``: calibration token ids.  Each decoder layer is moved to ``device``,
    run on the calibration activations (in batches of ``batch_size`` sequences) to collect
    the Hessians of ``wqkv``, ``wo``, ``w13``, ``w2``; those are GPTQ-quantized, the layer
    is run again to give the next layer's inputs, and it returns to its original device.
    The output head is quantized last from the final normed activations.
    """
    if model.has_caches:
        raise LlamaError("GPTQ runs the model without KV caches; call model.clear_caches() first")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise LlamaError(f"calibration tokens must be a non-empty [n, T] tensor, got shape {tuple(tokens.shape)}")
    vocab = model.config.vocab_size
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise LlamaError(f"calibration token ids must be in [0, {vocab}), found {int(tokens.min())}..{int(tokens.max())}")
    _check_divisible(model, config.group_size)
    device = torch.device(device) if device is not None else model.tok_embeddings.weight.device
    T = tokens.shape[1]
    emb = model.tok_embeddings
    home = emb.weight.device
    emb.to(device)
    xs = [emb(tokens[i:i + batch_size].to(device)) for i in range(0, tokens.shape[0], batch_size)]
    emb.to(home)
    pos = torch.arange(T, device=device)
    cos, sin = rope_cos_sin(model.config, pos[None, :])

    def run_layer(layer, x):
        return layer(x, cos, sin, pos[None, :].expand(x.shape[0], T), None)

    for layer in tqdm(model.layers, desc=f"GPTQ ({config.name})", unit="layer", disable=not progress):
        lhome = next(layer.parameters()).device
        layer.to(device)
        xs = gptq_quantize_block_(layer, xs, run_layer, config)
        layer.to(lhome)
    norm, ohome = model.norm, model.output.weight.device
    norm.to(device)
    head = torch.nn.ModuleDict({"output": model.output.to(device)})
    gptq_quantize_block_(head, [norm(x) for x in xs], lambda m, x: m["output"](x), config, propagate=False)
    model.output = head["output"].to(ohome)
    norm.to(home)
    return model


def save_quantized(model: Transformer, out_dir, tokenizer_path=None, record: dict | None = None,
                   force: bool = False) -> Path:
    """Write ``model`` (quantized) + ``config.json`` recording ``record`` (+ tokenizer) atomically."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise LlamaError(f"output directory {out} exists and is not empty (use --force to replace it)")
    if record is None or record.get("mode") not in MODES:
        raise LlamaError(f"the quantization record needs a mode in {MODES}, got {record}")
    cfg = LlamaConfig(**{**model.config.asdict(), "extra": {**model.config.extra, QUANT_FIELD: dict(record)}})
    return write_checkpoint_dir(out, model.state_dict(), cfg, tokenizer_path)


def quantize_checkpoint(checkpoint, out, mode: str, group_size: int | None = None, gptq: bool = False,
                        calibration=None, n_samples: int = 128, seq_len: int = 2048, device=None, dtype=None,
                        blocksize: int = 128, percdamp: float = 0.01, force: bool = False,
                        progress: bool = True) -> Path:
    """Library form of the CLI: load ``checkpoint``, quantize, write ``out``. ``calibration``
    (GPTQ): a text file (tokenized with the checkpoint's tokenizer) or token ids (a tensor or
    list, 1-D or ``[n, T]``)."""
    checkpoint = Path(checkpoint)
    qcfg = quant_config_for(mode, group_size)
    if gptq and mode != "int4":
        raise LlamaError("--gptq quantizes to int4: use it with --mode int4")
    if gptq and calibration is None:
        raise LlamaError("--gptq needs --calibration FILE (a text file) or --calibration-ids FILE (token ids)")
    if not gptq and calibration is not None:
        raise LlamaError("--calibration / --calibration-ids are only used with --gptq")
    out = Path(out)
    if out.resolve() == checkpoint.resolve():
        raise LlamaError("--out must differ from --checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LlamaError(f"output directory {out} exists and is not empty (use --force to replace it)")
    model = load_model(checkpoint, device="cpu", dtype=dtype)
    if quantization_of(model.config) is not None:
        raise LlamaError(f"{checkpoint} is already quantized ({model.config.extra[QUANT_FIELD]})")
    tok = checkpoint / TOKENIZER_NAME
    tok = tok if tok.is_file() else None
    record = {"mode": mode, "method": "gptq" if gptq else "rtn"}
    if mode == "int4":
        record["group_size"] = qcfg.group_size
    if gptq:
        text = isinstance(calibration, (str, Path))
        tokenizer = None
        if text:
            from .tokenizer import load_tokenizer
            if tok is None:
                raise LlamaError(f"tokenizer not found in {checkpoint}: needed to tokenize the calibration text")
            tokenizer = load_tokenizer(tok)
        ids = calibration_tokens(calibration, tokenizer, n_samples, seq_len)
        config = GPTQ(qcfg.group_size, blocksize, percdamp)
        gptq_quantize_llama_(model, ids, config, device=device, progress=progress)
        record.update(blocksize=blocksize, percdamp=percdamp, calibration_tokens=int(ids.numel()))
        if text:
            record["calibration_file"] = Path(calibration).name
    else:
        quantize_model_(model, qcfg, device=device, progress=progress)
    model.to("cpu")
    return save_quantized(model, out, tok, record, force=force)


def load_token_ids(path) -> torch.Tensor:
    """Token ids saved with ``torch.save``: an integer tensor, 1-D or ``[n, T]``."""
    path = Path(path)
    if not path.is_file():
        raise LlamaError(f"calibration token ids not found: {path}")
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise LlamaError(f"{path} is not a torch.save'd tensor of token ids ({type(e).__name__})") from None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dim() not in (1, 2):
        found = f"a {ids.dim()}-D {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LlamaError(f"{path}: expected an integer tensor of token ids, 1-D or [n, T]; found {found}")
    return ids.long()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastzoo-llama-quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="fastzoo checkpoint directory (float weights)")
    p.add_argument("--mode", required=True, help="int8 (per channel) or int4 (group-wise)")
    p.add_argument("--group-size", type=int, default=None, help=f"int4 group size {INT4_GROUP_SIZES} (default 128)")
    p.add_argument("--gptq", action="store_true", help="GPTQ instead of round-to-nearest (int4)")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--calibration", type=Path, help="GPTQ calibration text file")
    cal.add_argument("--calibration-ids", type=Path,
                     help="GPTQ calibration token ids: a torch.save'd integer tensor, 1-D or [n, T]")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--calibration-seq-len", type=int, default=2048)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default=None, help="where each layer is quantized (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="cast the float weights first (bf16 / fp16 / fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if a.calibration_samples < 1 or a.calibration_seq_len < 2:
            raise LlamaError("--calibration-samples must be >= 1 and --calibration-seq-len >= 2")
        dtype = parse_dtype(a.dtype) if a.dtype else None
        try:
            if a.gptq:
                GPTQ(a.group_size or 128, a.blocksize, a.percdamp)
        except ValueError as e:
            raise LlamaError(str(e)) from None
        calibration = a.calibration if a.calibration_ids is None else load_token_ids(a.calibration_ids)
        out = quantize_checkpoint(a.checkpoint, a.out, a.mode, a.group_size, a.gptq, calibration,
                                  a.calibration_samples, a.calibration_seq_len, device=device, dtype=dtype,
                                  blocksize=a.blocksize, percdamp=a.percdamp, force=a.force)
    except LlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
