"""bench.py says when its figures cannot be trusted."""

import sys

from bench import busy_cpu_seconds, own_cpu_seconds, reliability_warnings


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
