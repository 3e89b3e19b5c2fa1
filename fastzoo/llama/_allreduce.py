"""The all-reduce of tensor-parallel Llama (:mod:`fastzoo.llama.tp`): NCCL or symmetric memory.

Two implementations of the sum over the ranks of a group, chosen once per model by
:func:`fastzoo.llama.tp.setup_allreduce_`:

* ``"nccl"``: ``torch.distributed._functional_collectives.all_reduce`` on the process group
  (NCCL on GPUs, gloo on CPUs), traced by ``torch.compile``;
* ``"symm_mem"``: a one-shot all-reduce over NVLink peer-to-peer loads through PyTorch's
  symmetric memory (``torch.ops.symm_mem.one_shot_all_reduce_copy``): each rank copies its
  partial sum into a persistent symmetric buffer, a barrier on the signal pads, then every
  rank reads all peers' buffers and sums them into a fresh output.  For the small messages
  of a decode step (one token's hidden state: 8 KB for a 7B model) this is latency-bound,
  where NCCL's ring/tree protocols cost tens of µs.  It uses only peer-to-peer mappings
  (no NVLink multicast / NVLS, no ``multimem`` instructions) and the ``"CUDA"`` symmetric-
  memory backend (no NVSHMEM).

The symmetric buffer (one per group, dtype and device) is allocated and rendezvoused at set-up,
never inside a traced or captured step, so its address is fixed across CUDA-graph replays.
The traced step calls :func:`symm_mem_all_reduce` (``torch.ops.fastzoo.symm_mem_all_reduce``),
a custom op with a fake implementation: ``torch.compile(fullgraph=True)`` keeps it as one
opaque call, and its kernel (copy, barrier, reduce, barrier) does no host synchronisation.
* ``"lamport"``: one kernel, no barrier (:mod:`fastzoo.ops.lamport_all_reduce`): each rank
  pushes its partial sum into a slot of every peer's symmetric buffer, then spins on its own
  buffer until every slot holds a value (the buffers are filled with a sentinel, ``-0.0``,
  which no pushed value equals), sums the slots, adds the residual and clears them.  One
  one-way NVLink trip per call instead of the one-shot's two barriers, and the residual add
  and the staging copy are in the same kernel.

Which implementation a call uses is decided at trace time from static facts (dtype, size):
a message larger than the buffer goes through NCCL.
"""
from __future__ import annotations

import socket
import warnings

import torch
import torch.distributed as dist

__all__ = ["ALLREDUCE_CHOICES", "SYMM_MEM_DTYPES", "DEFAULT_SYMM_MEM_BYTES", "SymmMemSpec", "symm_mem_backend",
           "symm_mem_problem", "setup_symm_mem", "symm_mem_all_reduce", "setup_lamport", "lamport_all_reduce",
           "all_reduce"]

ALLREDUCE_CHOICES = ("auto", "nccl", "symm_mem", "lamport")
SYMM_MEM_OP = "one_shot_all_reduce_copy"
# dtypes the one-shot kernel is built for (torch's CUDA symmetric-memory ops dispatch bf16 and fp32)
SYMM_MEM_DTYPES = (torch.bfloat16, torch.float32)
# symmetric buffer per (group, dtype, device): 256 KiB = 32 tokens of a 4096-wide bf16 hidden
# state; larger messages (prefill) go through NCCL, where one-shot loses its edge anyway
DEFAULT_SYMM_MEM_BYTES = 256 * 1024

# (group name, dtype, device index) -> the rendezvoused symmetric buffer (1-D)
_BUFFERS: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}


# ``(kind, group_name, dtype, max_numel)``, kind "symm_mem" or "lamport": what a traced
# all-reduce needs to choose its implementation (a plain tuple of constants on the module, so
# torch.compile specialises on it)
SymmMemSpec = tuple

# (group name, dtype, device index) -> _Lamport: the lamport all-reduce's buffers and counters
_LAMPORT: dict = {}


def _op_available() -> str | None:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no torch.distributed._symmetric_memory ({e})"
    if not hasattr(torch.ops.symm_mem, SYMM_MEM_OP):
        return f"torch {torch.__version__} has no torch.ops.symm_mem.{SYMM_MEM_OP}"
    return None


