"""`SDFTTrainer`: on-policy self-distillation. Orchestration only; every piece of work is a call into a module.

One step, as `_prepare_inputs` and `compute_loss` read top to bottom:
  rows `{prompt, privileged_context}` -> teacher prompts and token ids (`batch.py`) -> completions from the rollout
  backend (`rollouts/`, chosen through its registry) -> padded batch (`batch.py`), carrying the rollout log-probs the
  importance weights need (`importance.plan`) -> student forward (`forwards.py`) -> the teacher's scores
  (`teachers.py`, chosen through its registry) -> the loss of the run's path (`chunked_loss.loss_function`: logits,
  chunked hidden states or Liger; the mode switch is `losses.per_token_loss`, the weights `importance.token_weights`).
After each optimizer step a moving teacher (EMA) moves (`teachers.TeacherUpdateCallback`). The settings each module
reads are built once from the config in `settings.py`.
"""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import TrainOutput
from trl.models import unwrap_model_for_generation
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler, disable_dropout_in_model, get_config_model_id, identity, split_tensor_dict

from . import batch as batching
from . import forwards, guards, importance, losses, models, settings, sharding
from .callbacks import dispatch
from .chat_templates import load_chat_template
from .checkpoints import checkpoint_step, prepare_resume
from .chunked_loss import HiddenStates, loss_function, resolve_chunk_size
from .config import SDFTConfig
from .data import REQUIRED_COLUMNS, EpochRepeatSampler, check_datasets, named_eval_sets
from .generation import answer_config, answer_one
from .metrics import MetricLog
from .models import check_finite_weights, load_model, prepare_peft, prepare_processing_class, warn_if_adapter_present
from .prompts import resolve_teacher_prompt_template
from .rollouts import RolloutContext, build_rollout, eos_token_ids, sampling_config
from .rollouts.agentic import check_tools, prepare_tools, prompts_with_tools, tool_loop
from .rollouts.async_rounds import AsyncRounds
from .saving import TeacherSaving
from .teachers import TeacherContext, TeacherUpdateCallback, build_teacher
from .utils import has_accelerator, reuse_freed_cpu_memory

if TYPE_CHECKING:
    from peft import PeftConfig

logger = get_logger(__name__)

Processor = PreTrainedTokenizerBase | ProcessorMixin
Optimizers = tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]
PAPER_TITLE = "Self-Distillation Enables Continual Learning"
CITATION = """@article{shenfeld2026selfdistillation,
  title   = {Self-Distillation Enables Continual Learning},
  author  = {Idan Shenfeld and Mehul Damani and Jonas H\\"ubotter and Pulkit Agrawal},
  year    = 2026,
  eprint  = {arXiv:2601.19897}
}"""


def _warn(message: str) -> None:
    logger.warning(message, main_process_only=True)


