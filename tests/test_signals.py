"""The per-epoch signals (amdim.signals): weighted kNN and RankMe on constructed features whose
answer is known, a loop-by-loop reference for the kNN vote, and the trainer logging both."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amdim.signals import knn_accuracy, knn_predict, rankme


def _reference_knn(query, bank, labels, n_classes, k, temperature):
    """The vote written out one query and one neighbour at a time."""
    out = []
    for q in query:
        sims = [float(F.cosine_similarity(q, b, dim=0)) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_classes
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / temperature)
        out.append(max(range(n_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


def test_separated_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat_interleave(25)
    bank = centres[labels] + torch.randn(100, 16, generator=g)
    qlabels = torch.arange(4).repeat(5)
    query = centres[qlabels] + torch.randn(20, 16, generator=g)
    assert knn_accuracy(query, qlabels, bank, labels, 4, k=20, temperature=0.07) == 1.0
    # Cosine similarity: scaling a query or the bank changes nothing.
    assert knn_accuracy(query * 7, qlabels, bank * 0.1, labels, 4, k=20, temperature=0.07) == 1.0


def test_the_temperature_weighs_close_neighbours_against_many_far_ones():
    """One bank entry of class 0 almost on the query, two of class 1 further away: with a small T
    the close one outvotes the two (exp(0.99/T) >> 2 exp(0.5/T)); with a large T, two votes beat one."""
    query = torch.tensor([[1.0, 0.0]])
    close = [0.99, math.sqrt(1 - 0.99**2)]
    far = [0.5, math.sqrt(1 - 0.25)]
    bank = torch.tensor([close, far, [0.5, -math.sqrt(0.75)]])
    labels = torch.tensor([0, 1, 1])
    assert knn_predict(query, bank, labels, 2, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(query, bank, labels, 2, k=3, temperature=10.0).tolist() == [1]
    assert knn_predict(query, bank, labels, 2, k=1, temperature=10.0).tolist() == [0]  # k=1: nearest only


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.1), (20, 0.07), (200, 0.5)])
def test_knn_matches_the_reference_vote(k, temperature):
    g = torch.Generator().manual_seed(k)
    bank, query = torch.randn(60, 8, generator=g), torch.randn(15, 8, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    expected = _reference_knn(query, bank, labels, 5, min(k, 60), temperature)
    got = knn_predict(query, bank, labels, 5, k=k, temperature=temperature, chunk=4)  # several chunks
    assert got.tolist() == expected.tolist()


def test_knn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(3, dtype=torch.long), 2, k=0)
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.ones(1, 2), torch.ones(0, 2), torch.zeros(0, dtype=torch.long), 2)
    assert math.isnan(knn_accuracy(torch.ones(0, 2), torch.zeros(0), torch.ones(3, 2), torch.zeros(3), 2))


@pytest.mark.parametrize("r", [1, 3, 8])
def test_rankme_counts_equal_directions(r):
    """r orthogonal directions with equal singular values: p_k = 1/r, entropy log r, RankMe r."""
    q, _ = torch.linalg.qr(torch.randn(50, 16, generator=torch.Generator().manual_seed(r)))
    z = q[:, :r] @ torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(9)))[0][:r]
    assert rankme(z) == pytest.approx(r, rel=1e-4)
    assert rankme(3.5 * z) == pytest.approx(r, rel=1e-4)  # scale-free


def test_rankme_follows_the_singular_value_entropy():
    """Singular values (3, 1): p = (3/4, 1/4), RankMe = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548."""
    z = torch.diag(torch.tensor([3.0, 1.0]))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert rankme(z) == pytest.approx(expected, rel=1e-5)
    assert rankme(torch.ones(10, 4)) == pytest.approx(1.0, rel=1e-4)  # collapsed: one direction
    assert 1.0 <= rankme(torch.randn(200, 32)) <= 32


def test_training_logs_both_signals_on_the_split_only_when_there_is_one():
    from amdim.config import preset, with_overrides
    from amdim.trainer import fit

    base = {
        "data.spec": "synthetic:n_train=256,n_test=64",
        "data.batch_size": 32,
        "train.epochs": 1,
        "train.max_steps_per_epoch": 2,
        "model.ndf": 16,
        "model.n_rkhs": 128,
        "model.mlp_hidden": 32,
        "train.device": "cpu",
    }
    with_split = fit(with_overrides(preset("tiny"), {**base, "data.online_val_fraction": 0.2}), log=None)
    m = with_split.history[-1]
    assert 0.0 <= m["val_acc_knn"] <= 1.0 and 1.0 <= m["rankme"] <= 128 and m["signals_time_s"] > 0
    no_knn = fit(
        with_overrides(preset("tiny"), {**base, "data.online_val_fraction": 0.2, "train.knn_bank": 0}),
        log=None,
    )
    assert "val_acc_knn" not in no_knn.history[-1] and "rankme" in no_knn.history[-1]
    without = fit(with_overrides(preset("tiny"), base), log=None)
    assert not {"val_acc_knn", "rankme"} & set(without.history[-1])


def test_the_bank_leaves_out_the_split_and_the_unlabelled():
    from amdim.trainer import knn_bank_indices

    labels = torch.tensor([0, 1, -1, 2, 0, 1, -1, 2, 0, 1])
    train_idx = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # 7, 8, 9 are the split
    assert knn_bank_indices(train_idx, labels, 100, seed=1).tolist() == [0, 1, 3, 4, 5]
    sub = knn_bank_indices(train_idx, labels, 3, seed=1)
    assert len(sub) == 3 and set(sub.tolist()) <= {0, 1, 3, 4, 5}
    assert sub.tolist() == knn_bank_indices(train_idx, labels, 3, seed=1).tolist()  # seeded
