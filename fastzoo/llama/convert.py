"""Convert Hugging Face or Meta Llama checkpoints into fastzoo's format.

    python -m fastzoo.llama.convert SRC OUT_DIR [--tokenizer PATH] [--dtype bf16]

SRC is either a Hugging Face ``transformers`` model directory (``config.json`` plus
``model.safetensors`` / ``pytorch_model.bin``, optionally sharded with an index JSON) or a
Meta download (``params.json`` plus ``consolidated.NN.pth``).  OUT_DIR receives
``model.pth``, ``config.json`` and ``tokenizer.model``.  The output is written into a
temporary directory next to OUT_DIR and renamed at the end, so a failed conversion leaves
nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastzoo.checkpoint import CheckpointError, read_state_dict

from .checkpoint import (CONFIG_NAME, FusingStateDict, check_state_dict, map_hf_key, parse_dtype,
                         permute_meta_to_hf, write_checkpoint_dir)
from .config import LlamaConfig, LlamaError
from .model import Transformer


# ---------------------------------------------------------------------------- HF
def _hf_weight_files(src: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise LlamaError(f"{index} names shard {missing[0]!r}, which is missing")
            return [src / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return [src / name]
    raise LlamaError(f"no weights found in {src} (expected model.safetensors, pytorch_model.bin or a sharded index)")


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    """A weights file (torch.save or safetensors, told apart by content), errors as LlamaError."""
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        raise LlamaError(str(e)) from None


def _iter_shard(path: Path):
    yield from _read_shard(path).items()


def convert_hf(src: Path, dtype=None, progress=True):
    config = LlamaConfig.from_json(src / CONFIG_NAME)
    fused = FusingStateDict()
    files = _hf_weight_files(src)
    for path in tqdm(files, desc="converting shards", unit="shard", disable=not progress):
        for key, t in _iter_shard(path):
            mapped = map_hf_key(key)
            if mapped is None:
                continue
            name, part = mapped
            fused.add(name, part, t.to(dtype) if dtype is not None else t)
    return config, fused.finish(config)


# ---------------------------------------------------------------------------- Meta
def _meta_config(params: dict, vocab_size: int) -> LlamaConfig:
    dim, n_heads = params["dim"], params["n_heads"]
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    tiktoken_vocab = vocab_size >= 128000
    return LlamaConfig.from_hf_config({
        "hidden_size": dim, "num_hidden_layers": params["n_layers"], "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads, "intermediate_size": hidden,
        "vocab_size": vocab_size, "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 10000.0), "rope_scaling": scaling,
        "max_position_embeddings": params.get("max_seq_len", 131072 if scaling else (8192 if tiktoken_vocab else 4096)),
        "bos_token_id": 128000 if tiktoken_vocab else 1, "eos_token_id": 128001 if tiktoken_vocab else 2,
    })


_META_COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")  # split along output rows in tensor-parallel shards
_META_ROW = ("wo", "w2")                                   # split along input columns


def _cat_meta_shards(key: str, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    name = key.split(".")[-2]
    if key.endswith("norm.weight"):
        return tensors[0]
    if name in _META_COLUMN:
        return torch.cat(tensors, dim=0)
    if name in _META_ROW:
        return torch.cat(tensors, dim=1)
    if name == "tok_embeddings":  # Llama 2 splits the embedding by columns, Llama 3 by rows
        return torch.cat(tensors, dim=0 if tensors[0].shape[1] == dim else 1)
    raise LlamaError(f"don't know how to merge shards of {key!r}")


_META_LAYER = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(wq|wk|wv|wo|w1|w2|w3)\.weight$")


def convert_meta(src: Path, dtype=None, progress=True):
    params = json.loads((src / "params.json").read_text())
    files = sorted(src.glob("consolidated.*.pth"))
    shards = [_read_shard(f) for f in files]
    keys = [k for k in shards[0] if not k.endswith("rope.freqs")]
    merged = {k: _cat_meta_shards(k, [s[k] for s in shards], params["dim"])
              for k in tqdm(keys, desc="merging shards", unit="tensor", disable=not progress or len(files) == 1)}
    config = _meta_config(params, merged["tok_embeddings.weight"].shape[0])
    fused = FusingStateDict()
    parts = {"wq": 0, "wk": 1, "wv": 2, "w1": 0, "w3": 1}
    for k, t in tqdm(merged.items(), desc="converting", unit="tensor", disable=not progress):
        if dtype is not None:
            t = t.to(dtype)
        m = _META_LAYER.match(k)
        if m:
            i, block, name = m.groups()
            if name == "wq":
                t = permute_meta_to_hf(t, config.n_heads)
            elif name == "wk":
                t = permute_meta_to_hf(t, config.n_kv_heads)
            fused_name = {"wq": "wqkv", "wk": "wqkv", "wv": "wqkv", "w1": "w13", "w3": "w13"}.get(name, name)
            fused.add(f"layers.{i}.{block}.{fused_name}.weight", parts.get(name), t)
        elif k in ("tok_embeddings.weight", "norm.weight", "output.weight") or re.match(
                r"^layers\.\d+\.(attention_norm|ffn_norm)\.weight$", k):
            fused.add(k, None, t)
        else:
            raise LlamaError(f"unexpected tensor {k!r} in the Meta checkpoint")
    return config, fused.finish(config)


# ---------------------------------------------------------------------------- driver
def find_tokenizer(src: Path) -> Path | None:
    for cand in (src / "tokenizer.model", src / "original" / "tokenizer.model", src.parent / "tokenizer.model"):
        if cand.is_file():
            return cand
    return None


def convert(src, out_dir, tokenizer=None, dtype=None, progress=True, force=False) -> Path:
    """Convert ``src`` (HF or Meta directory) into a fastzoo checkpoint at ``out_dir``."""
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise LlamaError(f"source checkpoint directory not found: {src}")
    if out.exists() and any(out.iterdir()) and not force:
        raise LlamaError(f"output directory {out} exists and is not empty (use --force to replace it)")
    tok = Path(tokenizer) if tokenizer else find_tokenizer(src)
    if tok is None or not tok.is_file():
        raise LlamaError(f"tokenizer file not found ({tok if tok else 'looked for tokenizer.model in ' + str(src)}); "
                         "pass --tokenizer PATH")
    dtype = parse_dtype(dtype) if dtype is not None else None
    if (src / "params.json").is_file() and list(src.glob("consolidated.*.pth")):
        config, sd = convert_meta(src, dtype, progress)
    elif (src / CONFIG_NAME).is_file():
        config, sd = convert_hf(src, dtype, progress)
    else:
        raise LlamaError(f"{src} is neither a Hugging Face checkpoint (config.json) nor a Meta one "
                         "(params.json + consolidated.*.pth)")
    with torch.device("meta"):
        model = Transformer(config)
    check_state_dict(model, sd, where=str(src))
    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    return write_checkpoint_dir(out, sd, config, tok)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastzoo.llama.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Hugging Face model directory or Meta checkpoint directory")
    p.add_argument("out_dir", help="output directory (fastzoo format)")
    p.add_argument("--tokenizer", help="tokenizer.model to copy (default: looked up next to SRC)")
    p.add_argument("--dtype", help="cast weights to this dtype (bf16, fp16, fp32); default: keep")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.out_dir, args.tokenizer, args.dtype, progress=not args.quiet, force=args.force)
    except (LlamaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
