"""TensorBoard (issue 71): a run's events read back with TensorBoard's own reader, value for value
against the checkpoint's history; a resumed run's steps neither twice nor stale; any checkpoint's
history written by inspect; and a `tensorboard --logdir` server serving a run's scalars."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT

FLAGS = ("--batch-size", "8", "--lr", "1e-3", "--save-freq", "1", "--augment", "--fresh-crops")


def events(folder) -> EventAccumulator:
    """The run in `folder` as TensorBoard reads it (stale steps purged, every image and text kept)."""
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(run: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in run.Scalars(tag)]


@pytest.fixture(scope="module")
def board_run(mini_root, tmp_path_factory):
    """Two epochs with --tensorboard (its default folder), then resumed from epoch 1 to 3: the second
    epoch's events are stale by then."""
    out = tmp_path_factory.mktemp("board")
    train = [sys.executable, str(ROOT / "train.py"), "train", *FLAGS, "--num-epoch", "2", "--tensorboard",
             "--data-root", str(mini_root), "--checkpoint-dir", str(out)]
    assert subprocess.run(train, capture_output=True, cwd=ROOT).returncode == 0
    first = torch.load(out / "last.pth", weights_only=True)
    resume = [sys.executable, str(ROOT / "train.py"), "resume", str(out / "checkpoint.1.pth"), "--num-epoch", "3"]
    result = subprocess.run(resume, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out, first, torch.load(out / "last.pth", weights_only=True)


def test_the_events_give_the_checkpoints_history_value_for_value_after_a_resume(board_run):
    out, first, final = board_run
    assert final["args"]["tensorboard"] == str(out / "tensorboard") == first["args"]["tensorboard"]
    run = events(out / "tensorboard")
    psnr, ssim = scalars(run, "Set5/psnr"), scalars(run, "Set5/ssim")
    assert [value for _, value in psnr] == pytest.approx([h["psnr"] for h in final["history"]], rel=1e-6)
    assert [value for _, value in ssim] == pytest.approx([h["ssim"] for h in final["history"]], rel=1e-6)
    assert [value for _, value in scalars(run, "progress/epoch")] == [1, 2, 3]
    unpurged = EventAccumulator(str(out / "tensorboard"), purge_orphaned_data=False)
    unpurged.Reload()
    assert len(unpurged.Scalars("Set5/psnr")) == 4  # epoch 2 was written twice: the first run's is dropped
    steps = [step for step, _ in psnr]
    assert steps == sorted(set(steps)) and steps[-1] == final["optimizer"]["state"][0]["step"]
    for tag in ("train/loss", "train/lr", "train/patches_per_s"):
        logged = [step for step, _ in scalars(run, tag)]
        assert logged == sorted(set(logged)) and 0 < logged[0] and logged[-1] == steps[-1], tag
    minutes = [value for _, value in scalars(run, "progress/minutes")]
    assert minutes[-1] == pytest.approx(sum(h["seconds"] for h in final["history"]) / 60, rel=1e-5)


def test_the_run_shows_pictures_its_command_and_its_final_figures(board_run):
    out, _, final = board_run
    run = events(out / "tensorboard")
    (picture_tag,) = run.Tags()["images"]
    assert picture_tag == "Set5/scene3: bicubic | SRCNN | ground truth"
    pictures = run.Images(picture_tag)
    assert len(pictures) == 3 and pictures[0].width == 3 * pictures[0].height  # three panels side by side
    texts = run.Tags()["tensors"]
    assert {"run/command/text_summary", "run/arguments/text_summary", "run/step/text_summary"} <= set(texts)
    commands = [event.tensor_proto.string_val[0].decode() for event in run.Tensors("run/command/text_summary")]
    assert any("train.py resume" in text for text in commands) and any("train.py train" in text for text in commands)
    assert sorted(run.PluginTagToContent("hparams")) == ["_hparams_/experiment", "_hparams_/session_end_info",
                                                          "_hparams_/session_start_info"]  # the HParams tab's
    assert scalars(run, "hparams/best_psnr")[-1][1] == pytest.approx(final["best_psnr"], rel=1e-6)


def test_inspect_writes_any_checkpoints_history_as_a_run(cli, tmp_path):
    result = cli("train", "inspect", str(ROOT / "checkpoint.pth"), str(ROOT / "models" / "srcnn_x2.pth"),
                 "--tensorboard", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    for path in (ROOT / "checkpoint.pth", ROOT / "models" / "srcnn_x2.pth"):
        state = torch.load(path, weights_only=True)
        run = events(tmp_path / "tb" / f"{path.parent.name}_{path.stem}")
        psnr = scalars(run, "Set5/psnr")
        assert [value for _, value in psnr] == pytest.approx([h["psnr"] for h in state["history"]], rel=1e-6)
        assert [step for step, _ in psnr] == sorted({step for step, _ in psnr})
        loss = [value for _, value in scalars(run, "train/loss")]
        assert loss == pytest.approx([h["loss"] for h in state["history"]], rel=1e-6)
        commands = [e.tensor_proto.string_val[0].decode() for e in run.Tensors("run/command/text_summary")]
        assert [c.strip("`") for c in commands] == [c["command"] for c in state["commands"]]


@pytest.mark.slow
def test_a_tensorboard_server_serves_the_runs_scalars(board_run, tmp_path):
    """`tensorboard --logdir` (the real server, on 127.0.0.1) answers its HTTP API with the run's PSNR."""
    out, _, final = board_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = urllib.parse.urlencode({"run": "tensorboard", "tag": "Set5/psnr"})
        deadline, answer = time.time() + 60, None
        while time.time() < deadline and not answer:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}") as page:
                    answer = json.load(page)
            except OSError:
                time.sleep(0.5)
        assert answer, "the server did not serve the run within 60 s"
        assert [value for _, _, value in answer] == pytest.approx([h["psnr"] for h in final["history"]], rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)
