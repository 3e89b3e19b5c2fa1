"""Model configurations, checkpoint loading and the ``sam_model_registry``."""
import contextlib
import functools
from os import PathLike
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from fastzoo.checkpoint import CheckpointError, load_checked, read_state_dict
from fastzoo.quant import QuantConfig
from fastzoo.quant.vit import quantize_image_encoder_, resolve_image_encoder_quant
from fastzoo.utils import parse_dtype

from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from .modeling.common import MLPBlock
from .modeling.image_encoder import Attention as EncoderAttention
from .modeling.sam import PIXEL_MEAN, PIXEL_STD

#: Encoder hyper-parameters of the three released SAM sizes (everything else is shared).
SAM_CONFIGS: Dict[str, Dict[str, Any]] = {
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)),
}
MODEL_TYPES = ("default", "vit_h", "vit_l", "vit_b")

CheckpointPath = Union[str, PathLike]


class SamCheckpointError(CheckpointError):
    """A checkpoint is missing, unreadable or does not match the model it is loaded into."""


def build_sam_from_config(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    *,
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
) -> Sam:
    """Build an (uninitialised, eval-mode) SAM; the released sizes are entries of ``SAM_CONFIGS``."""
    grid = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=decoder_depth, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_num_heads
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    return sam.eval()


def _guess_model_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor):
        return None
    for name, cfg in SAM_CONFIGS.items():
        n_blocks = sum(1 for k in state_dict if k.startswith("image_encoder.blocks.") and k.endswith(".attn.qkv.weight"))
        if w.shape[0] == cfg["encoder_embed_dim"] and n_blocks == cfg["encoder_depth"]:
            return name
    return None


def read_checkpoint(checkpoint: CheckpointPath) -> Dict[str, torch.Tensor]:
    """Read a state dict from disk (``weights_only``, memory-mapped when possible)."""
    return read_state_dict(checkpoint, error=SamCheckpointError)


def load_state_dict_checked(
    model: Sam,
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_type: Optional[str] = None,
    source: str = "checkpoint",
    assign: bool = False,
) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with errors naming expected vs found."""
    found = _guess_model_type(state_dict)
    hint = None
    if found is not None and found != model_type:
        hint = f"It looks like a {found!r} checkpoint; pass model_type={found!r} (--model-type {found})."
    if model_type:
        source = f"{source} (model type {model_type!r})"
    load_checked(model, state_dict, source, assign=assign, hint=hint, error=SamCheckpointError)


def _resolve_model_type(model_type: str) -> str:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    return "vit_h" if model_type == "default" else model_type


def build_sam_model(model_type: str = "vit_h", checkpoint: Optional[CheckpointPath] = None) -> Sam:
    """Build one of the released sizes (fp32, CPU, eval) and optionally load ``checkpoint`` strictly.

    With a checkpoint the modules are created on the meta device and the (memory-mapped)
    checkpoint tensors are assigned to them, so no time is spent on random initialisation.
    """
    name = _resolve_model_type(model_type)
    if checkpoint is None:
        return build_sam_from_config(**SAM_CONFIGS[name])
    state_dict = read_checkpoint(checkpoint)
    with torch.device("meta"):
        sam = build_sam_from_config(**SAM_CONFIGS[name])
    load_state_dict_checked(sam, state_dict, model_type=name, source=f"checkpoint {str(checkpoint)!r}", assign=True)
    # Non-persistent buffers are not in the checkpoint: recreate them on the CPU.
    sam.pixel_mean = torch.tensor(PIXEL_MEAN).view(-1, 1, 1)
    sam.pixel_std = torch.tensor(PIXEL_STD).view(-1, 1, 1)
    return sam.float().eval()


def build_sam_vit_h(checkpoint: Optional[CheckpointPath] = None) -> Sam:
    return build_sam_model("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: Optional[CheckpointPath] = None) -> Sam:
    return build_sam_model("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: Optional[CheckpointPath] = None) -> Sam:
    return build_sam_model("vit_b", checkpoint)


build_sam = build_sam_vit_h

sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """Accept a ``torch.dtype`` or a name (``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``)."""
    return parse_dtype(dtype)


COMPILE_MODES = (True, False, None, "regional", "full")
ATTENTION_KERNELS = ("fused", "sdpa")

#: Each static shape (batch size), model size, dtype and quantization adds one compiled graph
#: per block kind to the same code object (``Block.forward``); torch's default limit of 8 per
#: code object would silently fall back to eager after a few batch sizes.  The compiled encoder
#: raises it to at least this value, only during its own calls.
RECOMPILE_LIMIT = 64


def _check_quantize(quantize: Union[str, QuantConfig, None], calibration: Optional[Iterable]) -> None:
    """Refuse a ``quantize=`` option SAM cannot run, or static quantization without calibration,
    before any weights are built."""
    config = None if quantize is None else resolve_image_encoder_quant(quantize)
    calibrated = isinstance(config, QuantConfig) and config.needs_calibration
    if calibration is not None and not calibrated:
        raise ValueError(f"calibration= is used only by calibrated quantization (e.g. quantize='int8static'); "
                         f"found quantize={quantize!r}")
    if calibrated and calibration is None:
        raise ValueError(f"quantize={quantize!r} needs calibration images: build_sam_fast(..., quantize={quantize!r}, "
                         f"calibration=batches), batches an iterable of preprocessed (B, 3, S, S) image tensors")


def _calibration_batches(calibration: Iterable, device: torch.device, dtype: torch.dtype):
    """Calibration tensors moved to the encoder's device and dtype, one at a time."""
    for batch in calibration:
        yield batch.to(device=device, dtype=dtype) if isinstance(batch, torch.Tensor) else batch


