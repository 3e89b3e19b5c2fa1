"""SAM's ViT image encoder: windowed + global attention with decomposed relative positions."""
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from fastzoo import ops

from .attention import rel_pos_attention
from .common import LayerNorm2d, MLPBlock


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> ``(B, H/p, W/p, C)`` channels-last tokens."""

    def __init__(self, kernel_size=(16, 16), stride=(16, 16), padding=(0, 0), in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        kh, kw = w.shape[-2:]
        B, Cin, H, W = x.shape
        if self.proj.stride == (kh, kw) and self.proj.padding == (0, 0) and H % kh == 0 and W % kw == 0:
            # Non-overlapping patches: the convolution is one matrix product of the
            # flattened patches (the same sums; a GEMM instead of a strided convolution).
            patches = x.reshape(B, Cin, H // kh, kh, W // kw, kw).permute(0, 2, 4, 1, 3, 5)
            patches = patches.reshape(B, H // kh, W // kw, Cin * kh * kw)
            return F.linear(patches, w.reshape(w.shape[0], -1), self.proj.bias)
        return self.proj(x).permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """The table ``rel_pos`` ``(L, C)``, linearly resized to ``length`` rows where L differs
    (segment_anything's rule for other image or window sizes than the checkpoint's)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    table = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return table.reshape(-1, length).permute(1, 0)


class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` grid with optional relative positions.

    ``fused_proj`` (not part of the state dict; off by default, ``build_sam_fast(kernel="fused")``
    turns it on after any quantization): a float proj adds the residual in
    ``fastzoo.ops.linear_act``'s GEMM epilogue (one pass over the activations fewer)."""

    fused_proj = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        # True: the fused rel-pos attention op (Triton kernel on fp16/bf16 CUDA tensors);
        # False: the reference (bias materialised + SDPA). Not part of the state dict.
        self.fused_attention = fused_attention
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size must be given when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor, window_size: int = 0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``: attention within ``window_size`` x
        ``window_size`` windows (the grid padded to whole windows with zero tokens, as in
        segment_anything), or over the whole grid when 0; plus ``residual`` when given (a
        projection that says it ``fuses_residual``, as fastzoo.quant's int8 linears do, adds
        it in its GEMM's epilogue; so does a float ``nn.Linear`` proj with ``fused_proj``, through
        ``ops.linear_act``, where y, the weight and the residual share a dtype, autocast is off and
        the proj has no hooks: calibration observers see it called as a module)."""
        y = self.attend(self.qkv(x), window_size)
        if residual is None:
            return self.proj(y)
        if getattr(self.proj, "fuses_residual", False):
            return self.proj(y, residual=residual)
        if (self.fused_proj and type(self.proj) is nn.Linear and type(self.proj.weight) is nn.Parameter
                and y.dtype == self.proj.weight.dtype == residual.dtype and not torch.is_autocast_enabled()
                and not (self.proj._forward_hooks or self.proj._forward_pre_hooks)):
            return ops.linear_act(y, self.proj.weight, self.proj.bias, residual=residual)
        return residual + self.proj(y)

    def attend(self, qkv: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """The attention between the projections: ``(B, H, W, 3C)`` qkv -> ``(B, H, W, C)``.

        With relative positions, ``fastzoo.ops.rel_pos_window_attention`` reads the windows
        in place (its reference partitions and pads). A projection acts on each token
        alone, so a zero padding token's qkv is the qkv bias: the padding enters as that
        vector, and padded outputs are never computed into the result (segment_anything
        projects the padded tokens too and drops them after proj: the same values)."""
        B, H, W, C3 = qkv.shape
        if self.use_rel_pos:
            wh, ww = (window_size, window_size) if window_size else (H, W)
            args = (qkv, resize_rel_pos(self.rel_pos_h, 2 * wh - 1), resize_rel_pos(self.rel_pos_w, 2 * ww - 1),
                    self.num_heads, window_size, self.scale, self.qkv.bias)
            if self.fused_attention:
                return ops.rel_pos_window_attention(*args)
            return ops.rel_pos_window_attention_ref(*args)
        if window_size:
            windows, pad_hw = window_partition(qkv, window_size, pad_value=self.qkv.bias)
            return window_unpartition(self.attend(windows), window_size, pad_hw, (H, W))
        packed = qkv.reshape(B, H * W, 3, self.num_heads, -1)
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim) views
        out = rel_pos_attention(q, k, v, None, None, self.scale)
        return out.permute(0, 2, 1, 3).reshape(B, H, W, C3 // 3)


def window_partition(
    x: torch.Tensor, window_size: int, pad_value: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``(B, H, W, C)`` -> ``(B * n_windows, ws, ws, C)``, and the padded ``(Hp, Wp)``.

    The padding is zeros, or the vector ``pad_value`` (``(C,)``) at every padded position.
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        if pad_value is None:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        else:
            padded = pad_value.to(x.dtype).expand(B, H + pad_h, W + pad_w, C).clone()
            padded[:, :H, :W] = x
            x = padded
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // ((Hp // window_size) * (Wp // window_size))
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size > 0``, else global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x), self.window_size, residual=x)
        return self.mlp(self.norm2(x), residual=x)


class ImageEncoderViT(nn.Module):
    """ViT backbone + neck: ``(B, 3, img_size, img_size)`` -> ``(B, out_chans, img_size/16, img_size/16)``."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
