"""Tensor-parallel Llama over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Megatron-style sharding of every :class:`~fastzoo.llama.model.TransformerBlock` over the
``world_size`` ranks of a process group:

* attention, by heads: ``wqkv`` column-parallel (each rank keeps the rows of its
  ``n_heads / N`` query heads and of its ``n_kv_heads / N`` key and value heads, re-fused
  as ``[q; k; v]``), ``wo`` row-parallel (the input columns of the rank's query heads);
* MLP: ``w13`` column-parallel (the rank's slice of ``w1`` *and* the matching slice of
  ``w3``, re-fused as ``[w1_r; w3_r]``), ``w2`` row-parallel;
* one all-reduce (sum) of the partial outputs after ``wo`` and one after ``w2``, traced by
  ``torch.compile``: the functional collective (NCCL / gloo) or, on GPUs that reach each other
  peer-to-peer, a one-shot all-reduce through symmetric memory (:func:`setup_allreduce_`,
  :mod:`fastzoo.llama._allreduce`);
* embedding, norms and the output projection replicated.

GQA: query head ``h`` uses key/value head ``h // (n_heads / n_kv_heads)``; giving rank ``r``
the query heads ``r·n_heads/N ..`` and the kv heads ``r·n_kv_heads/N ..`` keeps every
query head with its kv head, so ``n_kv_heads`` (and hence ``n_heads``) and
``intermediate_size`` must be divisible by ``N``.

The sharded model's ``config`` holds the *local* head counts and ``intermediate_size``
(``setup_caches`` sizes the KV cache from it); the full configuration stays in
``model.tp_config``.

Quantization composes by quantize-then-shard: a quantized checkpoint (int8 or int4 weight-only,
GPTQ included, written by ``python -m fastzoo.llama.quantize``) is loaded as the quantized
modules its config records, each rank taking its slices of the quantized tensors.  int8
(weight ``(N, K)``, per-output-channel scales ``(N,)``): column-parallel layers take their rows
of both, row-parallel layers their ``K`` columns of the weight and the full scales.  int4
(packed weight ``(N, K/2)``, scales and zeros ``(N, K/group)``): column-parallel layers take their
rows of all three, row-parallel layers whole groups of ``K`` (the local width must be a
multiple of the group size).  So every rank holds exactly the single-process quantized values
and TP equals the single-process quantized model up to the all-reduce's summation order.
``fastzoo.quant.quantize_`` on a sharded float model also works (random weights quantized on
the GPU; ``generate --speculate-k K --draft-quantize CONFIG`` under torchrun, whose draft is a
quantized copy of the rank's shard of the target): every tensor then equals the rank's slice of
the single-process quantization (each int4 group lies within one rank's input columns) except
int8's row-parallel ``wo`` / ``w2``, whose per-output-channel scales come from the rank's ``K / N``
input columns instead of all ``K``: close to, not equal to, the single-process quantization.

Library code here reads no environment variables; the ``torchrun`` launch lives in
:func:`run_cli` and is called from ``fastzoo.llama.generate``'s entry point.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ._allreduce import ALLREDUCE_CHOICES, DEFAULT_SYMM_MEM_BYTES
from ._allreduce import all_reduce as _all_reduce
from .config import LlamaConfig, LlamaError
from .model import Attention, FeedForward, Linear, Transformer

# the modules a projection may be when sharded: float, or the layouts of quantized checkpoints
_FLOAT_LINEARS = (nn.Linear, Linear)
_COLUMN_PARALLEL = ("attention.wqkv", "feed_forward.w13")
_ROW_PARALLEL = ("attention.wo", "feed_forward.w2")

__all__ = ["check_tp_config", "shard_config", "shard_tensor", "shard_state_dict", "shard_model_",
           "setup_allreduce_", "ALLREDUCE_CHOICES", "load_tp_model", "LockstepStop", "run_cli"]


# ---------------------------------------------------------------------------- the plan
def check_tp_config(config: LlamaConfig, world_size: int) -> None:
    """Raise :class:`LlamaError` unless ``config`` can be sharded over ``world_size`` ranks."""
    if world_size < 1:
        raise LlamaError(f"tensor-parallel world size must be >= 1, got {world_size}")
    problems = []
    if config.n_kv_heads % world_size or config.n_heads % world_size:
        problems.append(f"num_attention_heads {config.n_heads} and num_key_value_heads {config.n_kv_heads} "
                        f"must both be divisible by it")
    if config.intermediate_size % world_size:
        problems.append(f"intermediate_size {config.intermediate_size} must be divisible by it")
    if problems:
        # every count must divide by the number of ranks: the valid ones divide their gcd
        valid = math.gcd(config.n_heads, config.n_kv_heads, config.intermediate_size)
        raise LlamaError(f"cannot shard the model over {world_size} tensor-parallel ranks: "
                         + "; ".join(problems) + f" (use a number of ranks that divides {valid}, the greatest "
                         f"common divisor of the head counts and intermediate_size)")


def shard_config(config: LlamaConfig, world_size: int) -> LlamaConfig:
    """The per-rank configuration: local ``n_heads``, ``n_kv_heads`` and ``intermediate_size``."""
    check_tp_config(config, world_size)
    return dataclasses.replace(config, n_heads=config.n_heads // world_size,
                               n_kv_heads=config.n_kv_heads // world_size,
                               intermediate_size=config.intermediate_size // world_size,
                               rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
                               extra=dict(config.extra))


def _rows(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return t.narrow(0, start, size)


def _projection(name: str) -> tuple[str | None, str]:
    """``"layers.3.attention.wo.scales"`` → ``("attention.wo", "scales")``; ``(None, ...)`` outside the layers."""
    module, _, param = name.rpartition(".")
    parts = module.split(".", 2)
    return (parts[2] if len(parts) == 3 and parts[0] == "layers" else None), param


def _row_parallel_width(kind: str, config: LlamaConfig) -> int:
    """The full input width ``K`` of a row-parallel projection."""
    return config.n_heads * config.head_dim if kind == "attention.wo" else config.intermediate_size


def _column_unit(param: str, unit: int) -> str:
    """What one column of a row-parallel tensor holds, for errors (``unit`` input features)."""
    return f"int4 packing ({unit} values per byte)" if param == "weight" else f"group size {unit}"


def shard_tensor(name: str, t: torch.Tensor, config: LlamaConfig, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of the full (unsharded) state-dict entry ``name``: a view where the
    slice is one block of rows or columns, a small copy of the slices where parts are re-fused.

    Float and quantized entries alike: column-parallel projections (``wqkv``, ``w13``) slice the
    rows (output channels) of every tensor (weight, int8 per-channel scales, int4 scales and
    zeros); row-parallel ones (``wo``, ``w2``) slice the input columns of 2-D tensors in their
    own units (one column of a float / int8 weight, two of a packed int4 weight, one group of
    int4 scales and zeros) and keep 1-D per-output-channel scales whole."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size == 1:
        return t
    kind, param = _projection(name)
    if kind not in _COLUMN_PARALLEL + _ROW_PARALLEL:
        return t  # embedding, norms, output (float or quantized): replicated
    if param == "bias":
        raise LlamaError(f"{name}: projections with a bias are not supported by the tensor-parallel sharding")
    if kind in _COLUMN_PARALLEL:
        if kind == "attention.wqkv":
            hd = config.head_dim
            q, kv = config.n_heads * hd, config.n_kv_heads * hd
            lq, lkv = q // world_size, kv // world_size
            return torch.cat([_rows(t, rank * lq, lq), _rows(t, q + rank * lkv, lkv),
                              _rows(t, q + kv + rank * lkv, lkv)], dim=0)
        inter = config.intermediate_size
        li = inter // world_size
        return torch.cat([_rows(t, rank * li, li), _rows(t, inter + rank * li, li)], dim=0)
    if t.dim() == 1:
        return t  # per-output-channel (int8) scales: a split of K leaves them unchanged
    K = _row_parallel_width(kind, config)
    if t.dim() != 2 or K % t.shape[1]:
        raise LlamaError(f"cannot shard {name} of shape {tuple(t.shape)}: expected a 1-D per-channel tensor or "
                         f"a 2-D one whose columns divide the layer's {K} input features")
    unit = K // t.shape[1]  # input features per column of t
    local = K // world_size
    if local % unit:
        raise LlamaError(f"cannot shard {name} over {world_size} tensor-parallel ranks: the local input width "
                         f"{local} is not a multiple of the {_column_unit(param, unit)}")
    return t.narrow(1, rank * (local // unit), local // unit)


def shard_state_dict(sd: dict[str, torch.Tensor], config: LlamaConfig, rank: int, world_size: int,
                     device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s state dict from the full one (``config``: the full configuration).

    Each slice is copied to ``device`` / ``dtype`` on its own, so with a memory-mapped ``sd``
    a rank only materialises its own slices (and the replicated tensors)."""
    check_tp_config(config, world_size)
    out = {}
    for name, t in sd.items():
        s = shard_tensor(name, t, config, rank, world_size)
        s = s.to(device=device, dtype=dtype if (dtype is not None and s.is_floating_point()) else None)
        out[name] = s.contiguous()
    return out


