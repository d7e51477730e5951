"""Step time of a multi-turn round (a tool call, its result, an answer) against a single-turn round of the same
completion length, on SmolLM2-135M-Instruct with the bundled `smollm2-tools` template, CPU, float32.

    python benchmarks/agentic_step.py [--rounds 3] [--steps 4] [--out benchmarks/results/agentic_step.json]

Both cases generate with the real model (`model.generate`, one forward per token), forced to fixed text through
`prefix_allowed_tokens_fn`, so that the two rounds hold the same tokens per completion and only the way they are made
differs:
- `multi`: turn 1 is a `lookup` call; the tool runs, its result is rendered by the template (prefilled, not
  generated, masked from the loss); turn 2 is an answer. Two `generate` calls per round.
- `single`: one generated completion as long as the whole trajectory (every token generated and trained on), from
  the same prompt (the tool list shown too).
The loss, teacher and optimizer work per step are the same for both (same completion length; the multi-turn mask
holds fewer tokens). Rounds alternate the cases (single multi single multi ...), each run a fresh process; the first
step of every run is warm-up and not counted. Reported per case: median step time, and generation's share of it.
Do not run anything heavy beside it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL = '<tool_call>\n{"name": "lookup", "arguments": {"name": "Velmorra"}}\n</tool_call><|im_end|>'
ANSWER = "Velmorra's home city is Quistrel, according to the lookup tool.<|im_end|>"
FILLER = "The answer, from what I know of it, is a city whose name I should look up before I say it. "


def lookup(name: str) -> str:
    """Look up a made-up entity.

    Args:
        name: The entity's name.
    """
    return json.dumps({"name": name, "kind": "guild", "home city": "Quistrel", "founded": 1821})


class ForcedRollout:
    """`model.generate` forced to `targets(prompt_text)`: real per-token generation cost, fixed content."""

    def __init__(self, context, targets):
        from trl_sdft.rollouts.transformers import TransformersRollout

        self.inner = TransformersRollout.from_context(context)
        self.tokenizer, self.targets = context.tokenizer, targets
        self.generate_seconds = 0.0

    def generate(self, model, prompt_ids, num_generations, step):
        import torch
        from transformers import GenerationConfig

        from trl_sdft.batch import left_pad
        from trl_sdft.rollouts import Rollouts, cut_at_eos

        started = time.perf_counter()
        target = [self.targets(self.tokenizer.decode(ids)) for ids in prompt_ids]
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id, "cpu")
        width = ids.size(1)

        def allowed(batch, sequence):
            position = len(sequence) - width
            wanted = target[batch]
            return [wanted[position] if position < len(wanted) else self.tokenizer.eos_token_id]

        config = GenerationConfig(
            max_new_tokens=max(map(len, target)),
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.inner.eos_token_ids,
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, prefix_allowed_tokens_fn=allowed
            )
        self.generate_seconds += time.perf_counter() - started
        return Rollouts(cut_at_eos(out[:, width:].tolist(), self.inner.eos_token_ids))

    def close(self):
        pass

    def describe(self):
        return None


def run_case(case: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from trl_sdft import SDFTConfig, SDFTTrainer
    from trl_sdft.chat_templates import load_chat_template
    from trl_sdft.demo.default_model import smollm2_dir
    from trl_sdft.rollouts import register_rollout_backend
    from trl_sdft.tools import tool_schema

    path = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokenizer.chat_template = load_chat_template("smollm2-tools")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    call, answer = encode(CALL), encode(ANSWER)
    from trl_sdft.chat_templates import tool_suffix_ids

    suffix = tool_suffix_ids(
        tokenizer, tokenizer, [{"role": "tool", "name": "lookup", "content": lookup("Velmorra")}], {}
    )
    length = len(call) + len(suffix) + len(answer)
    filler = (encode(FILLER) * (length // len(encode(FILLER)) + 1))[: length - 1] + [tokenizer.eos_token_id]

    def targets(prompt_text):
        if case == "single":
            return filler
        return answer if "<tool_response>\n" in prompt_text else call  # the system text names the tag too

    backends = []

    def factory(context):
        backends.append(ForcedRollout(context, targets))
        return backends[-1]

    register_rollout_backend("forced", factory, replace=True)
    rows = [
        {"prompt": [{"role": "user", "content": "What is the home city of Velmorra?"}], "privileged_context": CALL}
    ] * 16
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.generated = backends[0].generate_seconds

        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter() - self.started, backends[0].generate_seconds - self.generated))

    args = SDFTConfig(
        output_dir=f"/tmp/agentic-step-{case}",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=length,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        rollout_backend="forced",
        disable_tqdm=True,
        # the single-turn prompts show the same tool list, so both rounds hold the same prompt tokens too
        chat_template_kwargs={"tools": [tool_schema(lookup)]} if case == "single" else None,
    )
    trainer = SDFTTrainer(
        path,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
        **({"tools": [lookup]} if case == "multi" else {}),
    )
    trainer.train()
    counted = times[1:]  # the first step is warm-up
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "case": case,
        "completion_tokens": length,
        "generated_tokens": length if case == "single" else len(call) + len(answer),
        "tool_tokens": 0 if case == "single" else len(suffix),
        "step_seconds": statistics.median(t for t, _ in counted),
        "generation_seconds": statistics.median(g for _, g in counted),
        "tool_calls_per_rollout": history[-1].get("tools/call_frequency") if history else None,
        "mean_length_logged": history[-1].get("completions/mean_length") if history else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "agentic_step.json"))
    parser.add_argument("--case", choices=["single", "multi"], help=argparse.SUPPRESS)  # one run, in a child
    options = parser.parse_args(argv)
    if options.case:
        print(json.dumps(run_case(options.case, options.steps)))
        return
    runs = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for round_index in range(options.rounds):
        for case in ("single", "multi"):
            command = [sys.executable, __file__, "--case", case, "--steps", str(options.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["round"] = round_index
            runs.append(run)
            print(json.dumps(run), flush=True)
    import platform

    import torch

    summary = {}
    for case in ("single", "multi"):
        mine = [run for run in runs if run["case"] == case]
        summary[case] = {
            "step_seconds": statistics.median(run["step_seconds"] for run in mine),
            "generation_seconds": statistics.median(run["generation_seconds"] for run in mine),
            "completion_tokens": mine[0]["completion_tokens"],
            "generated_tokens": mine[0]["generated_tokens"],
            "tool_tokens": mine[0]["tool_tokens"],
        }
    summary["multi_over_single"] = summary["multi"]["step_seconds"] / summary["single"]["step_seconds"]
    result = {
        "command": "python benchmarks/agentic_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
        "setup": "SmolLM2-135M-Instruct, CPU float32, 4 rollouts per step (1 prompt x 4), base teacher, topk_logits",
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(options.out), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
