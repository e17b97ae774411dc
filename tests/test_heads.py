"""model/heads.py: what each head's outputs mean (loss, scores, grades, cut-points, TTA merging)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers
from aptos_ray.config import ModelConfig
from aptos_ray.metrics import apply_cut_points, optimise_cut_points
from aptos_ray.model.factory import create_model
from aptos_ray.model.heads import HEADS, ClassificationHead, RegressionHead, get_head


def test_classification_decoding():
    head = ClassificationHead()
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [0, 0, 0, 0, 5.0], [0, 0, 0, 0, 0]])
    assert head.grades(logits).tolist() == [0, 4, 0]
    scores = head.scores(logits)
    assert scores[2].item() == pytest.approx(2.0)  # uniform -> expected grade 2
    assert scores[0].item() < 0.1 and scores[1].item() > 3.9
    # cut points on the expected grade
    assert head.grades(logits, [0.5, 1.5, 2.5, 3.5]).tolist() == [0, 4, 2]
    assert head.probabilities(logits).sum(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_regression_decoding():
    head = RegressionHead()
    outputs = torch.tensor([[-1.0], [0.5], [0.51], [1.7], [2.4], [3.6], [9.0]])
    assert head.scores(outputs).tolist() == pytest.approx(outputs[:, 0].tolist())
    assert head.grades(outputs).tolist() == [0, 1, 1, 2, 2, 4, 4]  # 0.5 is a tie: the higher grade
    custom = head.grades(outputs, [2.0, 0.6, 3.0, 1.0])  # sorted first
    assert custom.tolist() == [0, 0, 0, 2, 3, 4, 4]
    assert head.grades(outputs[:, 0]).dtype == torch.int64
    assert head.probabilities(outputs) is None


def test_a_score_on_a_cut_point_decodes_alike_everywhere_to_the_higher_grade():
    # Fitting (apply_cut_points) and decoding (Head.grades) must agree, or the fitted QWK is not
    # what validation and predict report. Under bf16 scores land exactly on x.5 often.
    on_defaults = torch.tensor([[0.5], [1.5], [2.5], [3.5]])
    assert RegressionHead().grades(on_defaults).tolist() == [1, 2, 3, 4]
    cuts = [0.5, 1.4625, 2.5, 3.5]  # a fitted cut, not exact in float32: compared alike anyway
    scores = torch.tensor(cuts, dtype=torch.float32)
    assert RegressionHead().grades(scores.unsqueeze(1), cuts).tolist() == apply_cut_points(scores.numpy(), cuts).tolist()
    logits = torch.zeros(1, 5)  # uniform: expected grade exactly 2.0
    assert ClassificationHead().grades(logits, [0.5, 1.5, 2.0, 3.5]).tolist() == [3]
    # what the optimiser scores is what the head decodes, ties included
    grades = np.array([0, 1, 1, 2, 3, 3, 4])
    tied = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.5, 3.0, 3.5]).unsqueeze(1)
    fitted = optimise_cut_points(tied[:, 0].numpy(), grades)
    assert RegressionHead().grades(tied, fitted).tolist() == apply_cut_points(tied[:, 0].numpy(), fitted).tolist()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_the_head_computes_in_fp32_under_bf16_autocast(name):
    # A bf16 head would round 2.495 to 2.5, a cut-point: the head runs in fp32 whatever autocast says.
    model = create_model(ModelConfig(name="test_efficientnet", pretrained="none", head=name)).eval()
    classifier = model.get_classifier()
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.fill_(2.495)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.rand(2, 3, 32, 32))
    assert outputs.dtype == torch.float32
    assert outputs[0, 0].item() == pytest.approx(2.495, abs=1e-6)
    if name == "regression":
        assert get_head(name).grades(outputs).tolist() == [2, 2]


def test_the_fp32_head_keeps_the_state_dict_keys_and_plain_outside_autocast():
    model = create_model(ModelConfig(name="test_efficientnet", pretrained="none"))
    plain = create_model(ModelConfig(name="test_efficientnet", pretrained="none"))
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(x), plain.eval()(x))


def test_cut_points_are_fitted_only_where_the_head_decodes_by_them():
    grades = np.array([0, 0, 1, 2, 2, 3, 4, 4])
    outputs = torch.tensor(grades * 0.5, dtype=torch.float32).unsqueeze(1)  # a model that under-calls
    cuts = RegressionHead().fit_cut_points(outputs, grades)
    assert RegressionHead().grades(outputs, cuts).tolist() == grades.tolist()  # refitted: all right
    assert ClassificationHead().fit_cut_points(torch.zeros(8, 5), grades) is None


def test_tta_merging():
    views = [torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [4.0]])]
    assert RegressionHead().merge_views(views).tolist() == [[1.5], [3.5]]
    logits = [torch.tensor([[10.0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 0, 10.0]])]
    merged = ClassificationHead().merge_views(logits).softmax(dim=1)
    assert merged[0, 0].item() == pytest.approx(0.5, abs=1e-3) and merged[0, 4].item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_sets_the_models_output_width_and_trains(name):
    head = get_head(name)
    model = create_model(helpers.tiny_model(head=name))
    outputs = model(torch.rand(2, 3, 32, 32))
    assert outputs.shape == (2, head.num_outputs)
    loss = head.loss()(outputs, torch.tensor([0, 4]))
    loss.backward()
    assert loss.item() > 0 and head.decoding(None)




def test_the_config_offers_every_head_and_no_other():
    """model.head's choices are written in config.py (it imports no torch): they must be HEADS' names."""
    import typing

    from aptos_ray.config import ModelConfig

    assert set(typing.get_args(ModelConfig.__pydantic_fields__["head"].annotation)) == set(HEADS)