# ---------------------------------------------------------------------------- modules
class TPAttention(Attention):
    """:class:`Attention` over this rank's heads; the partial ``wo`` outputs are summed over the group."""
    tp_group = None
    tp_symm = None  # set by setup_allreduce_: the symmetric-memory all-reduce's spec

    def forward(self, x, cos, sin, input_pos, mask, *, norm=None, residual=None):
        # the residual is added to the reduced sum (not fused into the row-parallel wo)
        return _all_reduce(super().forward(x, cos, sin, input_pos, mask, norm=norm), self.tp_group, self.tp_symm,
                           residual=residual)


class TPFeedForward(FeedForward):
    """:class:`FeedForward` over this rank's slice of the hidden units; ``w2``'s partial outputs summed."""
    tp_group = None
    tp_symm = None

    def forward(self, x, *, norm=None, residual=None):
        return _all_reduce(super().forward(x, norm=norm), self.tp_group, self.tp_symm, residual=residual)


def _sharded_linear(lin: nn.Module, name: str, in_features: int, out_features: int) -> nn.Module:
    """An empty projection of ``lin``'s type (float, int8 or int4 weight-only) with the local shape."""
    from fastzoo.quant.linear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
    kw = dict(bias=False, device=lin.weight.device)
    if type(lin) in _FLOAT_LINEARS:
        return type(lin)(in_features, out_features, dtype=lin.weight.dtype, **kw)
    if type(lin) in (Int8WeightOnlyLinear, Int8DynamicLinear):
        return type(lin)(in_features, out_features, dtype=lin.scales.dtype, **kw)
    if type(lin) is Int4WeightOnlyLinear:
        if in_features % lin.group_size:
            raise LlamaError(f"cannot shard {name} (int4, group size {lin.group_size}): its local input width "
                             f"{in_features} on each tensor-parallel rank is not a multiple of the group size "
                             f"(use fewer ranks or quantize with a smaller group size)")
        return Int4WeightOnlyLinear(in_features, out_features, group_size=lin.group_size, dtype=lin.scales.dtype, **kw)
    raise LlamaError(f"cannot shard {name}, a {type(lin).__name__}: tensor parallelism shards float linears and "
                     f"the int8 / int4 weight-only layers of fastzoo.llama.quantize checkpoints")