def symm_mem_problem(device, group, dtype: torch.dtype | None = None) -> str | None:
    """Why the symm_mem all-reduce cannot run for this rank's ``device`` in ``group`` (and
    activations of ``dtype``, when given), or None.

    Collective: every rank of ``group`` must call it; all ranks return the same answer (the
    first rank's problem).  Checks CUDA, the torch op, the dtype, one host, and peer access
    between every pair of the group's GPUs (the one-shot kernel loads peers' memory directly)."""
    device = torch.device(device)
    local = None
    if dtype is not None and dtype not in SYMM_MEM_DTYPES:
        local = (f"the symm_mem all-reduce supports {', '.join(map(str, SYMM_MEM_DTYPES))} activations, "
                 f"the model's are {dtype}")
    elif device.type != "cuda":
        local = f"the symm_mem all-reduce needs CUDA GPUs, the model is on {device.type}"
    else:
        local = _op_available()
    index = device.index if device.type == "cuda" else None
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    world = dist.get_world_size(group)
    infos = [None] * world
    dist.all_gather_object(infos, (socket.gethostname(), index), group=group)
    if local is None:
        hosts = {h for h, _ in infos}
        if len(hosts) > 1:
            local = f"the symm_mem all-reduce needs all ranks on one host, found {sorted(hosts)}"
        else:
            unseen = [i for _, i in infos if i >= torch.cuda.device_count()]
            no_peer = [i for _, i in infos if i != index and i not in unseen
                       and not torch.cuda.can_device_access_peer(index, i)]
            if unseen:
                local = f"GPU(s) {unseen} of other ranks are not visible to this rank (CUDA_VISIBLE_DEVICES)"
            elif no_peer:
                local = f"GPU {index} cannot access GPU(s) {no_peer} peer-to-peer (no NVLink / P2P)"
    problems = [None] * world
    dist.all_gather_object(problems, local, group=group)
    for r, p in enumerate(problems):
        if p is not None:
            return f"rank {r}: {p}"
    return None


def _group_name(group) -> str:
    return str((group if group is not None else dist.group.WORLD).group_name)


def _setup_args(kind: str, dtypes, group, device, dtype: torch.dtype):
    """A set-up's checked dtype, and its device (with an index), group name and item size."""
    from .config import LlamaError
    if dtype not in dtypes:
        raise LlamaError(f"the {kind} all-reduce supports {[str(d) for d in dtypes]}, "
                         f"the model's activations are {dtype}")
    return _cuda_device(device), _group_name(group), torch.empty((), dtype=dtype).element_size()


def _cuda_device(device) -> torch.device:
    device = torch.device(device)
    if device.index is None:  # the key the ops look up is the tensors' device index
        device = torch.device(device.type, torch.cuda.current_device())
    return device


def _symmetric_empty(name: str, numel: int, dtype: torch.dtype, device: torch.device):
    """A 1-D symmetric-memory tensor of ``numel`` elements, rendezvoused over group ``name``,
    and its handle (peers' addresses).  Collective and host-blocking: at set-up, never in a step."""
    import torch.distributed._symmetric_memory as symm_mem
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed by older torch, a deprecated no-op-like registration in newer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(name)
    if symm_mem_backend(device) not in (None, "CUDA"):
        try:  # peer-to-peer CUDA mappings, no NVSHMEM: possible until the first symmetric allocation
            symm_mem.set_backend("CUDA")
        except RuntimeError:
            pass  # another backend already allocated in this process: use it (recorded by the callers)
    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    return buf, symm_mem.rendezvous(buf, name)


def _check_setup(kind: str, reduce, group, dtype, device) -> None:
    """First use outside any CUDA-graph capture, and a check of the result."""
    from .config import LlamaError
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    x = torch.full((2, 8), float(rank + 1), dtype=dtype, device=device)
    got = reduce(x)
    want = world * (world + 1) / 2
    if not bool((got == want).all()):
        raise LlamaError(f"the {kind} all-reduce check failed on rank {rank}: expected {want}, "
                         f"got {got.flatten()[:4].tolist()}")


