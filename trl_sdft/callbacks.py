"""The self-distillation hooks: their names, a base class that defines them, and their dispatch.

Any `TrainerCallback` that defines one of these methods gets it called with `args`, `state`, `control`, `model`,
`processing_class` and the hook's payload (keyword arguments), exactly as `trl.experimental.sdft` does.
"""

from transformers import TrainerCallback

HOOKS = (
    # payload: generation_prompts (list), generation_prompt_text (None; kept for TRL's signature)
    "on_generation_prompts_selected",
    # payload: generate_every (int), steps_per_generation (int)
    "on_generation_batch_built",
    # payload: old_per_token_logps, prompt_ids, completion_ids, teacher_input_ids, teacher_attention_mask
    "on_self_distillation_batch_prepared",
)


class SelfDistillationCallback(TrainerCallback):
    """A `TrainerCallback` with the three self-distillation hooks as no-ops, to override as needed."""

    def on_generation_prompts_selected(self, args, state, control, **kwargs):
        """Called before a generation round, with the round's prompts.

        Keyword arguments besides `model` and `processing_class`: `generation_prompts` (the prompts about to be
        sampled, one per completion) and `generation_prompt_text` (None; kept for TRL's signature).
        """

    def on_generation_batch_built(self, args, state, control, **kwargs):
        """Called after a training round's batch is built (after `on_self_distillation_batch_prepared`) and split
        into the micro-batches of the next steps.

        Keyword arguments besides `model` and `processing_class`: `generate_every` (steps between rounds:
        `steps_per_generation x num_iterations`) and `steps_per_generation`.
        """

    def on_self_distillation_batch_prepared(self, args, state, control, **kwargs):
        """Called once per round (train and eval) when the student's and the teacher's inputs are built, before any
        loss.

        Keyword arguments besides `model` and `processing_class`: `old_per_token_logps` (the rollout policy's
        log-probs: computed by the trainer when a round outlives an optimizer step, or the server's under
        `async_rollouts`; else None), `prompt_ids`, `completion_ids`, `teacher_input_ids` and `teacher_attention_mask`.
        """


def dispatch(callbacks, event: str, **kwargs) -> None:
    """Call `event` on every callback that defines it."""
    if event not in HOOKS:
        raise ValueError(f"Unknown self-distillation hook {event!r}; known hooks: {', '.join(HOOKS)}.")
    for callback in callbacks:
        hook = getattr(callback, event, None)
        if hook is not None:
            hook(**kwargs)
