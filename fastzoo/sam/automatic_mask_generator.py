"""``SamAutomaticMaskGenerator``: prompt SAM with a grid of points and keep the good masks."""
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .modeling import Sam
from .predictor import SamPredictor
from .utils.amg import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    batched_nms,
    batched_nms_device,
    box_area,
    box_near_crop_edge_t,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    pack_masks,
    remove_small_regions,
    rle_from_column_major,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
    unpack_masks,
)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _finish(data: MaskData) -> MaskData:
    """Columns to numpy; empty columns when no mask survived."""
    data.to_numpy()
    if "rles" not in data:
        for k in ("rles", "points", "crop_boxes"):
            data[k] = []
        for k in ("boxes", "iou_preds", "stability_score"):
            data[k] = np.zeros((0, 4) if k == "boxes" else (0,))
    return data


class SamAutomaticMaskGenerator:
    """Drop-in replacement for ``segment_anything.SamAutomaticMaskGenerator`` (same options and outputs).

    ``coco_rle`` output is encoded without pycocotools.  ``min_mask_region_area > 0`` needs
    OpenCV or SciPy.

    ``fast=True`` gives the same masks through an on-device pipeline: the decoder runs on
    ``points_per_batch`` points at a time and the full-resolution logits are made
    ``mask_chunk`` masks at a time (bounded memory); predicted-IoU and stability filtering,
    boxes and the crop-edge test run on the device for every candidate and the binary masks
    are kept bit-packed, with no host synchronisation until all points of all crops are
    through; then one pass does box NMS (on the device), RLE encoding (run lengths on the
    device, one copy to the host) of the survivors only, and the crop NMS.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        fast: bool = False,
        mask_chunk: int = 32,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            self.point_grids = point_grids
        if len(self.point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids needs {crop_n_layers + 1} grids (one per crop layer), found {len(self.point_grids)}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, found {points_per_batch}")
        if mask_chunk < 1:
            raise ValueError(f"mask_chunk must be >= 1, found {mask_chunk}")
        self.fast = fast
        self.mask_chunk = mask_chunk
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: np.ndarray, *, progress: bool = False) -> List[Dict[str, Any]]:
        """Masks for an HxWx3 uint8 image: a list of records with ``segmentation``, ``area``,
        ``bbox`` (XYWH), ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box``.

        ``progress=True`` shows a tqdm bar over point batches.
        """
        mask_data = (self._generate_masks_fast if self.fast else self._generate_masks)(image, progress)
        if self.min_mask_region_area > 0:
            mask_data = self.postprocess_small_regions(
                mask_data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in mask_data["rles"]]
        elif self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in mask_data["rles"]]
        else:
            segmentations = mask_data["rles"]
        anns = []
        for idx in range(len(segmentations)):
            anns.append(
                {
                    "segmentation": segmentations[idx],
                    "area": area_from_rle(mask_data["rles"][idx]),
                    "bbox": box_xyxy_to_xywh(mask_data["boxes"][idx]).tolist(),
                    "predicted_iou": mask_data["iou_preds"][idx].item(),
                    "point_coords": [mask_data["points"][idx].tolist()],
                    "stability_score": mask_data["stability_score"][idx].item(),
                    "crop_box": box_xyxy_to_xywh(mask_data["crop_boxes"][idx]).tolist(),
                }
            )
        return anns

    def _generate_masks(self, image: np.ndarray, progress: bool = False) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        bar = self._progress_bar(layer_idxs, progress)
        data = MaskData()
        try:
            for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
                data.cat(self._process_crop(image, crop_box, layer_idx, orig_size, bar))
        finally:
            if bar is not None:
                bar.close()
        if len(crop_boxes) > 1 and "boxes" in data:
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(data["boxes"].float(), scores, torch.zeros(len(data["boxes"])), self.crop_nms_thresh)
            data.filter(keep)
        return _finish(data)

    # ------------------------------------------------------------------ fast path
    def _progress_bar(self, layer_idxs, progress):
        if not progress:
            return None
        from tqdm import tqdm

        total = sum(-(-len(self.point_grids[i]) // self.points_per_batch) for i in layer_idxs)
        return tqdm(total=total, desc="SAM masks", unit="batch")

    def _generate_masks_fast(self, image: np.ndarray, progress: bool = False) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        bar = self._progress_bar(layer_idxs, progress)
        try:
            crops = [self._candidates(image, cb, li, orig_size, bar) for cb, li in zip(crop_boxes, layer_idxs)]
        finally:
            if bar is not None:
                bar.close()
        device = self.predictor.device
        # ---- all points are through: from here on the host reads results (which candidates survived)
        parts = []
        for ci, c in enumerate(crops):
            idx = c["keep"].nonzero()[:, 0]
            if idx.numel() == 0:
                continue
            keep = batched_nms_device(c["boxes"][idx].float(), c["iou_preds"][idx],
                                      torch.zeros(idx.numel(), device=device), self.box_nms_thresh)
            sel = idx[keep]
            x0, y0 = c["crop_box"][:2]
            parts.append(dict(
                crop=torch.full((sel.numel(),), ci, dtype=torch.int64, device=device), sel=sel,
                iou_preds=c["iou_preds"][sel], stability_score=c["stability_score"][sel],
                boxes=c["boxes"][sel] + torch.tensor([[x0, y0, x0, y0]], device=device),
                crop_boxes=torch.tensor([c["crop_box"]], device=device).expand(sel.numel(), 4),
            ))
        data = MaskData()
        if parts:
            cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if len(crop_boxes) > 1:
                scores = 1 / box_area(cols["crop_boxes"])
                keep = batched_nms_device(cols["boxes"].float(), scores, torch.zeros(len(scores), device=device),
                                          self.crop_nms_thresh)
                cols = {k: v[keep] for k, v in cols.items()}
            crop_of, sel = cols.pop("crop").cpu().numpy(), cols.pop("sel").cpu().numpy()
            rles = [None] * len(sel)
            for ci in np.unique(crop_of):
                pos = np.flatnonzero(crop_of == ci)
                for r in self._rles(crops[ci], torch.as_tensor(sel[pos], device=device), orig_size, pos):
                    rles[r[0]] = r[1]
            points = np.stack([crops[ci]["points"][s] for ci, s in zip(crop_of, sel)])
            data = MaskData(rles=rles, points=torch.as_tensor(points), **cols)
        return _finish(data)

    def _rles(self, crop, sel: torch.Tensor, orig_size, positions):
        """(output position, RLE) of the selected candidates of one crop, ``mask_chunk`` at a time."""
        orig_h, orig_w = orig_size
        x0, y0, x1, y1 = crop["crop_box"]
        ch, cw = crop["size"]
        for s in range(0, sel.numel(), self.mask_chunk):
            m = unpack_masks(crop["packed"][sel[s : s + self.mask_chunk]], ch, cw)  # (k, cw, ch): column-major
            if (x0, y0, x1, y1) != (0, 0, orig_w, orig_h):
                m = torch.nn.functional.pad(m, (y0, orig_h - y1, x0, orig_w - x1), value=False)
            rles = rle_from_column_major(m.flatten(1), [orig_h, orig_w])
            yield from zip(positions[s : s + self.mask_chunk], rles)

    def _candidates(self, image, crop_box, crop_layer_idx, orig_size, bar=None) -> Dict[str, Any]:
        """Decode every grid point of one crop and score every candidate mask, on the device."""
        crop = self._crop_setup(image, crop_box, crop_layer_idx, orig_size)
        self._decode_candidates(crop, bar)
        self.predictor.reset_image()
        return crop

    def _crop_setup(self, image, crop_box, crop_layer_idx, orig_size) -> Dict[str, Any]:
        """Embed the crop, copy its prompts to the device, allocate the candidate buffers."""
        predictor = self.predictor
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        h, w = cropped_size = cropped.shape[:2]
        predictor.set_image(cropped)
        device = predictor.device
        points = self.point_grids[crop_layer_idx] * np.array(cropped_size)[None, ::-1]
        n = 3 * len(points)
        return dict(
            crop_box=list(crop_box), size=(h, w), points=np.repeat(points, 3, axis=0) + np.array([[x0, y0]]),
            coords=torch.as_tensor(predictor.transform.apply_coords(points, cropped_size), device=device),
            labels=torch.ones(len(points), dtype=torch.int, device=device),
            crop_t=torch.tensor(crop_box, dtype=torch.float, device=device),
            orig_t=torch.tensor([0, 0, orig_size[1], orig_size[0]], dtype=torch.float, device=device),
            iou_preds=torch.empty(n, device=device), stability_score=torch.empty(n, device=device),
            boxes=torch.empty(n, 4, dtype=torch.int64, device=device),
            keep=torch.empty(n, dtype=torch.bool, device=device),
            packed=torch.empty(n, -(-h * w // 8), dtype=torch.uint8, device=device),
        )

    def _decode_candidates(self, crop: Dict[str, Any], bar=None) -> None:
        """The point loop: no host synchronisation, results written into ``crop``'s buffers."""
        model, predictor = self.predictor.model, self.predictor
        threshold = model.mask_threshold
        dense_pe = model.prompt_encoder.get_dense_pe()
        coords, labels = crop["coords"], crop["labels"]
        for s in range(0, coords.shape[0], self.points_per_batch):
            pts = slice(s, s + self.points_per_batch)
            sparse, dense = model.prompt_encoder(points=(coords[pts, None, :], labels[pts, None]), boxes=None, masks=None)
            low_res, iou = model.mask_decoder(
                image_embeddings=predictor.features, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=True,
            )
            low_res, iou = low_res.float().flatten(0, 1)[:, None], iou.float().flatten(0, 1)
            for c in range(0, low_res.shape[0], self.mask_chunk):
                logits = model.postprocess_masks(low_res[c : c + self.mask_chunk], predictor.input_size, predictor.original_size)[:, 0]
                rows = slice(3 * s + c, 3 * s + c + logits.shape[0])
                ious = iou[c : c + self.mask_chunk]
                stab = calculate_stability_score(logits, threshold, self.stability_score_offset)
                masks = logits > threshold
                boxes = batched_mask_to_box(masks)
                keep = ~box_near_crop_edge_t(boxes, crop["crop_t"], crop["orig_t"])
                if self.pred_iou_thresh > 0.0:
                    keep &= ious > self.pred_iou_thresh
                if self.stability_score_thresh > 0.0:
                    keep &= stab >= self.stability_score_thresh
                crop["iou_preds"][rows] = ious
                crop["stability_score"][rows] = stab
                crop["boxes"][rows] = boxes
                crop["keep"][rows] = keep
                crop["packed"][rows] = pack_masks(masks)
            if bar is not None:
                bar.update(1)

    # ------------------------------------------------------------------ reference path
    def _process_crop(self, image, crop_box, crop_layer_idx, orig_size, bar=None) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        cropped_size = cropped.shape[:2]
        self.predictor.set_image(cropped)
        points_scale = np.array(cropped_size)[None, ::-1]
        points_for_image = self.point_grids[crop_layer_idx] * points_scale
        data = MaskData()
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            data.cat(self._process_batch(points, cropped_size, crop_box, orig_size))
            if bar is not None:
                bar.update(1)
        self.predictor.reset_image()
        if "boxes" not in data:
            return data
        keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["boxes"])), self.box_nms_thresh)
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))])
        return data

    def _process_batch(self, points: np.ndarray, im_size: Tuple[int, ...], crop_box: List[int], orig_size: Tuple[int, ...]) -> MaskData:
        orig_h, orig_w = orig_size
        transformed = self.predictor.transform.apply_coords(points, im_size)
        in_points = torch.as_tensor(transformed, device=self.predictor.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
        masks, iou_preds, _ = self.predictor.predict_torch(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, return_logits=True
        )
        data = MaskData(
            masks=masks.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(masks.shape[1], axis=0)),
        )
        del masks
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        threshold = self.predictor.model.mask_threshold
        data["stability_score"] = calculate_stability_score(data["masks"], threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
        data["rles"] = mask_to_rle_pytorch(data["masks"])
        del data["masks"]
        return data

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Remove small islands and holes, then re-run box NMS (prefers unchanged masks)."""
        if len(mask_data["rles"]) == 0:
            return mask_data
        new_masks, scores = [], []
        for rle in mask_data["rles"]:
            mask = rle_to_mask(rle)
            mask, changed_h = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_i = remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(torch.as_tensor(mask).unsqueeze(0))
            scores.append(float(not (changed_h or changed_i)))
        masks = torch.cat(new_masks, dim=0)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                mask_data["rles"][i] = mask_to_rle_pytorch(masks[i].unsqueeze(0))[0]
                mask_data["boxes"][i] = boxes[i]
        mask_data.filter(keep)
        return mask_data
