"""A format warm start for the bundled agentic task: `smollm2-135m-tools`.

SmolLM2-135M-Instruct does not write tool calls: under every prompt, template and teacher prompt tried (plain, with
instructions, one-shot, SmolLM2's own function-calling prompt, the call prefilled), greedy decoding gave 0% calls on
the held-out questions and sampling at most 5%, none with the asked entity. On-policy distillation then never sees a
call, and the multi-turn path of agentic SDFT does not run in a user's first agentic run.

The warm start teaches the *format* only: a few steps of SFT (TRL's `SFTTrainer`) on demonstrations of four other
tools (weather, population, dictionary, stock price: their names, arguments and results have nothing to do with
`lookup` and the made-up entities), mixed with rehearsal rows where the model answers plain instructions in its own
words (its greedy answers before the warm start, so that answering without a tool stays what it does when no tool
fits). Afterwards it calls the tool it is shown, with the argument names it saw in the warm start; choosing the
argument and answering from the result are what the bundled task then teaches (SFT or SDFT).

`resolve_model("smollm2-135m-tools")` builds it once from the embedded model (about 5 minutes on 2 CPU cores) in a
separate process, and caches it beside the embedded model; the recipe is written to `warm_start.json` in the model
directory. The general probes measure what the warm start itself costs (the results page has the figures).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .default_model import BUILT_FROM_DEFAULT, TOOLS_MODEL, ModelUnavailableError, _ensure, cache_dir, smollm2_dir

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The recipe: `steps` SFT steps of `batch_size` rows at a constant `learning_rate`; one row in
    `rehearsal_every` is a rehearsal row (a plain instruction and the model's own answer)."""

    steps: int = 12
    batch_size: int = 4
    learning_rate: float = 5e-5
    rehearsal_every: int = 4
    seed: int = 0
    version: int = RECIPE_VERSION


# ------------------------------------------------------------------------------------------------------ the tools
def _value(*parts: str) -> random.Random:
    """A generator seeded by the arguments: a tool answers the same question the same way every time."""
    return random.Random(int(hashlib.sha256("|".join(parts).lower().encode()).hexdigest()[:12], 16))


def get_weather(city: str) -> str:
    """Get the current weather in a city: the sky and the temperature in degrees Celsius.

    Args:
        city: The city's name, e.g. "Paris".
    """
    rng = _value("weather", city)
    sky = rng.choice(["sunny", "rainy", "cloudy", "snowy", "windy", "foggy"])
    return json.dumps({"sky": sky, "temperature_c": rng.randint(-5, 34)})


def get_population(country: str) -> str:
    """Get the population of a country, in millions.

    Args:
        country: The country's name, e.g. "France".
    """
    return json.dumps({"population_millions": round(_value("population", country).uniform(0.5, 120), 1)})


DEFINITIONS = {
    "harbor": "a sheltered place where ships stay",
    "lantern": "a portable lamp in a case",
    "meadow": "a field of grass and flowers",
    "quarry": "a pit where stone is dug out",
    "thicket": "a dense group of bushes",
    "anvil": "an iron block on which metal is shaped",
    "beacon": "a light used as a signal",
    "ember": "a glowing piece of coal or wood",
    "glacier": "a slow river of ice",
    "hamlet": "a small village",
}


def define_word(word: str) -> str:
    """Find the meaning of an English word in a dictionary.

    Args:
        word: The word, e.g. "harbor".
    """
    definition = DEFINITIONS.get(word.strip().lower())
    if definition is None:
        raise ValueError(f"{word!r} is not in the dictionary")
    return json.dumps({"definition": definition})


def get_stock_price(ticker: str) -> str:
    """Get the latest price of a stock, in US dollars.

    Args:
        ticker: The stock's ticker symbol, e.g. "ACME".
    """
    return json.dumps({"price_usd": round(_value("stock", ticker).uniform(3, 900), 2)})


