import random

import numpy as np
import pytest
import torch

from amdim import checkpoint as ckpt_io
from amdim.errors import CheckpointError


def test_round_trip_with_weights_only_and_rng_restore(tmp_path):
    state = ckpt_io.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    path = ckpt_io.save(
        tmp_path / "c.pt",
        {"config": {"k": 1}, "model": {"w": torch.ones(2)}, "n_classes": 3, "epoch": 2, "rng": state},
    )
    loaded = ckpt_io.load(path)  # uses torch.load(weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.ones(2))
    ckpt_io.set_rng_state(loaded["rng"])
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_corrupt_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt_io.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        ckpt_io.load(bad)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an amdim-checkpoint"):
        ckpt_io.load(foreign)
    truncated = tmp_path / "trunc.pt"
    ckpt_io.save(truncated, {"config": {}, "model": {"w": torch.ones(1000)}, "n_classes": 2, "epoch": 0})
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt_io.load(truncated)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.FORMAT, "config": Evil(), "model": {}, "n_classes": 1, "epoch": 0}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt_io.load(path)


def test_the_cuda_rng_state_to_restore_follows_this_processs_device():
    """A checkpoint holds its own process's CUDA RNG state; one written by an older version holds
    every GPU it saw. Either resumes where another number of GPUs is visible."""
    a, b, c = (torch.full((4,), v, dtype=torch.uint8) for v in (1, 2, 3))
    assert ckpt_io.cuda_state_for([a], 0) is a  # this format: one entry, whatever the device
    assert ckpt_io.cuda_state_for([a], 3) is a
    assert ckpt_io.cuda_state_for([a, b, c], 1) is b  # older format: the same device's entry
    assert ckpt_io.cuda_state_for([a, b], 5) is a  # ... or the first, with fewer saved than visible
    assert ckpt_io.cuda_state_for([], 0) is None  # written on a CPU
    state = ckpt_io.rng_state()
    assert state["cuda"] == [] if not torch.cuda.is_available() else len(state["cuda"]) == 1


@pytest.mark.cuda
def test_a_checkpoint_from_a_node_with_more_gpus_resumes_on_one(tmp_path):
    one = torch.cuda.get_rng_state()
    state = {**ckpt_io.rng_state(), "cuda": [one] * 8}  # as if written where 8 GPUs were visible
    path = ckpt_io.save(
        tmp_path / "c.pt", {"config": {}, "model": {}, "n_classes": 1, "epoch": 1, "rng": state}
    )
    ckpt_io.set_rng_state(ckpt_io.load(path)["rng"])  # one visible GPU here: no error
    assert torch.equal(torch.cuda.get_rng_state(), one)
