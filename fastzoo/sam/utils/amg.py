"""Mask bookkeeping for automatic mask generation: grids, crops, RLE, stability, NMS.

Behaviour follows segment_anything's ``utils/amg.py``; no torchvision, OpenCV or
pycocotools needed (``remove_small_regions`` uses OpenCV or SciPy when asked for).
"""
import math
from copy import deepcopy
from itertools import product
from typing import Any, Dict, Generator, ItemsView, List, Tuple

import numpy as np
import torch


class MaskData:
    """Columns of per-mask data (tensors, arrays or lists) filtered and concatenated together."""

    def __init__(self, **kwargs) -> None:
        for v in kwargs.values():
            self._check(v)
        self._stats = dict(**kwargs)

    @staticmethod
    def _check(v: Any) -> None:
        if not isinstance(v, (list, np.ndarray, torch.Tensor)):
            raise TypeError("MaskData only supports list, numpy arrays, and torch tensors.")

    def __setitem__(self, key: str, item: Any) -> None:
        self._check(item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        keep = torch.as_tensor(keep)
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                self._stats[k] = v[keep.to(v.device)]
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[keep.detach().cpu().numpy()]
            elif isinstance(v, list) and keep.dtype == torch.bool:
                self._stats[k] = [a for a, m in zip(v, keep.tolist()) if m]
            elif isinstance(v, list):
                self._stats[k] = [v[i] for i in keep.tolist()]
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}.")

    def cat(self, new_stats: "MaskData") -> None:
        for k, v in new_stats.items():
            if k not in self._stats or self._stats[k] is None:
                self._stats[k] = deepcopy(v)
            elif isinstance(v, torch.Tensor):
                self._stats[k] = torch.cat([self._stats[k], v], dim=0)
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([self._stats[k], v], axis=0)
            elif isinstance(v, list):
                self._stats[k] = self._stats[k] + deepcopy(v)
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}.")

    def to_numpy(self) -> None:
        for k, v in self._stats.items():
            if isinstance(v, torch.Tensor):
                self._stats[k] = v.detach().cpu().numpy()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression per category (as ``torchvision.ops.batched_nms``).

    Returns indices of kept boxes sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    b = boxes.detach().float().cpu()
    # Offsetting boxes by category keeps categories apart (torchvision's coordinate trick).
    offsets = torch.as_tensor(idxs).detach().cpu().to(b) * (b.max() + 1)
    b = (b + offsets[:, None]).numpy()
    s = scores.detach().float().cpu()
    order = torch.sort(s, descending=True, stable=True).indices.numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(b), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        # torchvision compares the float32 IoU with the threshold in double precision
        suppressed[rest[iou.astype(np.float64) > float(iou_threshold)]] = True
    return torch.as_tensor(np.array(keep, dtype=np.int64))


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0) -> torch.Tensor:
    """Boxes touching the edge of the crop but not the edge of the original image."""
    crop_box_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_box_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    return box_near_crop_edge_t(boxes, crop_box_t, orig_box_t, atol)