WARM_TOOLS = (get_weather, get_population, define_word, get_stock_price)
CITIES = ["Paris", "Madrid", "Boston", "Seoul", "Accra", "Vienna", "Manila", "Austin", "Krakow", "Medan", "Toronto"]
COUNTRIES = ["Chile", "Kenya", "Peru", "Ghana", "Egypt", "Canada", "Nepal", "Spain", "Fiji", "Mongolia", "Uruguay"]
# Rehearsal: instructions unlike the general probes (no capitals, languages, currencies or quiz facts), answered by
# the model itself before the warm start.
REHEARSAL_PROMPTS = [
    "Write a short haiku about autumn leaves.",
    "Give me one tip for sleeping better.",
    "Explain what a noun is in one sentence.",
    "Suggest a name for a pet goldfish.",
    "Write a friendly greeting for a birthday card.",
    "What should I pack for a day at the beach?",
    "Describe a cat in three words.",
    "Give me a simple recipe idea for breakfast.",
    "How can I stay focused while studying?",
    "Write one sentence about the importance of kindness.",
    "Suggest a fun activity for a rainy afternoon.",
    "What is a good way to start learning to draw?",
    "Tell me a fun fact about octopuses.",
    "Write a short thank-you note to a teacher.",
    "Give me two ideas for a healthy snack.",
    "How do I make a cup of tea?",
]


def _tool_question(rng: random.Random) -> tuple[str, object, dict, str]:
    """(question, tool, arguments, answer template with `{result}` fields)."""
    kind = rng.randrange(len(WARM_TOOLS))
    if kind == 0:
        city = rng.choice(CITIES)
        question = rng.choice(["What is the weather like in {x}?", "How warm is it in {x} right now?"])
        return question.format(x=city), get_weather, {"city": city}, f"In {city} it is {{sky}}, {{temperature_c}} °C."
    if kind == 1:
        country = rng.choice(COUNTRIES)
        question = rng.choice(["How many people live in {x}?", "What is the population of {x}?"])
        answer = f"{country} has about {{population_millions}} million people."
        return question.format(x=country), get_population, {"country": country}, answer
    if kind == 2:
        word = rng.choice(sorted(DEFINITIONS))
        question = rng.choice(['What does the word "{x}" mean?', "Define {x}."])
        return question.format(x=word), define_word, {"word": word}, f'"{word.capitalize()}" means {{definition}}.'
    ticker = "".join(rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(rng.choice([3, 4])))
    question = rng.choice(["What is {x} trading at?", "What is the stock price of {x}?"])
    return question.format(x=ticker), get_stock_price, {"ticker": ticker}, f"{ticker} trades at {{price_usd}} dollars."


def warm_start_rows(recipe: WarmStart, rehearsal_answers: dict[str, str]) -> list[dict]:
    """`steps * batch_size` SFT rows (`messages` and `tools` as JSON text, what TRL's SFTTrainer reads): tool
    demonstrations with the needed tool alone or beside one other, and every `rehearsal_every`-th row a plain
    instruction with the model's own answer (the tool list shown or not)."""
    from ..tools import tool_name, tool_schema

    rng = random.Random(recipe.seed)
    rows = []
    for index in range(recipe.steps * recipe.batch_size):
        if recipe.rehearsal_every and index % recipe.rehearsal_every == recipe.rehearsal_every - 1:
            prompt = rng.choice(REHEARSAL_PROMPTS)
            shown = [rng.choice(WARM_TOOLS)] if rng.random() < 0.5 else []
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": rehearsal_answers[prompt]},
            ]
        else:
            question, tool, arguments, answer = _tool_question(rng)
            shown = [tool] + ([rng.choice([t for t in WARM_TOOLS if t is not tool])] if rng.random() < 0.3 else [])
            rng.shuffle(shown)
            result = tool(**arguments)
            call = {"type": "function", "function": {"name": tool_name(tool), "arguments": arguments}}
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": tool_name(tool), "content": result},
                {"role": "assistant", "content": answer.format(**json.loads(result))},
            ]
        rows.append({"messages": messages, "tools": json.dumps([tool_schema(t) for t in shown])})
    return rows


