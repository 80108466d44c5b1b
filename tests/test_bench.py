"""bench.py says when its figures cannot be trusted; its --data collection, training windows and --against."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import (
    against_benchmark,
    busy_cpu_seconds,
    make_collection,
    own_cpu_seconds,
    reliability_warnings,
    training_window,
)


def test_repeats_that_disagree_or_a_busy_machine_are_reported():
    assert reliability_warnings([900, 950, 920], [400, 410, 405], 0.02, {"training": 0.5}) == []
    spread, busy = reliability_warnings([700, 950], [400, 405], None, {}), reliability_warnings([900], [400], 0.5, {})
    assert len(spread) == 1 and "train.py loop's repeats differ by 30%" in spread[0]
    assert busy == ["other processes used 50% of the CPU during the run"]
    beyond = reliability_warnings([900], [400], None, {"training": 0.6, "the network (onnxruntime)": 1.17})
    assert beyond == ["the network (onnxruntime) ran at 117% of the measured matmul rate"]


def test_cpu_use_of_the_machine_includes_this_process():
    before, own = busy_cpu_seconds(), own_cpu_seconds()
    if before is None:  # no /proc/stat: the busy-machine check is off, said as None
        assert not sys.platform.startswith("linux")
        return
    sum(i * i for i in range(3_000_000))  # ~0.2 s of CPU
    after = busy_cpu_seconds()
    assert after[1] >= 1 and after[0] - before[0] >= 0.8 * (own_cpu_seconds() - own)


def test_the_collection_is_as_many_photo_like_images_as_asked_the_same_from_the_same_seed(tmp_path, mini_root):
    sources = sorted((mini_root / "T91").iterdir())
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_collection(tmp_path / name, sources, 3, (300, 200), seed=1)
    made = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in made] == ["0000.png", "0001.png", "0002.png"]
    pictures = [np.asarray(Image.open(p)) for p in made]
    assert all(p.shape == (200, 300, 3) and p.std() > 10 for p in pictures)  # filled with detail, not blank
    assert not np.array_equal(pictures[0], pictures[1])
    again = [np.asarray(Image.open(tmp_path / "b" / p.name)) for p in made]
    assert all(np.array_equal(a, b) for a, b in zip(pictures, again, strict=True))


@pytest.mark.slow
def test_a_training_window_reports_memory_rate_and_first_step(mini_root, tmp_path):
    result = training_window(mini_root / "T91", mini_root, tmp_path / "run", None)  # one whole epoch
    assert result["peak_memory_mb"] > 100  # torch alone takes more: the process tree was sampled
    assert result["patches_per_s"] > 0 and 0 < result["seconds_to_first_step"] < 120
    history = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["history"]
    assert result["seconds_per_epoch"] == round(history[0]["seconds"], 3)


@pytest.mark.slow
def test_a_window_stopped_early_takes_its_rate_from_the_first_step_on(mini_root, tmp_path):
    folder = tmp_path / "large"
    folder.mkdir()
    make_collection(folder, sorted((mini_root / "T91").iterdir()), 6, (640, 480))  # some 12k patches
    result = training_window(folder, mini_root, tmp_path / "run", 3)
    position = torch.load(tmp_path / "run" / "interrupted.pth", weights_only=True)["position"]
    assert 0 < position["batch"] < position["batches"]  # stopped within the epoch, where it stood saved
    estimate = result["seconds_to_first_step"] + position["batches"] * 16 / result["patches_per_s"]  # batch 16
    assert abs(result["seconds_per_epoch"] - estimate) < 0.06 + 0.001 * estimate  # as rounded
    assert result["seconds_per_epoch"] > result["seconds_to_first_step"] + 3


@pytest.mark.slow
def test_against_another_tree_runs_both_trees_alternately_and_compares_their_epochs(mini_root, tmp_path):
    other = tmp_path / "other"  # a tree whose train.py says it ran: the other side really is run there
    other.mkdir()
    for entry in Path(__file__).parents[1].iterdir():
        if entry.name != "train.py" and not entry.name.startswith((".", "__")):
            (other / entry.name).symlink_to(entry)
    source = (Path(__file__).parents[1] / "train.py").read_text()
    (other / "train.py").write_text(source.replace('if __name__ == "__main__":',
                                                   'if __name__ == "__main__":\n    Path("ran").touch()'))
    result = against_benchmark(mini_root, other, rounds=1)
    assert (other / "ran").exists()
    assert [len(result["runs"][side]) for side in ("this", "other")] == [1, 1]
    this, theirs = (result["runs"][side][0]["seconds_per_epoch"] for side in ("this", "other"))
    assert this > 0 and theirs > 0 and result["speedup"] == round(theirs / this, 3)
