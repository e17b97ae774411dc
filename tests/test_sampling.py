import numpy as np
import pytest

from aptos_ray.data.format import encode_image
from aptos_ray.train.sampling import repeat_rates, resample_batches
from aptos_ray.train.step import fixed_step_minibatches

COUNTS = {0: 1444, 1: 296, 2: 799, 3: 154, 4: 236}  # the shared APTOS folder's grades


def rows(n_per_grade: dict[int, int], size: int = 4) -> dict:
    ids, grades = [], []
    for g, n in n_per_grade.items():
        ids += [f"img{g}_{i}" for i in range(n)]
        grades += [g] * n
    image = encode_image(np.zeros((size, size, 3), np.uint8))
    return {"id": np.array(ids, dtype=object), "grade": np.array(grades),
            "image": np.array([image] * len(ids), dtype=object),
            "height": np.full(len(ids), size), "width": np.full(len(ids), size)}


@pytest.mark.parametrize("mode", ["none", "inverse", "sqrt"])
def test_resampled_mix_matches_the_configured_weighting(mode):
    batch = rows(COUNTS)
    out = list(resample_batches([batch], repeat_rates(COUNTS, mode), seed=0, epoch=0))
    grades = np.concatenate([b["grade"] for b in out])
    mix = np.bincount(grades, minlength=5) / len(grades)
    # Independently of the code under test: each grade's share is count x its weight, normalised.
    weight = {"none": lambda n: 1.0, "inverse": lambda n: 1.0 / n, "sqrt": lambda n: n ** -0.5}[mode]
    mass = {g: n * weight(n) for g, n in COUNTS.items()}
    expected = {g: m / sum(mass.values()) for g, m in mass.items()}
    assert len(grades) == pytest.approx(sum(COUNTS.values()), rel=0.05)  # epoch keeps its size
    for g in range(5):
        assert mix[g] == pytest.approx(expected[g], abs=0.03)
    if mode == "inverse":
        assert all(abs(expected[g] - 0.2) < 1e-9 for g in range(5))  # balanced, like the seed's sampler
    if mode == "none":
        assert mix[0] > 0.45


def test_resampling_is_reproducible_and_order_independent_but_changes_per_epoch():
    batch = rows({0: 50, 3: 10})
    rates = repeat_rates({0: 50, 3: 10}, "inverse")
    first = next(resample_batches([batch], rates, seed=1, epoch=0))
    reversed_batch = {k: v[::-1] for k, v in batch.items()}
    again = next(resample_batches([reversed_batch], rates, seed=1, epoch=0))
    assert sorted(first["id"]) == sorted(again["id"])
    other_epoch = next(resample_batches([batch], rates, seed=1, epoch=1))
    assert sorted(first["id"]) != sorted(other_epoch["id"])


def test_every_rank_gets_exactly_the_same_number_of_steps():
    long_shard = [rows({0: 100, 1: 30})]
    short_shard = [rows({0: 5})]
    for shard in (long_shard, short_shard, [rows({0: 100})] * 3):
        out = list(fixed_step_minibatches(shard, batch_size=8, steps=12, seed=0))
        assert len(out) == 12
        assert all(images.shape == (8, 4, 4, 3) for images, _ in out)


def test_extra_rows_are_drained_not_left_mid_stream():
    consumed = []

    def stream():
        for i in range(5):
            consumed.append(i)
            yield rows({0: 16})

    assert len(list(fixed_step_minibatches(stream(), batch_size=8, steps=2, seed=0))) == 2
    assert consumed == [0, 1, 2, 3, 4]