def _check_compile(compile: Union[bool, str, None]) -> None:
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, found {compile!r}")


@contextlib.contextmanager
def _recompile_headroom():
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        yield


def _with_recompile_headroom(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with _recompile_headroom():
            return fn(*args, **kwargs)

    return call


def _cudagraph_steps(fn):
    """An encoder forward whose compiled regions run as CUDA graphs (inductor's cudagraph trees):
    each call begins a new step of the trees (the regions of one call chain their outputs; a
    later call may reuse the memory of an earlier one's), and the output is copied out of the
    graphs' memory pool, so callers may keep embeddings across calls."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs).clone()

    return call


#: Inductor options of every image-encoder compile (``options=`` overrides them).
#: ``triton.multi_kernel``: a row reduction up to 16384 wide is compiled both as a persistent
#: kernel (the row in registers, one pass) and as the looped kernel inductor alone keeps for rows
#: over 1024 (reading the row twice), and the faster is kept, timed on the first call: vit_h's
#: LayerNorms over 1280 channels took 0.31 and 0.34 ms looped, 0.14 and 0.17 persistent (H100,
#: batch 16; vit_h bf16 76.2 -> 79.9 img/s, experiments/results/h100-80gb-hbm3/
#: sam_inductor_multi_kernel_ab.json). With it the FX graph cache is turned off (unless the
#: caller sets ``fx_graph_cache``): with torch 2.11 / Triton 3.6, loading such a graph from that
#: cache failed (the multi-kernel's choice cache keys on the loaded Triton functions, which
#: lack their hash lock), so each process compiles.
INDUCTOR_OPTIONS: Dict[str, Any] = {"triton.multi_kernel": 1}


def _inductor_options(mode: Optional[str], options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``mode``'s options, then ``INDUCTOR_OPTIONS``, then ``options``; the FX graph cache off
    where multi-kernels are on and ``options`` does not say otherwise."""
    from torch._inductor import list_mode_options

    merged = {**(list_mode_options(mode) if mode else {}), **INDUCTOR_OPTIONS, **(options or {})}
    if merged.get("triton.multi_kernel"):
        merged.setdefault("fx_graph_cache", False)
    return merged


def compile_image_encoder(
    encoder: ImageEncoderViT,
    compile: Union[bool, str, None] = "regional",
    *,
    mode: Optional[str] = None,
    backend: Any = "inductor",
    options: Optional[Dict[str, Any]] = None,
) -> ImageEncoderViT:
    """Compile an image encoder in place with static shapes (``dynamic=False``).

    ``compile``: ``True``/``"regional"`` compiles each block (``Block.compile``), the patch
    embedding and the neck separately. Parameters are graph inputs (dynamo inlines built-in
    nn modules), so all windowed blocks share one compiled graph and all global-attention
    blocks another: cold-start cost is independent of depth.  ``"full"`` compiles the whole
    encoder forward as one graph.  ``False``/``None``: nothing.  ``mode``/``options`` go to
    ``torch.compile`` (inductor settings belong in ``options``: applied per compile, never
    global).  State-dict keys are unchanged.
    """
    _check_compile(compile)
    if not compile:
        return encoder
    kw: Dict[str, Any] = dict(backend=backend, dynamic=False)
    if backend == "inductor":  # torch.compile takes a mode or options, not both: the mode as its options
        kw["options"] = _inductor_options(mode, options)
    else:
        if mode is not None:
            kw["mode"] = mode
        if options:
            kw["options"] = options
    steps = _cudagraph_steps if kw.get("options", {}).get("triton.cudagraphs") else (lambda fn: fn)
    if compile == "full":
        encoder.forward = steps(_with_recompile_headroom(torch.compile(encoder.forward, **kw)))
        return encoder
    for module in (encoder.patch_embed, *encoder.blocks, encoder.neck):
        module.compile(**kw)
    encoder.forward = steps(_with_recompile_headroom(encoder.forward))
    return encoder


def default_compile_mode(device: Union[str, torch.device], compile_mode: Optional[str]) -> Optional[str]:
    """``build_sam_fast``'s ``compile_mode``: as given, else ``"reduce-overhead"`` (CUDA graphs) on
    a CUDA device and torch's default mode (None) elsewhere."""
    if compile_mode is None and torch.device(device).type == "cuda":
        return "reduce-overhead"
    return compile_mode


def build_sam_fast(
    model_type: str = "vit_h",
    checkpoint: Optional[CheckpointPath] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[str, torch.dtype] = torch.bfloat16,
    compile: Union[bool, str] = True,
    compile_mode: Optional[str] = None,
    quantize: Union[str, QuantConfig, None] = None,
    calibration: Optional[Iterable] = None,
    kernel: str = "fused",
) -> Sam:
    """A ready-to-run eval SAM: weights loaded, moved to ``device``/``dtype``, encoder
    quantized and compiled.

    ``device`` defaults to CUDA when available.  The random-frequency positional encoding
    buffer stays in float32 (it is tiny and sensitive to rounding).  ``compile``: ``True`` or
    ``"regional"`` (one compiled graph per block kind, see :func:`compile_image_encoder`),
    ``"full"`` (the whole image encoder) or ``False``; ``compile_mode`` is ``torch.compile``'s
    ``mode``: by default ``"reduce-overhead"`` on a CUDA device (CUDA graphs, one per compiled
    region; each call's embeddings are copied out, so they may be kept), torch's default mode
    elsewhere; ``"default"`` compiles without CUDA graphs.  Without them one image at a time is
    host-bound: vit_b at batch 1 ran 36 img/s compiled against 355 with CUDA graphs, at batch 16
    both about 416 (H100, ``experiments/results/h100-80gb-hbm3/sam_throughput_vit_b_batch1-8.json``,
    ``sam_throughput_vit_b_cudagraphs_quick.json``).  ``quantize`` (the encoder blocks' linears;
    the prompt encoder and mask decoder stay in ``dtype``): ``None``; ``"int8"`` (int8 dynamic on all encoder linears), ``"sparse"``
    (2:4 on the MLPs) or ``"int8+sparse"`` (``fastzoo.quant.vit.ENCODER_QUANT_PLANS``); or,
    as for ``build_vit``, a ``fastzoo.quant`` config or its name: ``"int8dq"`` /
    ``Int8Dynamic()`` (dynamic W8A8), ``"int8static"`` / ``Int8Static(observer=..., weight=...)``
    (static W8A8, needs ``calibration``), weight-only ``"int4-g128"``, … (all names:
    ``fastzoo.quant.vit.IMAGE_ENCODER_QUANT_NAMES``).  ``attention="int8"`` configs are refused
    (SAM's attention has relative-position terms that ``int8_attention`` lacks).
    ``calibration``: for calibrated configs, an iterable of preprocessed image batches
    ``(B, 3, S, S)`` (what ``image_encoder`` takes, e.g. from ``Sam.preprocess``), each moved
    to ``device``/``dtype`` and run once through the float encoder.  ``kernel``: the encoder's attention, ``"fused"``
    (``fastzoo.ops.rel_pos_window_attention``: the Triton kernel on fp16/bf16 CUDA tensors, the
    reference elsewhere) or ``"sdpa"`` (the reference: bias materialised, then SDPA, as in
    ``segment_anything``).
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be one of {ATTENTION_KERNELS}, found {kernel!r}")
    dtype = resolve_dtype(dtype)
    _check_compile(compile)
    _check_quantize(quantize, calibration)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sam = build_sam_model(model_type, checkpoint)
    sam.to(device=device, dtype=dtype)
    # Pixel statistics and the positional-encoding frequencies stay in float32.
    sam.prompt_encoder.pe_layer.float()
    sam.pixel_mean = sam.pixel_mean.float()
    sam.pixel_std = sam.pixel_std.float()
    sam.eval().requires_grad_(False)
    # The neck gets channels-last tokens (B, H, W, C) permuted to NCHW: with channels-last
    # conv weights it runs NHWC convolutions with no layout conversion.
    sam.image_encoder.neck.to(memory_format=torch.channels_last)
    for module in sam.image_encoder.modules():
        if hasattr(module, "fused_attention"):
            module.fused_attention = kernel == "fused"
    if quantize is not None:
        if calibration is not None:
            calibration = _calibration_batches(calibration, torch.device(device), dtype)
        quantize_image_encoder_(sam.image_encoder, quantize, calibration=calibration)
    for module in sam.image_encoder.modules():  # after calibration: its observers hook the linears' calls
        if isinstance(module, MLPBlock):
            module.fused_mlp = kernel == "fused"
        if isinstance(module, EncoderAttention):
            module.fused_proj = kernel == "fused"
    compile_image_encoder(sam.image_encoder, compile, mode=default_compile_mode(device, compile_mode))
    return sam
