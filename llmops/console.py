"""What a command shows a person, and where everything else goes.

`llmops run` shows one line per finished stage, a progress bar while finetune trains, then the gate table
and the registry line; the other commands show their verdict, counts, reasons and paths. Everything else
(library banners and warnings, progress bars, Prefect's and
Great Expectations' log lines, child processes' output) goes to the run's log file: while the run lasts,
file descriptors 1 and 2 themselves point into it, so output written below Python (C extensions,
subprocesses) is caught too. They point at a pipe whose reader appends to the file with credentials masked
(`postgresql://user:***@host`): a password a library prints, as MLflow prints its tracking URI, never
reaches the disk. The file starts under `<work_dir>/logs/` (`<command>-<time>-<pid>.log`); a run's moves to
`<run folder>/run.log` as soon as the run has one, and the MLflow run keeps a copy; a command that wrote
nothing there leaves no file. Warnings and errors of this project's own code still reach the terminal; `-v`
shows everything there instead.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import re
import select
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, TextIO

from llmops.files import mask_secrets

PROGRESS = "llmops.progress"  # the logger of the per-stage lines
_OURS = ("llmops", "tasks", "flows")
_TRAINING_STEP = re.compile(r"step (\d+)/(\d+)\s+loss ([\d.naninf]+)(?:\s+tokens (\d+))?")

_log_file: Path | None = None
_sink: _MaskedLog | None = None


def log_file() -> Path | None:
    """The file the current run's full output goes to, while `capture` is in effect (or after it ended)."""
    return _log_file


def move_log(run_dir: Path) -> Path | None:
    """Give the log file its final place in the run folder; writing goes on into the same open file."""
    global _log_file
    if _log_file is None or not _log_file.exists():
        return None
    target = run_dir / "run.log"
    if _log_file != target:
        run_dir.mkdir(parents=True, exist_ok=True)
        _log_file.rename(target)  # same inode: the masking thread keeps writing into it
        _log_file = target
    sys.stdout.flush()
    sys.stderr.flush()
    if _sink is not None:
        _sink.catch_up()  # what was written so far is in the file when the caller reads it
    return _log_file


