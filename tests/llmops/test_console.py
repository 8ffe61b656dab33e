"""The run's log file: everything written to descriptors 1 and 2 lands in it, with credentials masked."""

import subprocess
import sys

from tests.conftest import PROJECT

SECRET = "s3cret-pw"
URI = f"postgresql://llmops:{SECRET}@db.internal:5432/mlflow"

# As `llmops run` does it, in a process of its own (pytest replaces sys.stdout and the logging handlers).
WRITERS = f"""
import logging, os, subprocess, sys
from pathlib import Path
from llmops import console

logging.basicConfig()
work = Path(sys.argv[1])
with console.capture(work / "work", verbose=False) as terminal:
    print("print: {URI}", flush=True)
    logging.getLogger("some.library").error("logging: connecting to %s", "{URI}")
    os.write(2, b"below Python: {URI}\\n")
    subprocess.run([sys.executable, "-c", "print('a child process: {URI}?password={SECRET}')"], check=True)
    # Split across writes, as a buffered writer may hand it over: masked all the same.
    os.write(1, b"in pieces: https://user:{SECRET[:4]}")
    os.write(1, b"{SECRET[4:]}@host/path\\n")
    # Read while the run goes on, as the MLflow copy is: what was written so far is already there.
    print(console.move_log(work / "run").read_text(), file=terminal.err)
"""


def test_the_log_file_catches_every_writer_and_never_holds_a_password(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WRITERS, str(tmp_path)], capture_output=True, text=True, cwd=PROJECT, check=True
    )
    text = (tmp_path / "run" / "run.log").read_text()

    assert SECRET not in text and SECRET not in done.stdout + done.stderr
    for writer in ("print: ", "ERROR:some.library:logging: connecting to ", "below Python: ", "a child process: "):
        assert f"{writer}postgresql://llmops:***@db.internal:5432/mlflow" in text
    assert "mlflow?password=***" in text and "in pieces: https://user:***@host/path" in text
    assert "in pieces: https://user:***@host/path" in done.stderr  # the copy read before the end