class SDFTTrainer(TeacherSaving, _BaseTrainer):
    """Self-Distillation Fine-Tuning: the student learns, on its own samples, what it does with the context in view.

    A drop-in for `trl.experimental.sdft.SDFTTrainer` (same constructor, plus GRPO's `tools` and
    `environment_factory`). Data, lengths, chat template, tools and packages are checked before the model loads.

    Args:
        model: A hub id or path (loaded with `args.model_init_kwargs`), a causal LM, or a `peft.PeftModel`.
        args: The `SDFTConfig`; None: the defaults, `output_dir="<model name>-SDFT"`.
        train_dataset: Rows with `prompt` and `privileged_context` (text or chat messages); a generation batch
            needs `generation_batch_size / num_generations` distinct prompts.
        eval_dataset: Rows like `train_dataset`, or a dict of such datasets.
        processing_class: The tokenizer; None loads the model's, left-padded.
        callbacks: `TrainerCallback`s; the self-distillation hooks they define are called
            (`SelfDistillationCallback`).
        optimizers: `(optimizer, lr_scheduler)`, as for `transformers.Trainer`.
        peft_config: A `peft.PeftConfig`: the adapter is added with TRL's `prepare_peft_model` and trains alone.
        tools: Callables (sync or async, typed, with Google-style docstrings) the student may call in rollouts.
        environment_factory: A callable returning an environment (`reset(**row)`; its public methods are tools),
            or a dict of them picked by each row's `environment` column.
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
        peft_config: "PeftConfig | None" = None,
        tools: list[Callable] | None = None,
        environment_factory: Callable[[], Any] | dict[str, Callable[[], Any]] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SDFTConfig(f"{os.path.basename(str(name).rstrip('/')) or 'model'}-SDFT")
        check_datasets(train_dataset, eval_dataset, args.generation_batch_size, args.num_generations)
        args.check_installed_packages(peft_config)
        if args.reuse_cpu_memory and (args.use_cpu or not has_accelerator()):
            logger.info(f"CPU malloc keeps freed blocks for reuse: {reuse_freed_cpu_memory()}.")
        self.teacher_prompt_template = resolve_teacher_prompt_template(args.teacher_prompt_template)
        self.chat_template_kwargs = dict(args.chat_template_kwargs or {})
        chat_template = load_chat_template(args.chat_template_path) if args.chat_template_path else None
        datasets = [("train", train_dataset), *named_eval_sets(eval_dataset)]
        set_seed(args.seed)  # PEFT initialises adapter weights randomly; environments are built here
        toolbox = check_tools(tools, environment_factory, datasets, args.async_rollouts)  # before the model loads
        processing_class, self._tokenizer = prepare_processing_class(
            model, processing_class, args.trust_remote_code, chat_template
        )
        # The prompts then show the tools (a template that cannot render them is refused before the model loads).
        self.toolbox = prepare_tools(toolbox, processing_class, self._tokenizer, self.chat_template_kwargs)
        self.max_prompt_length = args.max_prompt_length
        limits = (args.max_prompt_length, args.max_teacher_prompt_length, args.max_completion_length)
        context = models.context_length(model, settings.model_settings(args))  # from the config: no weights read yet
        self.max_teacher_prompt_length, self.prompt_lengths = batching.fit_datasets_in_context(
            processing_class, datasets, self.teacher_prompt_template, self.chat_template_kwargs, limits, context, _warn
        )

        model = load_model(model, settings.model_settings(args))
        warn_if_adapter_present(model, peft_config, _warn)
        model = prepare_peft(model, peft_config, args)
        check_finite_weights(model)
        self.eos_token_ids = eos_token_ids(model, self._tokenizer)
        self._forward_params = models.ready_for_training(model, self._tokenizer.pad_token_id)
        self.rollout_settings = settings.rollout_settings(args)
        self.generation_config = sampling_config(self.rollout_settings, self._tokenizer, self.eos_token_ids)
        self._step, self.num_generation_rounds = 0, 0
        self._nonfinite_loss = None  # the first non-finite loss of the current optimizer step, if any
        self._buffered_inputs = None

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
        self.metric_log = MetricLog(self.accelerator.gather, self.accelerator.device)
        self._metrics = self.metric_log.values  # TRL's name
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.teacher = build_teacher(TeacherContext(self.model, self.accelerator, settings.teacher_settings(args)))
        if self.teacher.moves:
            self.add_callback(TeacherUpdateCallback(self.teacher))
        self.rollout = self._build_rollout()
        self.teacher.bind(self.rollout)  # a teacher scored on the vLLM server scores through the backend
        self.tool_loop = tool_loop(
            self.rollout,
            self.toolbox,
            processing_class=processing_class,
            tokenizer=self._tokenizer,
            settings=settings.tool_loop_settings(args),
            chat_template_kwargs=self.chat_template_kwargs,
            accelerator=self.accelerator,
            end_ids=self.eos_token_ids,
        )
        self._generated_at, async_settings = 0, settings.async_round_settings(args)
        self.async_rounds = AsyncRounds(self.rollout, self.accelerator, async_settings) if args.async_rollouts else None
        chunk_size = resolve_chunk_size(
            self.model, args.loss_chunk_size, args.use_liger_kernel, args.use_teacher_server, self._forward_params
        )
        self.loss_settings = settings.loss_settings(args, chunk_size)
        self.importance_settings, self.loss_fn = self.loss_settings.importance, loss_function(self.loss_settings)
        fsdp_logits = self.is_fsdp_enabled and not chunk_size
        self.forward_settings, padded_because = forwards.plan(
            self.model, self._forward_params, args.padding_free, fsdp_logits, args.temperature
        )
        self.padding_free = self.forward_settings.padding_free
        if padded_because:
            logger.info(f"Padded forwards: {padded_because}.")

    def _build_rollout(self):
        """The rollout backend `rollout_settings.backend` names (`rollouts.ROLLOUT_BACKENDS`): "vllm" (colocate or
        server) with `use_vllm`, else "transformers" (`model.generate`), or one registered for `rollout_backend`."""
        context = RolloutContext(
            self.model,
            self.accelerator,
            self.processing_class,
            self._tokenizer,
            self.rollout_settings,
            self.eos_token_ids,
            longest_prompt=self.prompt_lengths.student,
            longest_teacher_prompt=self.prompt_lengths.teacher,
        )
        backend = build_rollout(context)
        # TRL's `generation_config` is the one `model.generate` samples with, when the backend has one.
        self.generation_config = getattr(backend, "generation_config", self.generation_config)
        if (description := backend.describe()) is not None:
            logger.info(description)
        return backend

    @property
    def teacher_model(self):
        """TRL's attribute: the frozen or EMA copy, or the student itself (`live`, and PEFT adapter switches)."""
        return self.teacher.module(self.model)

    @property
    def loss_chunk_size(self) -> int:
        """Tokens per chunk of the loss from hidden states; 0 on the logits path."""
        return self.loss_settings.chunk_size

    @property
    def vllm_generation(self):
        """TRL's name for the vLLM generation object (`trl.generation.VLLMGeneration`); None without vLLM."""
        return getattr(self.rollout, "generation", None)

    # ------------------------------------------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(REQUIRED_COLUMNS)

    def get_train_dataloader(self):
        # One loader batch holds a whole generation round for this process (GRPO-style buffering).
        loader = self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )
        if self.async_rounds is not None:  # a new run reads the loader from here: nothing in flight
            self.async_rounds.restart(loader, self._step)
        return loader

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.async_rounds is not None:  # the loop reads the batches through the lookahead (next round's rows)
            epoch_iterator = self.async_rounds.loop_iterator(epoch_iterator, int(self.state.epoch))
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _get_train_sampler(self, dataset=None):
        return EpochRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(eval_dataset, mini_repeat_count=self._num_generations("eval"), seed=self.args.seed)

    def _num_generations(self, mode: str) -> int:
        return (self.args.num_generations_eval if mode == "eval" else None) or self.args.num_generations

    # ----------------------------------------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nonfinite_loss is None and not torch.isfinite(loss).all():
            self._nonfinite_loss = loss.item()
        self._step += 1
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The parent's gradient norm, checked on every process before the optimizer step (`guards.py`): a
        non-finite loss or gradient stops the run there, so no weight takes a NaN or inf update."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        scaled = self.accelerator.scaler is not None or (self.is_deepspeed_enabled and self.args.fp16)
        flags = guards.step_flags(grad_norm, self._nonfinite_loss, scaled)
        flags = self.accelerator.gather(flags.to(self.accelerator.device)).view(-1, 2).cpu()
        problem = guards.nonfinite_problem(flags, self._nonfinite_loss, grad_norm)
        if problem:
            raise guards.error(self.state.global_step + 1, problem, self.is_deepspeed_enabled, self.args.output_dir)
        return grad_norm

    def _prepare_inputs(self, generation_batch):
        """Train: one generation round every `generate_every` micro-steps, served in `steps_per_generation` slices.
        Eval: a fresh batch each time."""
        if not self.model.training:
            return self.build_batch(generation_batch, "eval")
        slices, generate_every = self.args.steps_per_generation, self.args.generate_every
        if self._buffered_inputs is None or self._step % generate_every == 0:
            self._buffered_inputs = split_tensor_dict(self.build_batch(generation_batch, "train"), slices)
            self._hook("on_generation_batch_built", generate_every=generate_every, steps_per_generation=slices)
        if self.async_rounds is not None:
            self.metric_log.add("train", "async/staleness", float(self.state.global_step - self._generated_at))
        return self._buffered_inputs[self._step % slices]

    def build_batch(self, rows: list[dict[str, Any]], mode: str = "train") -> dict[str, torch.Tensor | None]:
        """Rows -> rollouts (generated now, or ahead by `async_rollouts`) -> the padded batch `compute_loss` reads.
        Public for inspection and tests: `trainer.compute_loss(trainer.model, trainer.build_batch(rows))` is their loss."""
        if mode == "train" and self.async_rounds is not None:
            last = self.state.max_steps * self.args.gradient_accumulation_steps
            result = self.async_rounds.round(rows, self._step, self.state.global_step, last, self._round_prompts)
            prompts, rollouts, self._generated_at = result.prompts, result.rollouts, result.generated_at
            for name, value in result.metrics.items():
                self.metric_log.add(mode, f"async/{name}", value)
        else:
            rows, toolsets = self.toolbox.start(rows) if self.toolbox is not None else (rows, None)
            prompts = self._round_prompts(rows, toolsets)
            round_ = dict(
                model=self.model_wrapped,
                prompt_ids=prompts.generation,
                num_generations=self._num_generations(mode),
                step=self.state.global_step,
            )
            rollouts = (
                self.rollout.generate(**round_) if toolsets is None else self.tool_loop.run(**round_, toolsets=toolsets)
            )
        self.num_generation_rounds += 1
        batch = batching.assemble_batch(
            prompts.student,
            prompts.teacher,
            rollouts.completions,
            pad_token_id=self._tokenizer.pad_token_id,
            device=self.accelerator.device,
            tool_mask=rollouts.tool_mask,
        )
        logps = importance.plan(self.importance_settings, mode == "train", rollouts.logprobs is not None)
        batching.add_engine_logps(batch, logps, rollouts.logprobs, self.accelerator.device)
        if logps.old == "trainer":
            with torch.no_grad(), self.accelerator.autocast():  # the rollout policy's log-probs (importance weights)
                logits = self.completion_view(self.model, batch, logits=True)
                batch["old_per_token_logps"] = losses.token_log_probs(logits, batch["completion_ids"])
        self.metric_log.add_round(mode, rollouts, self.eos_token_ids)
        keys = ("prompt_ids", "completion_ids", "old_per_token_logps", "teacher_input_ids", "teacher_attention_mask")
        self._hook("on_self_distillation_batch_prepared", **{key: batch[key] for key in keys})
        return batch

    def _round_prompts(self, rows: list[dict[str, Any]], toolsets=None) -> batching.RoundPrompts:
        prompts, generation_prompts = prompts_with_tools(
            self.toolbox,
            self.processing_class,
            rows,
            template=self.teacher_prompt_template,
            limits=(self.max_prompt_length, self.max_teacher_prompt_length),
            chat_template_kwargs=self.chat_template_kwargs,
            from_teacher=self.args.generate_from_teacher,
            toolsets=toolsets,
        )
        self._hook("on_generation_prompts_selected", generation_prompts=generation_prompts, generation_prompt_text=None)
        return prompts

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("SDFTTrainer.compute_loss does not return model outputs.")
        # One autocast region: the student's LM-head weight is cast once for its head and the loss (`head_weight`).
        with self.accelerator.autocast():
            loss = self._distillation_loss(model, inputs)
        if self.is_deepspeed_enabled and self.model.training:  # DeepSpeed steps inside backward: check the loss now
            problem = guards.loss_problem(loss, self.accelerator.gather, self.accelerator.device)
            if problem:  # the engine has not stepped yet
                raise guards.error(self.state.global_step + 1, problem, False, self.args.output_dir)
        return loss

    def _distillation_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        mask = losses.loss_mask(inputs["completion_mask"], self.args.num_loss_tokens_to_skip, inputs.get("tool_mask"))
        student = self.completion_view(model, inputs)
        # Every token skipped: zero loss and gradients, not an error. With several processes the others run the
        # teacher's forward and the loss (collectives under ZeRO-3 and FSDP), so the full path runs, weighing nothing.
        if not mask.any() and self.accelerator.num_processes == 1:
            self.metric_log.add_loss_term(mode, "distillation_loss", torch.zeros((), device=mask.device))
            return (student.hidden if isinstance(student, HiddenStates) else student).sum() * 0.0
        teacher = self.teacher.score(model, inputs, mask, self.state.global_step, self.completion_view)
        # The rollout policy's log-probs (reused rollouts) and the engine's (vLLM): what importance weights need.
        result = sharding.with_gathered_heads(  # ZeRO-3: the heads gathered
            self.loss_fn,
            self.loss_settings,
            student,
            teacher,
            token_ids=inputs["completion_ids"],
            mask=mask,
            old_per_token_logps=inputs.get("old_per_token_logps"),
            sampling_logps=inputs.get("sampling_per_token_logps"),
        )
        for name, value in result.metrics.items():
            self.metric_log.add_loss_term(mode, name, value)
        scale = getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1
        return result.loss / scale

    def completion_view(self, model, inputs, teacher: bool = False, logits: bool = False):
        """What the loss reads at the positions that predict the completion tokens (`forwards.completion_view`): the
        student's (or with `teacher`, the teacher prompt's) logits, or hidden states on the chunked path unless
        `logits`. Teachers get it as `view` (`teachers.Teacher.score`)."""
        input_ids, attention_mask = forwards.sequence(inputs, teacher)
        length, hidden_path = inputs["completion_ids"].size(1), bool(self.loss_chunk_size and not logits)
        return forwards.completion_view(model, input_ids, attention_mask, length, self.forward_settings, hidden_path)

    # -------------------------------------------------------------------------------------------- hooks, metrics
    def _hook(self, event: str, **payload) -> None:
        context = dict(args=self.args, state=self.state, control=self.control, model=self.model)
        dispatch(self.callback_handler.callbacks, event, **context, processing_class=self.processing_class, **payload)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time=None) -> None:
        super().log({**logs, **self.metric_log.pop("train" if self.model.training else "eval")}, start_time)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def train(
        self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs
    ) -> TrainOutput:
        """`transformers.Trainer.train`, closing what the run opened (engine threads, a round in flight, tool
        environments), on error too. `resume_from_checkpoint` (a directory, or True for the latest complete one)
        restores the EMA teacher too; a checkpoint of another model, or an incomplete one, is refused."""
        config = self.model.config.to_dict()
        resume_from_checkpoint = prepare_resume(
            resume_from_checkpoint, self.args.output_dir, self.teacher, _warn, config
        )
        if resume_from_checkpoint:
            self._step = checkpoint_step(resume_from_checkpoint) * self.args.gradient_accumulation_steps
            self._buffered_inputs = None
        self._nonfinite_loss = None
        try:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:  # a round still in flight is dropped; the backend's threads and temporary files go; environments close
            for part in (self.rollout if self.async_rounds is None else self.async_rounds, self.tool_loop):
                part is None or part.close()

    # ----------------------------------------------------------------------------------------------------- utils
    def generate(self, query: Any, max_new_tokens: int | None = None, **generation_kwargs) -> str:
        """The model's answer to one prompt: chat messages, or text, which becomes one user turn when the tokenizer
        has a chat template. Sampled as in training (`self.generation_config`: `temperature`, `top_p`, ...,
        `generation_kwargs`, up to `max_completion_length` tokens) unless overridden: `do_sample=False` for the
        greedy answer, any other `GenerationConfig` field by name."""
        config = answer_config(self.generation_config, max_new_tokens, **generation_kwargs)
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ) as model:
            return answer_one(model, self.processing_class, query, config, self.chat_template_kwargs)
