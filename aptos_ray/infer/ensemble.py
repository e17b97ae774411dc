"""Several checkpoints graded as one model: the fold models of a cross-validation (``jobs/cv.py``), or
checkpoints given comma-separated in ``predict.checkpoint``.

Each member runs its own transforms and test-time views (``Grader.outputs``); the members' outputs are
merged the way the head merges test-time views (``Head.merge_views``: the mean of a regression head's
grade scores, the mean of a classification head's probabilities). A cross-validation folder brings the
decisions chosen on its out-of-fold predictions (``cv.json``): the QWK cut-points, and the referral
operating point, which adds two columns: ``refer`` (score >= the threshold set for
``cv.target_sensitivity``) and ``p_referable`` (P(grade >= 2 | score), logistic on the out-of-fold scores;
a classification head's own P(grade >= 2) otherwise). A plain list of checkpoints cuts the mean score at
the mean of the members' cut-points.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch

from aptos_ray import storage
from aptos_ray.data.embedded import LOOK_KEYS
from aptos_ray.errors import ConfigError, MissingFileError
from aptos_ray.train.checkpoint import Checkpoint, read_checkpoint, resolve_checkpoint
from aptos_ray.infer.grader import PROB_COLUMNS, Grader
from aptos_ray.metrics import p_referable

CV_FILE = "cv.json"  # tune.cv_results writes it; read here as data (infer does not import tune)


@dataclass
class Ensemble:
    """What ``predict.checkpoint`` names: one checkpoint or several, and a cross-validation's decisions."""

    spec: str  # resolved on the driver (absolute paths, URIs): the actors read it again where they run
    members: list[str]  # model.pt of each member
    cut_points: list[float] | None
    referral: dict | None  # cv.json's "referral": threshold, target_sensitivity, calibration, ...
    cv_dir: str | None = None
    cut_rule: str | None = None  # cv.json's cv.cut_rule (cross-validations before it had one: qwk)

    def meta(self) -> dict:
        """What predict.json records about the model(s)."""
        return {"models": self.members, "cut_points": self.cut_points, "referral": self.referral,
                "cross_validation": self.cv_dir, "cut_rule": self.cut_rule}

    def cut_points_made_by(self, cut_points: list[float] | None) -> str:
        """In words: how the cut-points that grade these predictions were chosen."""
        if cut_points is None:
            return "no cut-points: the most probable grade"
        if self.cv_dir:
            return f"cv.cut_rule={self.cut_rule} on the out-of-fold scores of {self.cv_dir}"
        if len(self.members) > 1:
            return "the mean of the members' cut-points, each maximising QWK on its run's validation split"
        return "maximising QWK on the run's validation split"


def _is_cv_dir(path: str) -> bool:
    return not path.endswith(".pt") and storage.exists(storage.join(path, CV_FILE))


def _cv_member(cv_dir: str, model: dict) -> str:
    """A fold's checkpoint as cv.json names it, or at the same place below a moved folder."""
    for candidate in (model["checkpoint"], storage.join(cv_dir, f"fold_{model['fold']}",
                                                        model["checkpoint"].rstrip("/").rsplit("/", 1)[-1])):
        try:
            return resolve_checkpoint(candidate)
        except MissingFileError:
            continue
    raise MissingFileError(f"{storage.join(cv_dir, CV_FILE)}: fold {model['fold']}'s checkpoint "
                           f"{model['checkpoint']} not found (pruned or moved?)")


def read_ensemble(spec: str) -> Ensemble:
    """``predict.checkpoint`` -> its members; a cross-validation folder brings its cut-points and
    referral point (then it must be the only entry)."""
    parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
    if not parts:
        raise ConfigError("set --predict.checkpoint to a run directory, a checkpoint directory, a model.pt "
                          "or a cross-validation folder (several: comma-separated)")
    cv_parts = [p for p in parts if _is_cv_dir(storage.absolute(p))]
    if cv_parts:
        if len(parts) > 1:
            raise ConfigError(f"predict.checkpoint: a cross-validation folder ({cv_parts[0]}) ensembles its own "
                              "fold models; give it alone")
        cv_dir = storage.absolute(cv_parts[0])
        cv = json.loads(storage.read_text(storage.join(cv_dir, CV_FILE)))
        members = [_cv_member(cv_dir, m) for m in cv["models"]]
        return Ensemble(cv_dir, members, cv.get("cut_points"), cv.get("referral"), cv_dir, cv.get("cut_rule", "qwk"))
    # The members as found here: a relative path would be resolved again in each actor's own
    # working directory, somewhere else.
    members = [resolve_checkpoint(p) for p in parts]
    return Ensemble(",".join(members), members, None, None)