class _MaskedLog:
    """The pipe that descriptors 1 and 2 write into, and the thread that appends what arrives to the log
    file with credentials masked. A credential never spans whitespace, so each piece is masked and written
    up to its last whitespace; the rest waits for the next piece (or the end)."""

    def __init__(self, path: Path) -> None:
        self._read, self.write_fd = os.pipe()
        self._file = path.open("ab", buffering=0)
        self._pending = b""
        self._open = True
        self._lock = threading.Lock()  # held while a piece is read and written: see catch_up
        # A daemon: children that inherited the pipe (Prefect's temporary server) may write until exit.
        threading.Thread(target=self._copy, name="llmops-log", daemon=True).start()

    def _copy(self) -> None:
        ready = select.poll()
        ready.register(self._read, select.POLLIN)
        while self._open:
            ready.poll()
            with self._lock:
                try:
                    piece = os.read(self._read, 1 << 16)
                except OSError:  # the pipe itself is gone: nothing more can arrive
                    self._open = False
                    return
                try:
                    self._take(piece)
                except Exception as exc:  # keep draining whatever happens, or writers would block on a full pipe
                    self._pending = b""
                    with contextlib.suppress(OSError):
                        self._file.write(f"\n[llmops: log output lost here: {type(exc).__name__}: {exc}]\n".encode())

    def _take(self, piece: bytes) -> None:
        cut = max(piece.rfind(space) for space in (b"\n", b"\r", b" ", b"\t")) + 1
        if not piece:  # every writer is gone
            self._write(self._pending)
            self._open = False
            os.close(self._read)
            self._file.close()
        elif cut:
            self._write(self._pending + piece[:cut])
            self._pending = piece[cut:]
        else:
            self._pending += piece

    def _write(self, data: bytes) -> None:
        text = mask_secrets(data.decode("utf-8", "surrogateescape"))
        with contextlib.suppress(OSError):  # a full disk must not stop the copying: writers would block
            self._file.write(text.encode("utf-8", "surrogateescape"))

    def catch_up(self, timeout: float = 5.0) -> None:
        """Return once everything written into the pipe so far is in the file (a trailing partial word aside)."""
        unread = array.array("i", [0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._open:
                    return
                fcntl.ioctl(self._read, termios.FIONREAD, unread)
                if unread[0] == 0:
                    return
            time.sleep(0.005)


class _Terminal(logging.Handler):
    """Stage lines, the training progress bar, and warnings from this project's own code."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.tty = stream.isatty()
        self.bar_open = False
        self.last_quarter = -1
        self.started: tuple[float, int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.name == PROGRESS:
                self._line(message)
            elif record.name == "tasks.finetune" and (step := _TRAINING_STEP.search(message)):
                self._bar(*step.groups())
            elif record.levelno >= logging.WARNING and record.name.startswith(_OURS):
                self._line(f"{record.levelname.lower()}: {message}")
        except Exception:  # noqa: BLE001 - a display problem must never fail the run
            self.handleError(record)

    def _line(self, text: str) -> None:
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_quarter, self.started = -1, None

    def _bar(self, step: str, steps: str, loss: str, tokens: str | None) -> None:
        done, total = int(step), int(steps)
        now, seen = time.monotonic(), int(tokens or 0)
        if self.started is None:
            self.started = (now, seen)
        elapsed = now - self.started[0]
        rate = f"{(seen - self.started[1]) / elapsed:,.0f} tok/s" if tokens and elapsed > 0 else ""
        width = 24
        filled = width * done // max(total, 1)
        text = f"  training  [{'#' * filled}{'.' * (width - filled)}] step {done}/{total}  loss {loss}  {rate}"
        if self.tty:
            self.stream.write("\r" + text.rstrip())
            self.bar_open = done < total
            if not self.bar_open:
                self.stream.write("\n")
        else:  # a pipe or a file: a line per quarter, not one per redraw
            quarter = 4 * done // max(total, 1)
            if quarter == self.last_quarter:
                return
            self.stream.write(text.rstrip() + "\n")
            self.last_quarter = quarter
        self.stream.flush()


class Terminal(NamedTuple):
    """Where a command's own output goes while `capture` sends everything else to the log file."""

    out: TextIO  # what the command prints: verdicts, tables, the JSON line
    err: TextIO  # progress lines, warnings, errors


def _kept(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """`stream`, or, when it writes to descriptor `fd` (about to point into the log), a new stream on a copy
    of that descriptor; True when the caller must close it. (Under pytest's capture, `sys.stdout` is not a
    descriptor at all, and stays what it is.)"""
    try:
        if stream.fileno() == fd:
            return open(os.dup(fd), "w", buffering=1, closefd=True), True  # noqa: SIM115 - closed by capture
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False


@contextmanager
def capture(work_dir: Path, verbose: bool, name: str = "run") -> Iterator[Terminal]:
    """For the block: everything to the command's log file, the readable part to the terminal (yielded, for
    the command's own output). With `verbose`, nothing is redirected. A log that stayed empty is removed
    (`log_file()` is then None)."""
    global _log_file, _sink
    if verbose:
        yield Terminal(sys.stdout, sys.stderr)
        return
    folder = work_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    _log_file = folder / f"{name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    out, close_out = _kept(sys.stdout, 1)
    err, close_err = _kept(sys.stderr, 2)
    saved = os.dup(1), os.dup(2)
    handler = _Terminal(err)
    root = logging.getLogger()
    _sink = _MaskedLog(_log_file)
    os.dup2(_sink.write_fd, 1)
    os.dup2(_sink.write_fd, 2)
    os.close(_sink.write_fd)
    root.addHandler(handler)
    logging.getLogger(PROGRESS).setLevel(logging.INFO)
    try:
        yield Terminal(out, err)
    finally:
        root.removeHandler(handler)
        for other in root.handlers:  # what libraries log while the process winds down stays out of sight
            if isinstance(other, logging.StreamHandler) and other.stream in (sys.stdout, sys.stderr):
                other.setLevel(max(other.level, logging.WARNING))
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _sink.catch_up()
        _sink = None
        for stream, owned in ((out, close_out), (err, close_err)):
            stream.flush()
            if owned:
                stream.close()
        if _log_file.exists() and _log_file.stat().st_size == 0:
            _log_file.unlink()
            _log_file = None
