"""Progress events from rank 0 to the launcher: written whole, read incrementally, shown as bars or as plain lines."""

from __future__ import annotations

import io
import json
import time

import pytest

from recnext_cli import progress
from recnext_cli.jobs import first_exception
from recnext_cli.progress import PROGRESS_FILE, ProgressView, ProgressWriter, format_eta, read_events


def _epoch(writer: ProgressWriter, epoch: int, epochs: int, iters: int, interval: int) -> None:
    writer.emit("phase", phase="train", total=iters, epoch=epoch, epochs=epochs)
    for done in range(1, iters + 1):
        writer.emit("step", done=done, loss=1.0 / done, lr=1e-3, images_s=4.0, log=done % interval == 0)


def test_only_rank_0_with_a_run_folder_writes(tmp_path):
    assert ProgressWriter(0, str(tmp_path)).active
    assert not ProgressWriter(1, str(tmp_path)).active
    assert not ProgressWriter(0, str(tmp_path / "missing")).active
    ProgressWriter(1, str(tmp_path)).emit("step", done=1)
    assert not (tmp_path / PROGRESS_FILE).exists()


def test_the_reader_takes_complete_lines_only_and_resumes_where_it_stopped(tmp_path):
    writer = ProgressWriter(0, str(tmp_path))
    writer.emit("phase", phase="test", total=3)
    writer.emit("step", done=1)
    path = tmp_path / PROGRESS_FILE
    with path.open("ab") as file:
        file.write(b'{"event": "step", "do')  # a line still being written
    events, offset = read_events(path, 0)
    assert [event["event"] for event in events] == ["phase", "step"]
    with path.open("ab") as file:
        file.write(b'ne": 2}\n')
    more, offset = read_events(path, offset)
    assert more == [{"event": "step", "done": 2}] and offset == path.stat().st_size
    assert read_events(path, offset) == ([], offset)
    assert read_events(tmp_path / "absent.jsonl", 0) == ([], 0)


def test_plain_output_has_a_line_per_interval_and_one_per_finished_phase(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    writer, stream = ProgressWriter(0, str(tmp_path)), io.StringIO()
    view = ProgressView(tmp_path, stream=stream, live=False)
    writer.emit("note", text="batch: 2 worker(s) x 2 image(s)")
    _epoch(writer, 1, 2, iters=12, interval=5)
    view.poll()
    writer.emit("metrics", epoch=1, metrics={"bbox_mAP": 0.4123, "segm_mAP": 0.5})
    _epoch(writer, 2, 2, iters=12, interval=5)
    view.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "batch: 2 worker(s) x 2 image(s)"
    train_lines = [line for line in lines if line.startswith("training epoch")]
    # Steps 5 and 10 are logging steps; step 12 ends the epoch.
    assert [line.split(":")[1].split()[0] for line in train_lines] == ["5/12", "10/12", "12/12"] * 2
    assert train_lines[0].startswith("training epoch 1/2: 5/12  loss 0.2000  lr 1.00e-03  4.0 img/s  ETA ")
    assert "ETA" not in train_lines[2]  # a finished epoch has nothing left to estimate
    assert "epoch 1 val: bbox_mAP 0.412  segm_mAP 0.500" in lines


def test_plain_output_waits_between_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)
    writer, stream = ProgressWriter(0, str(tmp_path)), io.StringIO()
    view = ProgressView(tmp_path, stream=stream, live=False)
    _epoch(writer, 1, 1, iters=40, interval=5)
    view.close()
    # The first logging step prints; the next seven fall inside the interval; the epoch's end always prints.
    assert [line.split(":")[1].split()[0] for line in stream.getvalue().splitlines()] == ["5/40", "40/40"]


def test_a_short_phase_without_logging_steps_still_gets_its_line(tmp_path):
    writer, stream = ProgressWriter(0, str(tmp_path)), io.StringIO()
    view = ProgressView(tmp_path, stream=stream, live=False)
    writer.emit("phase", phase="test", total=16)
    writer.emit("step", done=3, images_s=2.0, log=False)
    view.close()  # the job ended (failed, say) before the phase did
    assert stream.getvalue().splitlines() == ["testing: 3/16  2.0 img/s  ETA -:--"]


def test_live_bars_end_complete_on_a_terminal(tmp_path):
    writer, stream = ProgressWriter(0, str(tmp_path)), io.StringIO()
    view = ProgressView(tmp_path, stream=stream, live=True)
    writer.emit("note", text="batch plan")
    _epoch(writer, 1, 1, iters=6, interval=2)
    view.poll()
    writer.emit("phase", phase="val", total=4)
    for done in range(1, 5):
        writer.emit("step", done=done, images_s=8.0, log=False)
    view.close()
    text = stream.getvalue()
    assert "batch plan" in text
    assert "training epoch 1/1" in text and "6/6" in text and "loss 0.1667" in text
    assert "evaluating" in text and "4/4" in text


def test_eta_counts_the_remaining_epochs_from_the_steps_after_the_first(tmp_path):
    state = progress._State()
    start = time.time()
    state.apply({"event": "phase", "phase": "train", "total": 10, "epoch": 1, "epochs": 3, "time": start})
    state.apply({"event": "step", "done": 1, "time": start + 30})  # the first step carries start-up costs
    state.apply({"event": "step", "done": 5, "time": start + 34})  # then 1 s per step
    assert state.eta_s() == pytest.approx(5 + 2 * 10)
    assert format_eta(25) == "0:25" and format_eta(3725) == "1:02:05" and format_eta(None) == "-:--"


def test_the_first_traceback_names_the_cause():
    output = [
        "W1126 warning line",
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "train.py", line 3, in <module>',
        "[rank1]:     run()",
        "[rank1]: RuntimeError: injected failure on rank 1",
        "Traceback (most recent call last):",
        '  File "torchrun", line 1',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: train.py FAILED",
    ]
    assert first_exception(output) == "RuntimeError: injected failure on rank 1"
    assert first_exception(["no traceback here"]) is None


def test_events_are_json_lines_with_a_time(tmp_path):
    ProgressWriter(0, str(tmp_path)).emit("note", text="hello")
    (record,) = [json.loads(line) for line in (tmp_path / PROGRESS_FILE).read_text().splitlines()]
    assert record["event"] == "note" and record["text"] == "hello" and record["time"] > 0
