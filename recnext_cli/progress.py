"""A running job's progress: rank 0 appends events to the run folder, the launching `recnext` shows them.

The worker side (`ProgressWriter`) needs no torch and writes one JSON object per line to RUN_DIR/progress.jsonl; a
line is written whole with one write() call, so the reader only ever has to hold back a last line without its
newline. The launcher side (`ProgressView`) reads what is new at each poll of the launch loop and renders it: live
Rich bars on a terminal, or one plain line per logging interval (at most one every LINE_EVERY_S seconds) when
stdout is a file or a pipe (CI logs, Slurm output files).

Events: {"event": "phase", "phase": "train" | "val" | "test", "total": N, "epoch": e, "epochs": E}
        {"event": "step", "done": k, "loss": x, "lr": y, "images_s": z, "log": bool}
        {"event": "metrics", "epoch": e, "metrics": {"bbox_mAP": ..., ...}}
        {"event": "note", "text": "..."}  (a line to show as it is, e.g. the batch plan)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from recnext_cli.launch.supervise import RUN_DIR_ENV

PROGRESS_FILE = "progress.jsonl"
LINE_EVERY_S = 10.0
PHASE_LABELS = {"train": "training", "val": "evaluating", "test": "testing"}


class ProgressWriter:
    """Rank 0's end: events into the run folder named by RECNEXT_RUN_DIR; a no-op without one (or on other ranks)."""

    def __init__(self, rank: int = 0, run_dir: str | None = None) -> None:
        run_dir = run_dir if run_dir is not None else os.environ.get(RUN_DIR_ENV)
        self.path = Path(run_dir) / PROGRESS_FILE if run_dir and rank == 0 and os.path.isdir(run_dir) else None

    @property
    def active(self) -> bool:
        return self.path is not None

    def emit(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            self.path = None  # the launcher is gone or its folder with it: progress is not worth failing a run over


def read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete event lines of `path` after byte `offset`, and the offset to read from next time."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events, offset + end


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _State:
    """What is known of the job so far, from its events."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.total = 0
        self.done = 0
        self.epoch: int | None = None
        self.epochs: int | None = None
        self.loss: float | None = None
        self.lr: float | None = None
        self.images_s: float | None = None
        self.phase_started = time.time()
        self.first_step: tuple[float, int] | None = None  # (time, done) of the phase's first step, for the rate
        self.last_time = self.phase_started
        self.metrics: list[tuple[int | None, dict]] = []

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        stamp = float(event.get("time", time.time()))
        if kind == "phase":
            self.phase, self.total, self.done = event.get("phase"), int(event.get("total", 0)), 0
            self.epoch, self.epochs = event.get("epoch"), event.get("epochs")
            self.phase_started, self.first_step = stamp, None
        elif kind == "step":
            self.done = int(event.get("done", self.done))
            for key in ("loss", "lr", "images_s"):
                if event.get(key) is not None:
                    setattr(self, key, float(event[key]))
            if self.first_step is None:
                self.first_step = (stamp, self.done)
        elif kind == "metrics":
            self.metrics.append((event.get("epoch"), dict(event.get("metrics", {}))))
        self.last_time = stamp

    def eta_s(self) -> float | None:
        """Seconds left in this phase, from the steps since its first (which carries start-up costs)."""
        if self.first_step is None or self.done <= self.first_step[1]:
            return None
        rate = (self.last_time - self.first_step[0]) / (self.done - self.first_step[1])
        remaining = (self.total - self.done) * rate
        if self.phase == "train" and self.epoch and self.epochs:
            remaining += (self.epochs - self.epoch) * self.total * rate  # later epochs, evaluation not counted
        return remaining

    def title(self) -> str:
        label = PHASE_LABELS.get(self.phase or "", self.phase or "")
        return f"{label} epoch {self.epoch}/{self.epochs}" if self.epoch and self.epochs else label

    def figures(self, sep: str = "  ") -> str:
        parts = []
        if self.phase == "train":
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f}")
            if self.lr is not None:
                parts.append(f"lr {self.lr:.2e}")
        if self.images_s is not None:
            parts.append(f"{self.images_s:.1f} img/s")
        return sep.join(parts)


class ProgressView:
    """The launcher's end: call `poll()` often while the job runs and `close()` when it has ended."""

    def __init__(self, run_dir: Path, stream: IO[str] | None = None, live: bool | None = None) -> None:
        self.path = run_dir / PROGRESS_FILE
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.offset = 0
        self.state = _State()
        self._progress = None
        self._task = None
        self._last_line = 0.0
        self._line_phase: tuple | None = None

    def poll(self) -> None:
        events, self.offset = read_events(self.path, self.offset)
        for event in events:
            kind = event.get("event")
            if kind == "phase" and self.state.phase is not None:
                self._end_phase()
            self.state.apply(event)
            if kind == "note":
                self._print(str(event.get("text", "")))
            elif kind == "metrics":
                self._show_metrics(*self.state.metrics[-1])
            elif self.live:
                self._update_bar(kind == "phase")
            else:
                self._maybe_line(event)

    def close(self) -> None:
        self.poll()
        if self.state.phase is not None:
            self._end_phase()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ---- terminal: a Rich bar per phase ----

    def _bar(self):
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = Console(file=self.stream, highlight=False)
            # Narrow enough for an 80-column terminal: a short bar, and no column that repeats another.
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
                TextColumn("{task.fields[figures]}"), TextColumn("ETA {task.fields[eta]}"),
                console=console, transient=False, refresh_per_second=4,
            )
            self._progress.start()
        return self._progress

    def _update_bar(self, new_phase: bool) -> None:
        progress, state = self._bar(), self.state
        if new_phase or self._task is None:
            self._task = progress.add_task(state.title(), total=state.total or None, figures="", eta="-:--")
        progress.update(self._task, completed=state.done, figures=state.figures(" "), eta=format_eta(state.eta_s()))

    # ---- files and pipes: a line now and then ----

    def _maybe_line(self, event: dict) -> None:
        state = self.state
        if event.get("event") != "step":
            return
        due = event.get("log") and time.monotonic() - self._last_line >= LINE_EVERY_S
        if due or state.done == state.total:
            self._line(state)

    def _line(self, state: _State) -> None:
        self._last_line = time.monotonic()
        self._line_phase = (state.phase, state.epoch)
        figures = state.figures()
        eta = "" if state.done == state.total else f"  ETA {format_eta(state.eta_s())}"
        print(f"{state.title()}: {state.done}/{state.total}" + (f"  {figures}" if figures else "") + eta,
              file=self.stream, flush=True)

    def _end_phase(self) -> None:
        state = self.state
        if self.live and self._task is not None and self._progress is not None:
            self._progress.update(self._task, completed=state.done, eta=format_eta(0))
            self._task = None
        elif not self.live and state.done and self._line_phase != (state.phase, state.epoch):
            self._line(state)  # a phase too short for an interval line still says it ran

    def _show_metrics(self, epoch: int | None, metrics: dict) -> None:
        shown = "  ".join(f"{key} {value:.3f}" for key, value in metrics.items() if isinstance(value, (int, float)))
        where = f"epoch {epoch} " if epoch else ""
        self._print(f"{where}val: {shown}")

    def _print(self, line: str) -> None:
        """A line of its own, above the live bars when there are some."""
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)