def box_near_crop_edge_t(boxes: torch.Tensor, crop_box_t: torch.Tensor, orig_box_t: torch.Tensor, atol: float = 20.0) -> torch.Tensor:
    """:func:`is_box_near_crop_edge` with the boxes given as float tensors on ``boxes.device``
    (no host-to-device copy)."""
    boxes = boxes.float() + crop_box_t[:2].repeat(2)[None, :]
    near_crop = torch.isclose(boxes, crop_box_t[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig_box_t[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def box_xyxy_to_xywh(box_xyxy):
    box = deepcopy(box_xyxy)
    box[2] = box[2] - box[0]
    box[3] = box[3] - box[1]
    return box


def batch_iterator(batch_size: int, *args) -> Generator[List[Any], None, None]:
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("Batched iteration must have inputs of all the same size.")
    n_batches = len(args[0]) // batch_size + int(len(args[0]) % batch_size != 0)
    for b in range(n_batches):
        yield [arg[b * batch_size : (b + 1) * batch_size] for arg in args]


def mask_to_rle_pytorch(tensor: torch.Tensor) -> List[Dict[str, Any]]:
    """Bool ``(B, H, W)`` masks -> uncompressed (column-major) RLEs as pycocotools expects."""
    b, h, w = tensor.shape
    return rle_from_column_major(tensor.permute(0, 2, 1).flatten(1), [h, w])


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> bool ``(H, W)`` array."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    mask = np.repeat(values, counts)
    return mask.reshape(w, h).transpose()


def area_from_rle(rle: Dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU between the masks binarised at ``threshold ± offset`` (the high one is a subset)."""
    inter = (masks > (mask_threshold + threshold_offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    union = (masks > (mask_threshold - threshold_offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inter / union


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n_per_side**2`` points evenly spaced in [0, 1]^2 (cell centres), x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """The full image, then (2^i)^2 overlapping crops for layers i = 1..n_layers."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0, _, _ = crop_box
    offset = torch.tensor([[x0, y0, x0, y0]], device=boxes.device)
    if boxes.ndim == 3:
        offset = offset.unsqueeze(1)
    return boxes + offset


def uncrop_points(points: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0, _, _ = crop_box
    offset = torch.tensor([[x0, y0]], device=points.device)
    if points.ndim == 3:
        offset = offset.unsqueeze(1)
    return points + offset


def uncrop_masks(masks: torch.Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> torch.Tensor:
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def _connected_components(mask: np.ndarray) -> Tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: (n_labels incl. background 0, label image, sizes per label)."""
    try:
        import cv2  # type: ignore

        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
        return n, labels, stats[:, -1]
    except ImportError:
        pass
    try:
        from scipy import ndimage  # type: ignore
    except ImportError as e:
        raise ImportError("min_mask_region_area > 0 needs OpenCV (opencv-python) or SciPy installed") from e
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return n + 1, labels, sizes


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Remove small islands (``mode='islands'``) or fill small holes (``'holes'``)."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', found {mode!r}")
    correct_holes = mode == "holes"
    working = (correct_holes ^ mask).astype(np.uint8)
    n_labels, regions, sizes_all = _connected_components(working)
    sizes = sizes_all[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE ``{"size": [h, w], "counts": str}`` (pycocotools' format)."""
    h, w = uncompressed_rle["size"]
    counts = list(uncompressed_rle["counts"])
    out = []
    for i, x in enumerate(counts):
        x = int(x)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [h, w], "counts": "".join(out)}


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes around bool masks ``(..., H, W)``; ``[0, 0, 0, 0]`` for empty masks."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device)
    shape = masks.shape
    h, w = shape[-2:]
    masks = masks.flatten(0, -3) if masks.ndim > 2 else masks.unsqueeze(0)
    in_height, _ = torch.max(masks, dim=-1)
    coords_h = in_height * torch.arange(h, device=masks.device)[None, :]
    bottom, _ = torch.max(coords_h, dim=-1)
    top, _ = torch.min(coords_h + h * (~in_height), dim=-1)
    in_width, _ = torch.max(masks, dim=-2)
    coords_w = in_width * torch.arange(w, device=masks.device)[None, :]
    right, _ = torch.max(coords_w, dim=-1)
    left, _ = torch.min(coords_w + w * (~in_width), dim=-1)
    empty = (right < left) | (bottom < top)
    out = torch.stack([left, top, right, bottom], dim=-1) * (~empty).unsqueeze(-1)
    return out.reshape(*shape[:-2], 4) if len(shape) > 2 else out[0]


# ---------------------------------------------------------------------------- on-device pipeline
def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, H, W)`` masks -> ``(B, ceil(H*W/8))`` uint8, bits in column-major (RLE) order."""
    b, h, w = masks.shape
    flat = masks.transpose(1, 2).reshape(b, h * w)
    pad = -(h * w) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.ones(8, dtype=torch.uint8, device=masks.device) << torch.arange(8, dtype=torch.uint8, device=masks.device)
    return (flat.view(b, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`, kept column-major: bool ``(B, W, H)`` (``mask.T`` per mask)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, :, None] >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, : h * w].bool().view(packed.shape[0], w, h)


def float32_threshold(thresh: float) -> float:
    """The float32 ``t`` with ``x > t  <=>  float64(x) > thresh`` for every float32 ``x``."""
    t = np.float32(thresh)
    if float(t) > thresh:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def batched_nms_device(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
                       block: int = 1024) -> torch.Tensor:
    """:func:`batched_nms` (greedy, torchvision's semantics and float rounding) on ``boxes.device``.

    The pairwise "suppresses" matrix is built in row blocks; the greedy pass is its unique fixed
    point ``keep[i] = not any(keep[j] and sup[j, i] for j before i)``, reached by iterating from
    "all kept" (each step settles at least one more position; one host check per step).
    Returns indices (on the device) of the kept boxes by decreasing score.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    b = boxes.detach().float()
    b = b + (idxs.to(b) * (b.max() + 1))[:, None]
    order = torch.sort(scores.detach().float(), descending=True, stable=True).indices
    b = b[order]
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    thr = float32_threshold(iou_threshold)
    sup = torch.empty(n, n, dtype=torch.bool, device=b.device)
    for r in range(0, n, block):
        s = slice(r, r + block)
        w = (torch.minimum(x2[s, None], x2[None]) - torch.maximum(x1[s, None], x1[None])).clamp_min(0)
        h = (torch.minimum(y2[s, None], y2[None]) - torch.maximum(y1[s, None], y1[None])).clamp_min(0)
        inter = w * h
        sup[s] = inter / (areas[s, None] + areas[None] - inter) > thr
    sup.triu_(1)
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    while True:
        new = ~(sup & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def rle_from_column_major(flat: torch.Tensor, size: List[int]) -> List[Dict[str, Any]]:
    """Uncompressed RLEs of bool masks given flattened column-major ``(B, H*W)``; the run
    lengths are computed on the device and copied once (one host sync for all masks)."""
    b, n = flat.shape
    if b == 0:
        return []
    rows, cols = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    pos = cols + 1
    prev = torch.zeros_like(pos)
    prev[1:] = pos[:-1]
    if rows.numel():
        new_row = torch.ones_like(rows, dtype=torch.bool)
        new_row[1:] = rows[1:] != rows[:-1]
        prev = torch.where(new_row, 0, prev)
    per_mask = torch.bincount(rows, minlength=b)
    ends = per_mask.cumsum(0)
    last = torch.where(per_mask > 0, pos[(ends - 1).clamp_min(0)] if pos.numel() else 0, 0)
    host = torch.cat([pos - prev, per_mask, n - last, flat[:, 0].long()]).cpu().numpy()
    k = pos.numel()
    runs, per_mask, tail, first = host[:k], host[k : k + b], host[k + b : k + 2 * b], host[k + 2 * b :]
    out, o = [], 0
    for i in range(b):
        c = int(per_mask[i])
        counts = ([0] if first[i] else []) + runs[o : o + c].tolist() + [int(tail[i])]
        o += c
        out.append({"size": list(size), "counts": counts})
    return out
