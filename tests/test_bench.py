"""bench.py (bench_*.py) says when its figures cannot be trusted; its --data collection, training windows and
--against."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench_figures import busy_cpu_seconds, measured, own_cpu_seconds, reliability_warnings
from bench_runs import (
    TrainingRun,
    against_benchmark,
    data_benchmark,
    make_collection,
    training_epoch,
    tree_memory_bytes,
)
from bench_step import slower_in_bf16
from utils import UserError


def test_repeats_that_disagree_or_a_busy_machine_are_reported():
    assert reliability_warnings([900, 950, 920], [400, 410, 405], 0.02, {"training": 0.5}) == []
    spread, busy = reliability_warnings([700, 950], [400, 405], None, {}), reliability_warnings([900], [400], 0.5, {})
    assert len(spread) == 1 and "train.py loop's repeats differ by 30%" in spread[0]
    assert busy == ["other processes used 50% of the CPU during the run"]
    beyond = reliability_warnings([900], [400], None, {"training": 0.6, "the network (onnxruntime)": 1.17})
    assert beyond == ["the network (onnxruntime) ran at 117% of the measured matmul rate"]


def test_each_measure_says_what_it_measures_before_and_its_figure_as_soon_as_it_ends(capsys):
    """Issue 69: `bench.py --quick` printed nothing for 145 s, then everything at once."""
    def measure():
        assert capsys.readouterr().err == "matmul ... "  # said before the work, not after
        return 123.4

    assert measured("matmul", measure, "{:.0f} GFLOP/s".format) == 123.4
    err = capsys.readouterr().err
    assert err.startswith("123 GFLOP/s (") and err.endswith(" s)\n")


def test_a_bf16_step_slower_than_float32_is_named():
    """Issue 69: on an Intel Xeon with AVX512_BF16 but no AMX, bf16 ran the step at 0.45x float32 unflagged."""
    steps = {"16x48x48 float32": 60.4, "16x48x48 bf16": 135.5, "128x33x33 float32": 80.0, "128x33x33 bf16": 41.0}
    assert slower_in_bf16(steps) == ["16x48x48 135.5 ms in bf16 against 60.4 in float32"]
    assert slower_in_bf16({"16x48x48 float32": 60.4}) == []


def test_cpu_use_of_the_machine_includes_this_process():
    before, own = busy_cpu_seconds(), own_cpu_seconds()
    if before is None:  # no /proc/stat: the busy-machine check is off, said as None
        assert not sys.platform.startswith("linux")
        return
    sum(i * i for i in range(3_000_000))  # ~0.2 s of CPU
    after = busy_cpu_seconds()
    assert after[1] >= 1 and after[0] - before[0] >= 0.8 * (own_cpu_seconds() - own)


HOLDER = """
import mmap, os, sys
size = 64 << 20
held, mapped = os.memfd_create("held"), os.memfd_create("mapped")
for fd in (held, mapped):
    os.write(fd, b"x" * size)
view = mmap.mmap(mapped, size)
sum(view[i] for i in range(0, size, mmap.PAGESIZE))  # resident in this process too
print("ready", flush=True)
sys.stdin.read()
"""


def test_tree_memory_counts_shared_memory_held_in_a_descriptor_once_mapped_or_not():
    """A worker's part waiting in a file descriptor, mapped by no process, is memory the run takes."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        measured = tree_memory_bytes(child.pid)
    finally:
        child.communicate("")
    assert (128 << 20) <= measured < (128 + 48 << 20)  # both 64 MiB, the mapped one not twice, and an idle Python


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
def test_a_training_epoch_reports_memory_rate_and_first_step(mini_root, tmp_path):
    result = training_epoch(mini_root / "T91", mini_root, tmp_path / "run")
    assert result["peak_memory_mb"] > 100  # torch alone takes more: the process tree was sampled
    assert result["patches_per_s"] > 0 and 0 < result["seconds_to_first_step"] < 120
    history = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["history"]
    assert result["seconds_per_epoch"] == round(history[0]["seconds"], 3)


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # after "pid (name)"


@pytest.mark.slow
def test_a_paused_run_takes_no_steps_and_its_windows_count_only_the_time_it_ran(mini_root, tmp_path):
    folder = tmp_path / "large"
    folder.mkdir()
    make_collection(folder, sorted((mini_root / "T91").iterdir()), 6, (640, 480))  # some 12k patches
    with TrainingRun(folder, mini_root, tmp_path / "run") as run:
        run.run_until(lambda: run.first_shown is not None)
        run.pause()
        paused_at = run.last_shown
        time.sleep(2)
        assert process_state(run.proc.pid) == "T" and run.last_shown == paused_at  # stopped: no step shown
        ran, steps = run.run_for(3)
        assert 3 <= ran < 4 and steps > 0 and run.last_shown[1] == paused_at[1] + steps
        saved = run.finish(stop=True)
    position = saved["position"]
    assert paused_at[1] + steps <= position["batch"] < position["batches"]  # stopped within the epoch, saved


@pytest.mark.slow
def test_a_training_run_that_fails_ends_in_its_last_line_and_leaves_no_process(mini_root, tmp_path):
    with pytest.raises(UserError, match=r"training on run ended early \(exit status 2\): error: .*Nowhere"):
        with TrainingRun(tmp_path / "Nowhere", mini_root, tmp_path / "run") as run:
            run.run_until(lambda: run.first_shown is not None)
    assert run.proc.poll() == 2


@pytest.mark.slow
def test_the_data_benchmark_takes_turns_and_rates_the_collection_by_its_running_time(mini_root, tmp_path):
    folder = tmp_path / "collection"
    folder.mkdir()
    make_collection(folder, sorted((mini_root / "T91").iterdir()), 3, (640, 480))
    made = [path.stat().st_mtime_ns for path in sorted(folder.iterdir())]
    result = data_benchmark(mini_root, 3, (640, 480), 4, 2, folder)
    assert [path.stat().st_mtime_ns for path in sorted(folder.iterdir())] == made  # taken as it was
    t91, large = result["t91_runs"], result["collection_run"]
    assert len(t91) == 3 and len(large["windows_patches_per_s"]) == 2 and all(large["windows_patches_per_s"])
    assert result["t91"]["patches_per_s"] == round(sum(run["patches_per_s"] for run in t91) / 3, 3)
    assert result["rate_vs_t91"] == round(large["patches_per_s"] / result["t91"]["patches_per_s"], 3)
    assert min(large["windows_patches_per_s"]) <= large["patches_per_s"] <= max(large["windows_patches_per_s"])


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