def _shard_linear_(parent: nn.Module, attr: str, name: str, config: LlamaConfig, rank: int, world_size: int):
    lin = getattr(parent, attr)
    if getattr(lin, "bias", None) is not None:
        raise LlamaError(f"{name} has a bias: not supported by the tensor-parallel sharding")
    kind = name.split(".", 2)[2]
    full_in, full_out = lin.in_features, lin.out_features
    if kind in _COLUMN_PARALLEL:
        shape = (full_in, full_out // world_size)
    else:
        shape = (full_in // world_size, full_out)
    new = _sharded_linear(lin, name, *shape)
    for key, cur in list(new.state_dict().items()):  # each tensor: the rank's slice of lin's
        t = shard_tensor(f"{name}.{key}", getattr(lin, key).detach(), config, rank, world_size).contiguous()
        if t.shape != cur.shape:
            raise LlamaError(f"{name}.{key}: the rank's slice has shape {tuple(t.shape)}, expected {tuple(cur.shape)}")
        old = getattr(lin, key)
        setattr(new, key, nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t)
    setattr(parent, attr, new)


def shard_model_(model: Transformer, rank: int, world_size: int, group=None) -> Transformer:
    """Shard ``model`` in place for rank ``rank`` of ``world_size`` (``group``: the tensor-parallel
    process group, default the world).  Usually applied to a model built on the meta device,
    before loading a sharded state dict (:func:`load_tp_model`); on a model with weights, the
    weights are sliced.  The projections may be float or quantized (int8 / int4 weight-only,
    as ``fastzoo.quant.quantize_`` makes them from a quantized checkpoint's config): quantize,
    then shard.  Raises :class:`LlamaError` if the head counts do not divide by ``world_size``
    or an int4 row-parallel layer's local width is not a multiple of its group size.
    Returns ``model``."""
    if getattr(model, "tp_world_size", 1) != 1:
        raise LlamaError("the model is already sharded")
    full = model.config
    local = shard_config(full, world_size)  # checks divisibility
    if not 0 <= rank < world_size:
        raise LlamaError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size > 1:
        for i, layer in enumerate(model.layers):
            att, ff = layer.attention, layer.feed_forward
            if att.kv_cache is not None:
                raise LlamaError("shard the model before setting up its KV caches")
            _shard_linear_(att, "wqkv", f"layers.{i}.attention.wqkv", full, rank, world_size)
            _shard_linear_(att, "wo", f"layers.{i}.attention.wo", full, rank, world_size)
            _shard_linear_(ff, "w13", f"layers.{i}.feed_forward.w13", full, rank, world_size)
            _shard_linear_(ff, "w2", f"layers.{i}.feed_forward.w2", full, rank, world_size)
            att.n_heads, att.n_kv_heads = local.n_heads, local.n_kv_heads
            ff.intermediate_size = local.intermediate_size
            # same state, plus the all-reduce in forward (float projections stay plain
            # nn.Linear children, so quantize_ can still swap them)
            att.__class__, ff.__class__ = TPAttention, TPFeedForward
            att.tp_group = ff.tp_group = group
    model.config = local
    model.tp_config = full
    model.tp_rank, model.tp_world_size, model.tp_group = rank, world_size, group
    return model


def setup_allreduce_(model: Transformer, allreduce: str = "auto", max_bytes: int = DEFAULT_SYMM_MEM_BYTES) -> str:
    """Choose the all-reduce of a sharded, loaded ``model`` and set it up; returns the choice:
    ``"lamport"`` (one kernel over symmetric memory, no barrier, the residual added in it),
    ``"symm_mem"`` (torch's one-shot symmetric-memory all-reduce), ``"nccl"`` (the process
    group's functional collective: NCCL on GPUs, gloo on CPUs) or ``"none"`` (one rank:
    nothing to reduce); :mod:`fastzoo.llama._allreduce` describes each.

    ``allreduce``: ``"auto"`` (symm_mem where available, else nccl), or one of the three (a
    :class:`LlamaError` naming what is missing where it is not available: CUDA, the torch op,
    Triton for lamport, peer-to-peer access between the group's GPUs, a bf16/fp32 model).  The
    symmetric-memory paths allocate and rendezvous their buffer (``max_bytes`` per message, per
    group and dtype) here, outside any traced step; larger messages (long prefills) use NCCL.
    Collective: every rank of the model's group calls it, before compiling the steps."""
    from ..ops._common import triton_available
    from ._allreduce import setup_lamport, setup_symm_mem, symm_mem_problem
    if allreduce not in ALLREDUCE_CHOICES:
        raise LlamaError(f"unknown all-reduce {allreduce!r}: expected one of {', '.join(ALLREDUCE_CHOICES)}")
    tp_modules = [m for m in model.modules() if isinstance(m, (TPAttention, TPFeedForward))]
    if getattr(model, "tp_world_size", 1) == 1 or not tp_modules:
        model.tp_allreduce = "none"
        return "none"
    group = model.tp_group
    weight = model.tok_embeddings.weight
    device, dtype = weight.device, weight.dtype
    choice = "nccl"
    if allreduce != "nccl":
        # collective: the same answer on every rank (lamport checks its own dtypes: fp16 too)
        problem = symm_mem_problem(device, group, None if allreduce == "lamport" else dtype)
        if problem is None and allreduce == "lamport":
            from ..ops.lamport_all_reduce import LAMPORT_DTYPES
            if dtype not in LAMPORT_DTYPES:  # the model's dtype: the same on every rank
                problem = f"the lamport all-reduce supports {', '.join(map(str, LAMPORT_DTYPES))}, the model's is {dtype}"
            elif not triton_available():  # one image on every rank of a host
                problem = "the lamport all-reduce needs Triton"
        if problem is None:
            choice = "lamport" if allreduce == "lamport" else "symm_mem"
        elif allreduce != "auto":
            raise LlamaError(f"the {allreduce} all-reduce was requested but is not available: {problem} "
                             f"(choose the nccl or auto all-reduce)")
    spec = None
    if choice == "symm_mem":
        spec = setup_symm_mem(group, device, dtype, max_bytes)
    elif choice == "lamport":
        spec = setup_lamport(group, device, dtype, max_bytes)
    for m in tp_modules:
        m.tp_symm = spec
    model.tp_allreduce = choice
    return choice


def load_tp_model(checkpoint_dir, rank: int, world_size: int, device="cpu", dtype=None,
                  group=None, allreduce: str = "auto") -> Transformer:
    """Rank ``rank``'s shard of an unsharded fastzoo checkpoint, float or quantized (the
    quantization its config.json records, as :func:`fastzoo.llama.load_model`), as an eval-mode model.

    Builds the model (with its quantized modules) on the meta device, shards it, then slices
    each tensor of the memory-mapped state dict, so a rank reads and materialises only its slices.
    ``allreduce``: see :func:`setup_allreduce_` (the choice made is ``model.tp_allreduce``)."""
    from fastzoo.checkpoint import CheckpointError, read_state_dict

    from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_state_dict, parse_dtype, quantization_of

    d = Path(checkpoint_dir)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise LlamaError(f"weights not found: {wpath} (convert a checkpoint with python -m fastzoo.llama.convert)")
    config = LlamaConfig.from_json(d / CONFIG_NAME)
    check_tp_config(config, world_size)
    qconfig = quantization_of(config)
    with torch.device("meta"):
        model = Transformer(config)
        if qconfig is not None:  # the recorded quantization: quantize, then shard
            from fastzoo.quant import quantize_
            quantize_(model, qconfig)
    shard_model_(model, rank, world_size, group)
    try:
        sd = read_state_dict(wpath)
    except CheckpointError as e:
        raise LlamaError(str(e)) from None
    dtype = parse_dtype(dtype) if dtype is not None else None
    local_sd = shard_state_dict(sd, config, rank, world_size, device=device, dtype=dtype)
    del sd
    where = f"{wpath} (rank {rank} of {world_size}" + (f"; config.json records the quantization {qconfig.name})"
                                                       if qconfig is not None else ")")
    check_state_dict(model, local_sd, where=where)
    model.load_state_dict(local_sd, strict=True, assign=True)
    setup_allreduce_(model, allreduce)
    return model.eval()


# ---------------------------------------------------------------------------- decode loop
class LockstepStop:
    """When a tensor-parallel decode loop stops, decided identically on every rank.

    Every step runs collectives, so all ranks must run the same number of steps.  A rank's
    own "all sequences finished" flag is not enough: ranks sample from replicated logits
    that may differ in the last bit (e.g. kernels autotuned differently per rank).  A check
    all-reduces (MIN) the flags over the group, so the loop ends only once every rank is
    done.  Like the single-process loop, the CPU checks every step and reads the flag at
    once; CUDA checks every ``check_every`` steps, copies the reduced flag into pinned
    memory and reads it at the *next* check, after waiting for that copy: the decision lags
    one interval but never depends on timing, and the host stays at most one interval
    ahead of the GPU."""

    def __init__(self, model: Transformer, device, check_every: int):
        self.group = getattr(model, "tp_group", None)
        self.cuda = torch.device(device).type == "cuda"
        self.every = check_every if self.cuda else 1
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda)
        self.event = None

    def __call__(self, step: int, done: torch.Tensor) -> bool:
        """``True`` when every rank should leave the loop before ``step`` (call at every step)."""
        if step % self.every:
            return False
        if self.cuda and self.event is not None:
            self.event.synchronize()  # the copy issued one interval ago
            if bool(self.flag[0]):
                return True
        f = done.all().to(torch.int32).view(1)
        dist.all_reduce(f, op=dist.ReduceOp.MIN, group=self.group)
        if not self.cuda:
            return bool(f[0])
        self.flag.copy_(f, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return False


# ---------------------------------------------------------------------------- torchrun CLI
def run_cli(run, args, rank: int, world_size: int, local_rank: int) -> int:
    """Run the generation CLI's ``run(args, loader)`` as rank ``rank`` of a ``torchrun`` job.

    Initialises the default process group from torchrun's rendezvous (NCCL on CUDA, gloo on
    CPU), puts each rank on its own GPU, makes every rank use the same sampling seed (rank 0's),
    loads the rank's shard and silences stdout/stderr on every rank but 0."""
    if args.interactive:
        raise LlamaError("--interactive is not supported under torchrun (tensor parallel): give --prompt")
    use_cuda = args.device != "cpu" and (args.device is not None or torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise LlamaError("--device cuda requested but no CUDA GPU is available")
        if torch.device(args.device or "cuda").index is None:
            args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(args.device))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        # every rank must sample the same tokens: share one seed
        dev = torch.device(args.device) if use_cuda else torch.device("cpu")
        seed = torch.tensor([args.seed if args.seed is not None else
                             int(torch.randint(0, 2**62, ()).item())], dtype=torch.int64, device=dev)
        dist.broadcast(seed, src=0)
        args.seed = int(seed.item())

        announced = False

        def loader(checkpoint_dir, device, dtype):  # the target's, and a --draft-checkpoint's
            nonlocal announced
            model = load_tp_model(checkpoint_dir, rank, world_size, device=device, dtype=dtype,
                                  allreduce=args.tp_allreduce)
            if not announced:
                print(f"tensor parallel: {world_size} ranks, {dist.get_backend()}, all-reduce: {model.tp_allreduce}"
                      + {"symm_mem": " (one-shot, symmetric memory, peer-to-peer)",
                         "lamport": " (one kernel, symmetric memory, peer-to-peer)"}.get(model.tp_allreduce, ""),
                      file=sys.stderr)
                announced = True
            return model

        if rank == 0:
            status = run(args, loader)
        else:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                    contextlib.redirect_stderr(devnull):
                try:
                    status = run(args, loader)
                except LlamaError:
                    return 1  # rank 0 reports it
        # every rank done before any closes its connections: a gloo rank that tore down while a
        # peer was still finishing was seen to abort ("terminate called") in CPU CI
        dist.barrier()
        return status
    finally:
        dist.destroy_process_group()