def setup_symm_mem(group, device, dtype: torch.dtype, max_bytes: int = DEFAULT_SYMM_MEM_BYTES) -> SymmMemSpec:
    """Allocate and rendezvous the symmetric buffer of ``group`` for ``dtype`` on ``device``
    (once; later calls reuse it), check one all-reduce against the expected sum, and return
    the spec the traced modules keep.  Collective; call :func:`symm_mem_problem` first."""
    device, name, itemsize = _setup_args("symm_mem", SYMM_MEM_DTYPES, group, device, dtype)
    numel = max(max_bytes // itemsize // 8 * 8, 8)  # whole 16-byte vectors
    key = (name, dtype, device.index)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS[key] = buf = _symmetric_empty(name, numel, dtype, device)[0]
    _check_setup("symm_mem", lambda x: symm_mem_all_reduce(x, name), group, dtype, device)
    return ("symm_mem", name, dtype, buf.numel())


class _Lamport:
    """One group's lamport state on one device: its buffer (sentinel-filled here; kept alive),
    every rank's buffer address as mapped here (int64, on the device) and the per-program half
    flags (int32 zeros, the kernel's ``counters``)."""

    def __init__(self, buf, addresses, rank, world_size, capacity):
        from ..ops.lamport_all_reduce import LAMPORT_BLOCK, lamport_sentinel_fill_
        self.buf = lamport_sentinel_fill_(buf)
        self.ptrs = torch.tensor(addresses, dtype=torch.int64, device=buf.device)
        self.counters = torch.zeros(capacity // LAMPORT_BLOCK, dtype=torch.int32, device=buf.device)
        self.rank, self.world_size, self.capacity = rank, world_size, capacity


def _lamport_capacity(max_bytes: int, itemsize: int) -> int:
    """Elements per slot for messages of ``max_bytes``: whole kernel blocks, rounded up."""
    from ..ops.lamport_all_reduce import LAMPORT_BLOCK
    return -(-max(max_bytes // itemsize, 1) // LAMPORT_BLOCK) * LAMPORT_BLOCK


def setup_lamport(group, device, dtype: torch.dtype, max_bytes: int = DEFAULT_SYMM_MEM_BYTES) -> SymmMemSpec:
    """Set up the lamport all-reduce of ``group`` for ``dtype`` on ``device``: a symmetric
    buffer of two halves of ``world_size`` slots of ``max_bytes`` each (rounded to whole
    kernel blocks), filled with the sentinel on every rank before any rank may push; checks
    one all-reduce and returns the spec the traced modules keep.  Collective."""
    from ..ops.lamport_all_reduce import LAMPORT_DTYPES
    from .config import LlamaError
    device, name, itemsize = _setup_args("lamport", LAMPORT_DTYPES, group, device, dtype)
    capacity = _lamport_capacity(max_bytes, itemsize)
    key = (name, dtype, device.index)
    state = _LAMPORT.get(key)
    if state is not None and state.capacity < capacity:
        # CUDA graphs captured since the first set-up hold the old buffer's addresses: never replace it
        raise LlamaError(f"the lamport all-reduce of group {name!r} on {device} was set up for messages of "
                         f"{state.capacity} elements; {capacity} were asked for later (set it up once, with "
                         f"the largest size)")
    if state is None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        buf, handle = _symmetric_empty(name, 2 * world * capacity, dtype, device)
        offset = buf.data_ptr() - handle.buffer_ptrs[rank]  # where the tensor lies in each rank's allocation
        state = _Lamport(buf, [p + offset for p in handle.buffer_ptrs], rank, world, capacity)
        torch.cuda.synchronize(device)
        dist.barrier(group=group, device_ids=[device.index])  # every buffer holds the sentinel before any push
        _LAMPORT[key] = state
    _check_setup("lamport", lambda x: lamport_all_reduce(x, None, name), group, dtype, device)
    return ("lamport", name, dtype, state.capacity)


def symm_mem_backend(device) -> str | None:
    """The symmetric-memory backend in use on ``device`` ("CUDA", "NVSHMEM", ...), or None."""
    import torch.distributed._symmetric_memory as symm_mem
    get_backend = getattr(symm_mem, "get_backend", None)
    return get_backend(torch.device(device)) if get_backend is not None else None


@torch.library.custom_op("fastzoo::symm_mem_all_reduce", mutates_args=())
def symm_mem_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group_name`` (one-shot, symmetric memory): copies ``x``
    into the group's symmetric buffer and reduces all ranks' buffers into a new tensor."""
    buf = _BUFFERS.get((group_name, x.dtype, x.device.index))
    if buf is None or buf.numel() < x.numel():
        raise RuntimeError(f"no symmetric buffer of >= {x.numel()} {x.dtype} elements for group {group_name!r} "
                           f"on {x.device}: call fastzoo.llama.tp.setup_allreduce_ first")
    if not x.is_contiguous() or (x.storage_offset() * x.element_size()) % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # the op wants the buffer's 16-byte alignment
    view = buf[:x.numel()].view(x.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(view, x, "sum", group_name)


@symm_mem_all_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def setup_lamport_local(device, dtype: torch.dtype, max_bytes: int = DEFAULT_SYMM_MEM_BYTES,
                        name: str = "local") -> SymmMemSpec:
    """A one-rank lamport state under the group name ``name`` (no process group, plain device
    memory): the kernel pushes into its own buffer and reduces one slot.  For measuring the
    kernel's own cost inside a step on one GPU (``experiments.llama_tp --simulate-world N
    --simulate-allreduce lamport``); the sum is the input."""
    from ..ops.lamport_all_reduce import LAMPORT_DTYPES
    device = _cuda_device(device) if torch.device(device).type == "cuda" else torch.device(device)
    if dtype not in LAMPORT_DTYPES:
        raise ValueError(f"the lamport all-reduce supports {[str(d) for d in LAMPORT_DTYPES]}, got {dtype}")
    capacity = _lamport_capacity(max_bytes, torch.empty((), dtype=dtype).element_size())
    buf = torch.empty(2 * capacity, dtype=dtype, device=device)
    _LAMPORT[(name, dtype, device.index)] = _Lamport(buf, [buf.data_ptr()], 0, 1, capacity)
    return ("lamport", name, dtype, capacity)


@torch.library.custom_op("fastzoo::lamport_all_reduce", mutates_args=())
def lamport_all_reduce(x: torch.Tensor, residual: torch.Tensor | None, group_name: str) -> torch.Tensor:
    """``residual + Σ_ranks x`` over the ranks of ``group_name``, in one kernel
    (:mod:`fastzoo.ops.lamport_all_reduce`; :func:`setup_lamport` first)."""
    from ..ops.lamport_all_reduce import lamport_all_reduce_triton
    state = _LAMPORT.get((group_name, x.dtype, x.device.index))
    if state is None or state.capacity < x.numel():
        raise RuntimeError(f"no lamport buffer of >= {x.numel()} {x.dtype} elements for group {group_name!r} "
                           f"on {x.device}: call fastzoo.llama.tp.setup_allreduce_ first")
    return lamport_all_reduce_triton(x.contiguous(), residual, state.ptrs, state.counters, state.rank,
                                     state.world_size, state.capacity)


@lamport_all_reduce.register_fake
def _(x, residual, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def all_reduce(y: torch.Tensor, group, symm: SymmMemSpec | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + Σ_ranks y`` over ``group`` (``residual`` optional): through the symmetric-
    memory implementation ``symm`` names when it is set and the message fits its buffer
    (decided from static facts, at trace time), else the functional collective (NCCL / gloo).
    Only the lamport kernel adds the residual itself; the others add it after."""
    if symm is not None and y.dtype == symm[2] and y.numel() <= symm[3]:
        if symm[0] == "lamport" and (residual is None or (residual.shape == y.shape and residual.dtype == y.dtype)):
            return lamport_all_reduce(y, residual, symm[1])
        if symm[0] == "symm_mem" and (y.numel() * y.element_size()) % 16 == 0:
            out = symm_mem_all_reduce(y, symm[1])
            return out if residual is None else residual + out
    import torch.distributed._functional_collectives as funcol
    out = funcol.all_reduce(y, "sum", group if group is not None else dist.group.WORLD)
    return out if residual is None else residual + out
