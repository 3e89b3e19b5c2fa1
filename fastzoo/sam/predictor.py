"""``SamPredictor``: embed an image once, then predict masks for many prompts."""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .modeling import Sam
from .transforms import ResizeLongestSide

#: ``SamPredictor.predict_torch(batching=...)``: how the prompts of several images are decoded.
BATCHING_MODES = ("packed", "nested", "loop")


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an HxWx3 image array, found {type(image).__name__} with shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image with values in [0, 255], found dtype {image.dtype}")


class SamPredictor:
    """Drop-in replacement for ``segment_anything.SamPredictor``.

    Beyond the reference API, :meth:`set_images` embeds a batch of images in one encoder call
    and :meth:`predict_torch` then takes ``num_prompts`` (prompts per image, concatenated
    along dim 0), decodes all prompts in one batched call (``batching``) and returns
    per-image lists.
    """

    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    # ------------------------------------------------------------------ images
    def _to_input_tensor(self, image: np.ndarray, image_format: str) -> torch.Tensor:
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', found {image_format!r}")
        _check_image(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(image)
        return torch.as_tensor(np.ascontiguousarray(resized), device=self.device).permute(2, 0, 1).contiguous()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an HxWx3 uint8 image (``image_format`` 'RGB' or 'BGR')."""
        x = self._to_input_tensor(image, image_format)
        self.set_torch_image(x[None], image.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self,
        transformed_image: torch.Tensor,
        original_image_size: Union[Tuple[int, ...], Sequence[Tuple[int, ...]]],
    ) -> None:
        """Embed ``Bx3xHxW`` image(s) already resized with ``ResizeLongestSide``.

        For B > 1, ``original_image_size`` is one (H, W) shared by all images or a list of B.
        """
        img_size = self.model.image_encoder.img_size
        if not (
            transformed_image.ndim == 4
            and transformed_image.shape[1] == 3
            and max(*transformed_image.shape[2:]) == img_size
        ):
            raise ValueError(
                f"set_torch_image input must be Bx3xHxW with long side {img_size}, found shape "
                f"{tuple(transformed_image.shape)}"
            )
        self.reset_image()
        b = transformed_image.shape[0]
        input_size = tuple(int(s) for s in transformed_image.shape[-2:])
        sizes = list(original_image_size) if b > 1 and isinstance(original_image_size[0], (tuple, list)) else None
        if sizes is None:
            sizes = [tuple(int(s) for s in original_image_size)] * b
        self._set_features(self.model.preprocess(transformed_image), [input_size] * b, sizes)

    @torch.no_grad()
    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Embed a batch of HxWx3 uint8 images (any sizes) with one encoder call."""
        if len(images) == 0:
            raise ValueError("set_images needs at least one image")
        self.reset_image()
        xs = [self._to_input_tensor(im, image_format) for im in images]
        batch = torch.stack([self.model.preprocess(x) for x in xs])
        self._set_features(batch, [tuple(x.shape[-2:]) for x in xs], [tuple(im.shape[:2]) for im in images])

    def _set_features(self, batch: torch.Tensor, input_sizes: List[Tuple[int, int]], original_sizes) -> None:
        self.features = self.model.image_encoder(batch)
        self.input_sizes = [tuple(int(v) for v in s) for s in input_sizes]
        self.original_sizes = [tuple(int(v) for v in s) for s in original_sizes]
        self.input_size = self.input_sizes[0]
        self.original_size = self.original_sizes[0]
        self.is_image_set = True

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (CxHxW), IoU predictions (C) and low-res logits (Cx256x256) as numpy arrays.

        Coordinates are (x, y) pixels of the original image; ``box`` is XYXY.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            point_coords = self.transform.apply_coords(np.asarray(point_coords), self.original_size)
            coords_t = torch.as_tensor(point_coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = self.transform.apply_boxes(np.asarray(box), self.original_size)
            box_t = torch.as_tensor(box, dtype=torch.float, device=self.device)[None, :]
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        *,
        num_prompts: Optional[Sequence[int]] = None,
        batching: str = "packed",
    ):
        """Batched prediction with prompts already in the resized frame (``ResizeLongestSide``).

        Shapes as in segment_anything: ``point_coords`` BxNx2, ``point_labels`` BxN, ``boxes``
        Bx4, ``mask_input`` Bx1x256x256.  Returns masks BxCxHxW (bool, or float32 logits with
        ``return_logits``), IoU predictions BxC and low-res logits BxCx256x256.

        After :meth:`set_images` (several images), pass ``num_prompts``: how many of the B
        prompts belong to each image, in order (0 allowed).  The three results are then lists
        with one tensor per image (images may have different sizes).  ``batching`` says how the
        prompts of all images are decoded:

        - ``"packed"`` (default): one prompt-encoder and one mask-decoder call on all B prompts;
          each prompt's image embedding is gathered with an index built on the device;
        - ``"nested"``: the same single calls, the embeddings broadcast to the prompts through a
          ``torch.nested`` jagged tensor (images x ragged prompts);
        - ``"loop"``: one prompt-encoder + mask-decoder call per image.

        All three give the same results; they differ only in speed
        (``experiments/bench_sam_prompts.py`` measures them).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, found {batching!r}")
        n_images = self.features.shape[0]
        if num_prompts is None:
            if n_images != 1:
                raise ValueError(
                    f"{n_images} images are set; pass num_prompts (prompts per image) to predict_torch"
                )
            low_res, iou = self._decode(point_coords, point_labels, boxes, mask_input, multimask_output,
                                        self.features)
            masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
            if not return_logits:
                masks = masks > self.model.mask_threshold
            return masks, iou, low_res
        counts = [int(c) for c in num_prompts]
        total = self.model.prompt_encoder._get_batch_size(
            (point_coords, point_labels) if point_coords is not None else None, boxes, mask_input)
        if len(counts) != n_images or sum(counts) != total or min(counts) < 0:
            raise ValueError(
                f"num_prompts={counts} must have one non-negative entry per image ({n_images}) summing to "
                f"the number of prompts ({total})"
            )
        if batching == "loop":
            lows, ious = [], []
            start = 0
            for i, c in enumerate(counts):
                sl = slice(start, start + c)
                pick = lambda t: None if t is None else t[sl]  # noqa: E731
                lr, io = self._decode(pick(point_coords), pick(point_labels), pick(boxes), pick(mask_input),
                                      multimask_output, self.features[i : i + 1])
                lows.append(lr)
                ious.append(io)
                start += c
        else:
            features = self._features_per_prompt(counts, batching)
            low_res, iou = self._decode(point_coords, point_labels, boxes, mask_input, multimask_output, features)
            lows, ious = list(low_res.split(counts)), list(iou.split(counts))
        out_masks = []
        for i, lr in enumerate(lows):
            m = self.model.postprocess_masks(lr, self.input_sizes[i], self.original_sizes[i])
            out_masks.append(m if return_logits else m > self.model.mask_threshold)
        return out_masks, ious, lows

    def _decode(self, point_coords, point_labels, boxes, mask_input, multimask_output, features):
        """Prompt encoder + mask decoder; ``features`` is (1, C, h, w) or one embedding per prompt."""
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return low_res.float(), iou.float()

    def _features_per_prompt(self, counts: List[int], batching: str) -> torch.Tensor:
        """The image embedding of each prompt, ``(sum(counts), C, h, w)``, without a host sync."""
        feats = self.features
        dev = feats.device
        total = sum(counts)
        counts_t = torch.tensor(counts, dtype=torch.int64)
        # pinned + non_blocking: the copy is queued on the stream, the host does not wait
        counts_t = counts_t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else counts_t.to(dev)
        if batching == "packed":
            index = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts_t, output_size=total)
            return feats.index_select(0, index)
        # nested: a (images, ragged prompts, 1) jagged tensor of zeros plus the (images, 1, C*h*w)
        # embeddings broadcasts each image's embedding over its prompts (0 + x is exact).
        offsets = torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)])
        slots = torch.nested.nested_tensor_from_jagged(
            feats.new_zeros(total, 1), offsets, min_seqlen=min(counts), max_seqlen=max(counts))
        per_prompt = slots + feats.flatten(1).unsqueeze(1)
        return per_prompt.values().view(total, *feats.shape[1:])

    def get_image_embedding(self) -> torch.Tensor:
        """The embedding(s) of the set image(s): ``B x C x h x w`` (B = 1 after ``set_image``)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image(s)."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
        self.original_sizes: List[Tuple[int, int]] = []
        self.input_sizes: List[Tuple[int, int]] = []
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
