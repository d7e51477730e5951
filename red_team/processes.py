"""The commands under test, run each in its own session (process group) with its output in files."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SDFT = str(ROOT / "scripts" / "sdft.py")
EXTRACT = str(ROOT / "scripts" / "extract_logits.py")
DISTILL = str(ROOT / "scripts" / "distill_sft.py")
CONTINUAL = str(ROOT / "scripts" / "continual.py")
SCRIPTS = {"sdft": SDFT, "extract_logits": EXTRACT, "distill_sft": DISTILL, "continual": CONTINUAL}
TRACEBACK = "Traceback (most recent call last):"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    all: list = field(default_factory=list)  # every run of a case with concurrent runs (this one included)


LIVE: set = set()  # processes started and not yet reaped: killed (by process group) on any exit


def _kill_group(popen) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_live() -> None:
    """Kill every process group started and not yet reaped (the harness registers this to run at exit)."""
    for popen in list(LIVE):
        _kill_group(popen)
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        LIVE.discard(popen)


def without_dac_override(argv: list[str]) -> list[str] | None:
    """`argv` run so that file permissions hold for it: as root, without the capabilities that bypass them (root
    writes into read-only directories otherwise); None where that cannot be arranged."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *argv]


class Proc:
    """One command in its own session (process group); stdout and stderr go to files, so nothing blocks on a pipe."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, log_prefix: Path):
        self.out_path, self.err_path = Path(f"{log_prefix}.out"), Path(f"{log_prefix}.err")
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        LIVE.add(self.popen)

    def wait(self, deadline: float) -> Result:
        timed_out = False
        try:
            code = self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(self.popen)
            code = self.popen.wait()
        finally:
            _kill_group(self.popen)  # whatever it started and left behind
            LIVE.discard(self.popen)
        seconds = time.monotonic() - self.started
        out, err = (path.read_bytes().decode("utf-8", errors="replace") for path in (self.out_path, self.err_path))
        return Result(code, out, err, seconds, timed_out)


def child_env(session: Path) -> dict:
    env = dict(os.environ)
    env.pop("TRL_SDFT_TRACEBACK", None)  # it turns the CLIs' error lines back into tracebacks
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        CI="1",  # TRL sends no telemetry under CI
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        HF_HOME=str(session / "hf"),  # datasets' cache of loaded files: in the session, not the user's
        PYTHONUNBUFFERED="1",
    )
    return env


def exception_line(stderr: str) -> str:
    """The exception of the last traceback in `stderr` (`Type: message`)."""
    tail = stderr[stderr.rfind(TRACEBACK) :].splitlines()[1:]
    lines = [line for line in tail if line.strip() and not line.startswith((" ", "\t"))]
    return lines[0].strip() if lines else "(traceback)"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
