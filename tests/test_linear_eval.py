import torch

from amdim.config import ProbeConfig
from amdim.linear_eval import PROTOCOL, linear_probe, stratified_split


def _blobs(n, d, classes, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * sep
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=g), y


def test_stratified_split_is_disjoint_balanced_and_seeded():
    y = torch.arange(200) % 4
    tr, va = stratified_split(y, 0.1, seed=3)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 200
    assert torch.bincount(y[va]).tolist() == [5, 5, 5, 5]
    assert torch.equal(va, stratified_split(y, 0.1, seed=3)[1])
    assert not torch.equal(va, stratified_split(y, 0.1, seed=4)[1])


def test_probe_separates_blobs_and_is_chance_on_noise():
    cfg = ProbeConfig(epochs=20, lrs=(1e-2,), weight_decays=(0.0, 1e-4))
    x, y = _blobs(600, 16, 5, sep=3.0, seed=0)
    xt, yt = _blobs(300, 16, 5, sep=3.0, seed=1)
    res = linear_probe(x, y, xt, yt, cfg)
    assert res["protocol"] == PROTOCOL
    assert res["test_accuracy"] > 0.95
    assert res["n_val"] == 60 and res["n_train"] == 600 and res["n_test"] == 300
    assert set(res["grid_val_accuracy"]) == {"lr=0.01,wd=0", "lr=0.01,wd=0.0001"}

    noise = linear_probe(torch.randn(600, 16), y, torch.randn(300, 16), yt, cfg)
    assert noise["test_accuracy"] < 0.35  # 5 classes: chance is 0.2


def test_unlabelled_rows_are_ignored_and_test_set_never_chooses():
    cfg = ProbeConfig(epochs=5, lrs=(1e-3, 1e-2), weight_decays=(0.0,))
    x, y = _blobs(300, 8, 3, sep=2.0, seed=0)
    y_unl = y.clone()
    y_unl[::3] = -1
    xt, yt = _blobs(90, 8, 3, sep=2.0, seed=1)
    res = linear_probe(x, y_unl, xt, yt, cfg)
    assert res["n_train"] == 200
    # Scrambling the test labels must not change which hyper-parameters were chosen.
    res2 = linear_probe(x, y_unl, xt, yt[torch.randperm(90)], cfg)
    assert (res["lr"], res["weight_decay"], res["val_accuracy"]) == (
        res2["lr"],
        res2["weight_decay"],
        res2["val_accuracy"],
    )