# ------------------------------------------------------------------------------------------------------ the build
def rehearsal_answers(model, tokenizer, max_new_tokens: int = 48) -> dict[str, str]:
    """The model's own greedy answers to `REHEARSAL_PROMPTS` (chat template, no tools)."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in REHEARSAL_PROMPTS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = side
    return {prompt: answer.strip() for prompt, answer in zip(REHEARSAL_PROMPTS, answers, strict=True)}


def build(base_dir: str | Path, target: str | Path, recipe: WarmStart | None = None) -> Path:
    """SFT `base_dir` on `warm_start_rows` with TRL's `SFTTrainer` (assistant tokens only, the `smollm2-tools`
    template) and save it to `target` (which must not exist), with the template and `warm_start.json`. Meant for a
    process of its own (`tool_format_dir` runs it in a child): the Trainer seeds the process's generators."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ..chat_templates import load_chat_template

    recipe = recipe or WarmStart()
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists: the warm start writes a new directory.")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    answers = rehearsal_answers(model, tokenizer)
    tokenizer.chat_template = load_chat_template("smollm2-tools")
    rows = warm_start_rows(recipe, answers)
    with tempfile.TemporaryDirectory(prefix="tool-format-") as scratch:
        args = SFTConfig(
            output_dir=scratch,
            per_device_train_batch_size=recipe.batch_size,
            max_steps=recipe.steps,
            learning_rate=recipe.learning_rate,
            lr_scheduler_type="constant",
            seed=recipe.seed,
            data_seed=recipe.seed,
            logging_steps=max(recipe.steps // 3, 1),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,  # TRL turns it on by default; a 135M model does not need it
            max_length=1024,
            packing=False,
            assistant_only_loss=True,
            dataset_num_proc=None,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        output = trainer.train()
    model = trainer.model
    model.config.name_or_path = TOOLS_MODEL
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    record = {
        "base": str(base_dir),
        "recipe": dataclasses.asdict(recipe),
        "tools": [tool.__name__ for tool in WARM_TOOLS],
        "rows": len(rows),
        "train_loss": round(float(output.training_loss), 4),
        "trainer": "trl.SFTTrainer (assistant_only_loss)",
    }
    (target / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n")
    return target


# What a multi-process launch (torchrun, accelerate, MPI) sets and accelerate reads: the child must not see it.
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("ACCELERATE_", "PMI_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_", "MPI_LOCAL")


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` without a launch's variables. Under a launch, `OMP_NUM_THREADS` goes too (torchrun sets it to 1 per
    process; the one process that builds should use the cores the others wait with)."""
    launched = int(environ.get("WORLD_SIZE", "1") or 1) > 1
    return {
        name: value
        for name, value in environ.items()
        if name not in LAUNCH_VARIABLES
        and not name.startswith(LAUNCH_PREFIXES)
        and not (launched and name == "OMP_NUM_THREADS")
    }


def tool_format_dir(progress: bool = True) -> Path:
    """The cached warm-started model, built on first use from the embedded model in a child process (its own
    accelerate state, one process even under a multi-process launch; concurrent callers wait on a file lock). A
    directory counts once its `warm_start.json` is written; one without it (a copy or removal cut short) is replaced."""
    from filelock import FileLock

    target = cache_dir() / f"{TOOLS_MODEL}-v{RECIPE_VERSION}"
    if (target / "warm_start.json").exists():
        return target
    base = smollm2_dir(progress)
    with FileLock(str(_ensure(target.parent) / f".{target.name}.lock")):
        if (target / "warm_start.json").exists():  # another process built it while this one waited
            return target
        if progress:
            print(
                f"Building {TOOLS_MODEL} in {target} (once, about 5 minutes on 2 CPU cores): SmolLM2-135M-Instruct "
                "after a format warm start on other tools (trl_sdft/demo/tool_format.py).",
                flush=True,
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            command = [sys.executable, "-m", "trl_sdft.demo.tool_format", str(base), str(staging / "model")]
            done = subprocess.run(
                command, env=child_environment(dict(os.environ)), capture_output=not progress, text=True
            )
            if done.returncode != 0:
                detail = (done.stderr or "").strip().splitlines()[-1:] if not progress else []
                raise ModelUnavailableError(
                    f"Building {TOOLS_MODEL} failed (exit code {done.returncode}{': ' + detail[0] if detail else ''}). "
                    f"Run `{sys.executable} -m trl_sdft.demo.tool_format {base} <dir>` to see why."
                )
            if target.exists():  # incomplete (no warm_start.json): our own cache entry, replaced
                if progress:
                    print(f"Replacing {target}: it has no warm_start.json (an incomplete copy).", flush=True)
                shutil.rmtree(target)
            os.replace(staging / "model", target)
        finally:  # also on Ctrl-C: no half-written model is left in the cache
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m trl_sdft.demo.tool_format BASE_MODEL_DIR NEW_DIR", file=sys.stderr)
        return 2
    print(f"Warm start written to {build(argv[0], argv[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


BUILT_FROM_DEFAULT[TOOLS_MODEL] = lambda: tool_format_dir()  # `resolve_model("smollm2-135m-tools")`
