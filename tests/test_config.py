import pytest

from amdim import config as C
from amdim.errors import ConfigError


def test_flat_round_trip_for_every_preset():
    for name, cfg in C.PRESETS.items():
        flat = C.to_flat(cfg)
        assert all(isinstance(v, (bool, int, float, str, type(None))) for v in flat.values()), name
        assert C.from_flat(flat) == cfg, name


def test_preset_sizes_match_the_spec():
    assert (C.preset("cifar").model.ndf, C.preset("cifar").model.n_rkhs, C.preset("cifar").model.n_depth) == (
        128,
        1024,
        3,
    )
    large = C.preset("cifar-large").model
    assert (large.ndf, large.n_rkhs, large.n_depth) == (256, 2048, 10)
    small = C.preset("imagenet-small").model
    assert (small.image_size, small.ndf, small.n_rkhs, small.n_depth) == (128, 192, 1536, 8)
    big = C.preset("imagenet-large").model
    assert (big.image_size, big.ndf, big.n_rkhs, big.n_depth) == (128, 320, 2560, 10)
    assert C.preset("stl10").model.image_size == 64
    assert C.preset("cifar").loss.tclip == 20.0 and C.preset("cifar").loss.reg_weight == 0.05


def test_overrides_parse_strings_and_bare_names():
    cfg = C.with_overrides(
        C.preset("tiny"), {"tclip": "off", "loss.pairs": "1t7,5t5", "ndf": "16", "use_bn": "true"}
    )
    assert cfg.loss.tclip is None
    assert cfg.loss.pairs == ("1t7", "5t5")
    assert cfg.model.ndf == 16 and cfg.model.use_bn is True
    assert C.to_flat(cfg)["loss.pairs"] == "1t7,5t5"
    assert C.to_flat(cfg)["loss.tclip"] is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model.ndf": "abc"}, "model.ndf"),
        ({"nope": 1}, "nope"),
        ({"loss.pairs": "1t9"}, "loss.pairs"),
        ({"loss.pairs": ""}, "loss.pairs"),
        ({"loss.reg_weight": -1}, "loss.reg_weight"),
        ({"loss.tclip": 0}, "loss.tclip"),
        ({"aug.gray_p": 1.5}, "aug.gray_p"),
        ({"aug.crop_scale_min": 0.9, "aug.crop_scale_max": 0.5}, "aug.crop_scale_min"),
        ({"model.n_rkhs": 64}, "model.n_rkhs"),
        ({"model.image_size": 48}, "model.image_size"),
        ({"data.batch_size": 1}, "data.batch_size"),
        ({"loss.mix_tau": 2.0}, "loss.mix_alpha"),
        ({"train.device": "tpu"}, "train.device"),
        ({"optim.lr": "nan"}, "optim.lr"),
        ({"model.ndf": 2.5}, "model.ndf"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        C.with_overrides(C.preset("tiny"), overrides)
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_alpha_and_tau_are_exclusive_but_either_works():
    cfg = C.with_overrides(C.preset("tiny"), {"loss.mix_alpha": "none", "loss.mix_tau": 4})
    assert cfg.loss.mix_tau == 4.0 and cfg.loss.mix_alpha is None


def test_jitter_strength_scales_all_components():
    aug = C.with_overrides(C.preset("tiny"), {"aug.jitter_strength": 0.5}).aug
    assert aug.jitter() == pytest.approx((0.2, 0.2, 0.2, 0.1))
    assert C.AugConfig(jitter_strength=4.0).jitter()[3] == 0.5  # hue is capped


def test_parse_set_args():
    assert C.parse_set_args(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError):
        C.parse_set_args(["novalue"])


@pytest.mark.parametrize(
    "spec, name",
    [
        ("synthetic", "synthetic"),
        ("synthetic:n_train=1024,n_test=256", "synthetic:n_train=1024,n_test=256"),
        ("cifar10:/data/cifar", "cifar10"),
        ("cifar100:/elsewhere/c100/", "cifar100"),
        ("stl10:~/stl", "stl10"),
        ("npz:../shared/data/cifar10-subset.npz", "cifar10-subset"),
        ("npz:/data/other.npz", "other"),
        ("imagefolder:/data/imagenet/,decode=146", "imagenet"),
        ("imagefolder:/data/places205", "places205"),
    ],
)
def test_dataset_name_tells_datasets_of_one_kind_apart(spec, name):
    # Two npz files (or image folders) are two datasets: a results table must not average them.
    assert C.dataset_name(spec) == name