def check_heads(heads: dict[str, str]) -> None:
    """ConfigError when the members ({model.pt: head}) do not share one head."""
    if len(set(heads.values())) > 1:
        each = ", ".join(f"{path} {head}" for path, head in heads.items())
        raise ConfigError(f"predict.checkpoint: the ensemble mixes heads ({each}); its outputs cannot be averaged")


def check_members(checkpoints: list[Checkpoint]) -> None:
    """Members that cannot be one model: other heads, other preprocessing of the
    photographs (where the checkpoints say: the driver preprocesses them once for every member, each then
    resizes to its own input size). Run by the driver, before Ray starts."""
    check_heads({c.path: f"{c.config.model.head} head" for c in checkpoints})
    known = [c for c in checkpoints if c.preprocessing is not None]
    looks = {c.path: tuple(c.preprocessing.get(k) for k in LOOK_KEYS) for c in known}
    if len(set(looks.values())) > 1:
        each = "; ".join(f"{path}: {', '.join(f'{k}={v}' for k, v in zip(LOOK_KEYS, look))}"
                         for path, look in looks.items())
        raise ConfigError(f"predict.checkpoint: the ensemble's models were trained on images preprocessed "
                          f"differently ({each}); predict them separately")


def checkpoint_for_driver(ensemble: Ensemble) -> tuple[Checkpoint, Checkpoint]:
    """(the first member, that member carrying the ensemble's spec as its path): predict's driver
    reads the config and preprocessing of the first one and hands the spec to its actors, once
    ``check_members`` found the members fit together."""
    first = read_checkpoint(ensemble.members[0])
    if len(ensemble.members) == 1 and ensemble.cv_dir is None:
        return first, first
    check_members([first, *(read_checkpoint(m) for m in ensemble.members[1:])])
    return first, dataclasses.replace(first, path=ensemble.spec, cut_points=ensemble.cut_points)


class EnsembleGrader:
    """Members' ``Grader``s whose outputs are merged; the same interface as ``Grader``."""

    def __init__(self, checkpoints: list[Checkpoint], device: torch.device | str = "cpu", tta: int = 0,
                 cut_points: list[float] | None = None, referral: dict | None = None):
        self.graders = [Grader(c, device, tta) for c in checkpoints]
        check_heads({c.path: f"{g.head.name} head" for c, g in zip(checkpoints, self.graders)})
        self.head = self.graders[0].head
        own = [g.cut_points for g in self.graders]
        if cut_points is None and all(c is not None for c in own):
            cut_points = np.mean(np.sort(np.asarray(own, dtype=float), axis=1), axis=0).round(4).tolist()
        self.cut_points = cut_points
        self.referral = referral if referral and referral.get("threshold") is not None else None

    @torch.no_grad()
    def outputs(self, images: np.ndarray) -> torch.Tensor:
        return self.head.merge_views([g.outputs(images) for g in self.graders])

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.outputs(images)
        score = self.head.scores(out).numpy().astype(np.float64)
        result = {"predicted": self.head.grades(out, self.cut_points).numpy().astype(np.int64), "score": score}
        probs = self.head.probabilities(out)
        if probs is not None:
            probs = probs.numpy().astype(np.float64)
            result["p_referable"] = probs[:, 2:].sum(axis=1)
            result.update({c: probs[:, g] for g, c in enumerate(PROB_COLUMNS)})
        if self.referral is not None:
            if self.referral.get("calibration"):
                result["p_referable"] = p_referable(score, self.referral["calibration"])
            result["refer"] = (score >= self.referral["threshold"]).astype(np.float64)
        return result

    @property
    def output_columns(self) -> list[str]:
        probs = self.head.has_probabilities
        calibrated = self.referral is not None and bool(self.referral.get("calibration"))
        return ["score", *(["p_referable"] if probs or calibrated else []),
                *(["refer"] if self.referral is not None else []), *(PROB_COLUMNS if probs else [])]


def build_grader(spec: str, device: torch.device | str = "cpu", tta: int = 0) -> Grader | EnsembleGrader:
    """The grader ``predict.checkpoint`` names: a ``Grader`` for one checkpoint, else an ensemble."""
    ensemble = read_ensemble(spec)
    if len(ensemble.members) == 1 and ensemble.cv_dir is None:
        return Grader(read_checkpoint(ensemble.members[0]), device, tta)
    return EnsembleGrader([read_checkpoint(m) for m in ensemble.members], device, tta,
                          ensemble.cut_points, ensemble.referral)
