"""The model call for inference, plain PyTorch: uint8 images -> grades, scores, probabilities.

Shared by the Ray Data actors of ``infer.predict``, the single-process benchmark and the export
parity check, so all three decode exactly as validation did in training.
"""

from __future__ import annotations

import numpy as np
import torch

from aptos_ray.metrics import NUM_GRADES, REFERABLE_GRADE
from aptos_ray.model.factory import create_model, model_data_config
from aptos_ray.model.heads import get_head
from aptos_ray.train.augment import GradeTransforms, to_device
from aptos_ray.train.checkpoint import Checkpoint, load_weights
from aptos_ray.train.step import autocast, resolve_precision

PROB_COLUMNS = [f"prob_{g}" for g in range(NUM_GRADES)]


# Extra views for test-time augmentation: fundus photographs have no canonical orientation, so the
# flips (and then the rest of the square's symmetries) show the model the same eye again.
TTA_VIEWS = (
    lambda x: x.flip(3),  # horizontal flip
    lambda x: x.flip(2),  # vertical flip
    lambda x: x.flip(2).flip(3),  # both = rotation by 180
    lambda x: x.transpose(2, 3),
    lambda x: x.transpose(2, 3).flip(3),  # rotation by 90
    lambda x: x.transpose(2, 3).flip(2),  # rotation by 270
    lambda x: x.flip(2).flip(3).transpose(2, 3),
)


class Grader:
    """A checkpoint's model with its transforms: uint8 NHWC images -> grades, scores, probabilities."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device | str = "cpu", tta: int = 0):
        cfg = checkpoint.config
        self.device = torch.device(device)
        self.head = get_head(cfg.model.head)
        self.cut_points = checkpoint.cut_points
        self.tta = tta
        # As validation ran in training; a bf16 run predicted on a GPU without bf16 falls back to fp16.
        precision = "auto" if cfg.train.precision == "bf16" else cfg.train.precision
        self.precision = resolve_precision(precision, self.device)
        model = create_model(cfg.model, load_pretrained=False)
        load_weights(model, checkpoint, cfg)
        self.model = model.to(self.device).eval()
        data = model_data_config(model)
        self.size = cfg.data.image_size or data["input_size"][-1]
        self.mean, self.std = data["mean"], data["std"]
        self.transforms = GradeTransforms(self.size, self.mean, self.std, augment=False)

    @torch.no_grad()
    def outputs(self, images: np.ndarray) -> torch.Tensor:
        """Model outputs (float32, CPU) for uint8 (N, H, W, 3); TTA views combined.

        Without TTA these are the raw outputs, exactly what validation decoded in training; with
        TTA the head merges the views (``Head.merge_views``).
        """
        x = self.transforms.eval(to_device(images, self.device))
        views = [x] + [view(x) for view in TTA_VIEWS[: self.tta]]
        outs = []
        for v in views:
            with autocast(self.device, self.precision):
                outs.append(self.model(v).float().cpu())
        return self.head.merge_views(outs)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{predicted, score, p_referable, prob_0..4} for uint8 (N, H, W, 3)."""
        out = self.outputs(images)
        result = {
            "predicted": self.head.grades(out, self.cut_points).numpy().astype(np.int64),
            "score": self.head.scores(out).numpy().astype(np.float64),
        }
        probs = self.head.probabilities(out)
        if probs is not None:
            probs = probs.numpy().astype(np.float64)
            result["p_referable"] = probs[:, REFERABLE_GRADE:].sum(axis=1)
            result.update({c: probs[:, g] for g, c in enumerate(PROB_COLUMNS)})
        return result

    @property
    def output_columns(self) -> list[str]:
        """The float columns ``__call__`` returns besides ``predicted``."""
        return ["score", *(["p_referable", *PROB_COLUMNS] if self.head.has_probabilities else [])]
