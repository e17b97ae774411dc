"""Grade heads: what the model's outputs mean, and everything that follows from it.

A head owns the output width, the training loss, how outputs become a continuous grade score,
integer grades and (where the model has them) probabilities, whether validation fits QWK
cut-points, how test-time-augmented views merge, and how export describes the decoding. The
training loop, predict and export ask the head and never switch on its name, so adding a head
(an ordinal one, say) is adding one class here and one entry in ``HEADS``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aptos_ray.metrics import DEFAULT_CUT_POINTS, NUM_GRADES, apply_cut_points, optimise_cut_points

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Head:
    """Base class: decoding by cut-points on the continuous score."""

    name = ""
    fits_cut_points = False  # validation optimises QWK cut-points on the score
    has_probabilities = False  # outputs give P(grade = k)
    output_meaning = ""  # what export says the outputs are

    def __init__(self, num_grades: int = NUM_GRADES):
        self.num_grades = num_grades

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
        raise NotImplementedError

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """One continuous grade score per image (for cut-points, ROC curves and ranking)."""
        raise NotImplementedError

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor | None:
        return None

    def grades(self, outputs: torch.Tensor, cut_points: list[float] | None = None) -> torch.Tensor:
        """Integer grades (int64, CPU): the score cut at ``cut_points`` (default 0.5, 1.5, 2.5, 3.5)
        by ``metrics.apply_cut_points``, the one decoding the cut-points were fitted with: a score
        equal to a cut-point takes the higher grade.
        """
        cuts = DEFAULT_CUT_POINTS if cut_points is None else cut_points
        return torch.from_numpy(apply_cut_points(self.scores(outputs).cpu().numpy(), cuts).astype(np.int64))

    def fit_cut_points(self, outputs: torch.Tensor, grades: np.ndarray) -> list[float] | None:
        """QWK-optimal cut-points on validation outputs, or None where the head decodes without."""
        if not self.fits_cut_points:
            return None
        return optimise_cut_points(self.scores(outputs).numpy(), grades)

    def merge_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Outputs of several test-time views of the same images -> one output per image."""
        return views[0] if len(views) == 1 else torch.stack(views).mean(0)

    def decoding(self, cut_points: list[float] | None) -> str:
        """How to turn exported outputs into grades, in words (recorded by export)."""
        raise NotImplementedError


class RegressionHead(Head):
    """One output: the grade as a number, trained with MSE, cut at QWK-optimised cut-points."""

    name = "regression"
    fits_cut_points = True
    output_meaning = "continuous grade score"

    @property
    def num_outputs(self) -> int:
        return 1

    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
        def mse(outputs: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(outputs.squeeze(1), grades.float())

        return mse

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        outputs = outputs.detach().float()
        return outputs.reshape(len(outputs), -1)[:, 0]

    def decoding(self, cut_points: list[float] | None) -> str:
        return "outputs[:, 0] cut at cut_points (a score equal to a cut point takes the higher grade)"


class ClassificationHead(Head):
    """One logit per grade, cross-entropy (optionally class-weighted, as in the seed), argmax."""

    name = "classification"
    has_probabilities = True
    output_meaning = "logits for grades 0-4"

    @property
    def num_outputs(self) -> int:
        return self.num_grades

    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
        def cross_entropy(outputs: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
            weight = class_weights.to(outputs.device) if class_weights is not None else None
            return F.cross_entropy(outputs, grades, weight=weight, label_smoothing=label_smoothing)

        return cross_entropy

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs.detach().float(), dim=1)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """The expected grade sum(p_k * k)."""
        probs = self.probabilities(outputs)
        return probs @ torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)

    def grades(self, outputs: torch.Tensor, cut_points: list[float] | None = None) -> torch.Tensor:
        """The argmax, or, when ``cut_points`` are given, the expected grade cut at them."""
        if cut_points is None:
            return outputs.detach().argmax(dim=1)
        return super().grades(outputs, cut_points)

    def merge_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Average the views' probabilities, returned as log-probabilities so decoding is unchanged."""
        if len(views) == 1:
            return views[0]
        return torch.stack([v.softmax(dim=1) for v in views]).mean(0).log()

    def decoding(self, cut_points: list[float] | None) -> str:
        if cut_points is None:
            return f"argmax of the {self.num_grades} outputs"
        return "expected grade sum(softmax(outputs)_k * k), cut at cut_points (a tie takes the higher grade)"


HEADS: dict[str, type[Head]] = {"regression": RegressionHead, "classification": ClassificationHead}


def get_head(name: str, num_grades: int = NUM_GRADES) -> Head:
    """The head called ``name`` (``model.head``)."""
    return HEADS[name](num_grades)
