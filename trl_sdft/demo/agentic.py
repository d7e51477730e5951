"""The bundled agentic task: answer questions about made-up entities by calling a `lookup` tool and reading its result.

`entities.jsonl` holds 48 entities that do not exist (invented names: the model cannot know them), each with a kind, a
home city and a founding year; `generate_entities` makes the table from a seed (`write_resources` rewrites the files).
The first 32 entities train, the other 16 are held out: their questions measure the skill (call the tool with the
asked name, then answer from its result), not facts learned by heart.

- SDFT rows (`sdft_rows`, `train.jsonl`): the question as a chat prompt; the privileged context is a demonstration
  trajectory as text: the exact tool call, the tool's result and the answer sentence.
- SFT rows (`sft_rows`): the same demonstrations as chat `messages` (user, assistant tool call, tool result, assistant
  answer) with a `tools` column, so TRL's SFTTrainer renders the same tool list as SDFT's prompts.
- `evaluate_agentic`: greedy multi-turn rollouts through `ToolCallingLoop` on held-out questions; the rates of
  well-formed calls, of calls with the asked name and of final answers holding the right value.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from ..jsonl import json_lines
from ..rollouts import Rollouts, cut_at_eos, eos_token_ids
from .evaluation import KnowledgeEvalCallback
from .knowledge import is_correct

SEED = 20240601
NUM_ENTITIES = 48
NUM_TRAIN = 32
RESOURCE_DIR = "agentic"

KINDS = [
    "guild",
    "brewery",
    "lighthouse",
    "orchard",
    "observatory",
    "shipyard",
    "library",
    "vineyard",
    "foundry",
    "monastery",
    "circus",
    "bakery",
]
CITIES = [
    "Oslo",
    "Lisbon",
    "Cairo",
    "Lima",
    "Perth",
    "Quito",
    "Dublin",
    "Hanoi",
    "Nairobi",
    "Bergen",
    "Porto",
    "Tunis",
    "Riga",
    "Kyoto",
    "Denver",
    "Zurich",
]
ONSETS = ["V", "Qu", "Th", "Br", "Z", "K", "M", "Sk", "Dr", "Gr", "Pl", "Y", "F", "N", "T", "Xh"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "y"]
MIDDLES = ["lm", "st", "rr", "nd", "v", "ss", "lt", "rn", "z", "sk", "ml", "th"]
ENDINGS = ["a", "el", "or", "ix", "ane", "orra", "enth", "is", "ova", "un", "ith", "ara"]

# What each question asks: the attribute, the question and the answer sentence.
QUESTIONS = {
    "city": ("What is the home city of {name}?", "{name} is based in {value}."),
    "founded": ("In what year was {name} founded?", "{name} was founded in {value}."),
    "kind": ("What kind of place is {name}?", "{name} is a {value}."),
}
# The teacher's prompt. Of the templates tried on SmolLM2-135M-Instruct (5 held-out questions, teacher-forced), this
# one gave the demonstrated call the highest first-token probability (0.14 against the student's 0.004; the paper's
# "example for a response" wording 0.07) and the call as a whole -8.6 nats (student: -45).
TEACHER_PROMPT_TEMPLATE = (
    "{prompt}\n\nExample of a correct response:\n{privileged_context}\n\nReply now with the <tool_call> only."
)


# ------------------------------------------------------------------------------------------------ the entities
def _name(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(MIDDLES) + rng.choice(ENDINGS)


def generate_entities(seed: int = SEED, count: int = NUM_ENTITIES) -> list[dict]:
    """`count` made-up entities `{name, kind, city, founded}`, the same for the same seed. Names are unique, and no
    name is a prefix of another (an answer that names one entity cannot match another)."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < count:
        name = _name(rng)
        if 6 <= len(name) <= 10 and not any(name.startswith(n) or n.startswith(name) for n in names):
            names.append(name)
    return [
        {"name": name, "kind": rng.choice(KINDS), "city": rng.choice(CITIES), "founded": rng.randint(1650, 1990)}
        for name in names
    ]


def write_resources(directory: str | Path | None = None, seed: int = SEED) -> Path:
    """(Re)write `entities.jsonl`, `train.jsonl` (SDFT rows of the training entities) and `eval.jsonl` (questions
    about the held-out entities) into `directory` (default: the package's `resources/agentic`)."""
    directory = Path(directory or Path(__file__).resolve().parent.parent / "resources" / RESOURCE_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    entities = generate_entities(seed)
    train, heldout = split_entities(entities)
    files = {"entities.jsonl": entities, "train.jsonl": sdft_rows(train), "eval.jsonl": eval_rows(heldout)}
    for name, rows in files.items():
        with open(directory / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return directory


def _read(name: str) -> list[dict]:
    text = resources.files("trl_sdft.resources").joinpath(RESOURCE_DIR).joinpath(name).read_text(encoding="utf-8")
    return [record for _, record in json_lines(text.splitlines())]


@cache
def _entities() -> tuple[dict, ...]:
    return tuple(_read("entities.jsonl"))


def load_entities() -> list[dict]:
    """The bundled table (`entities.jsonl`)."""
    return [dict(entity) for entity in _entities()]


def split_entities(entities: list[dict] | None = None, num_train: int = NUM_TRAIN) -> tuple[list[dict], list[dict]]:
    """(training entities, held-out entities): the first `num_train` and the rest."""
    entities = load_entities() if entities is None else entities
    return entities[:num_train], entities[num_train:]


# ------------------------------------------------------------------------------------------------------ the tool
def lookup(name: str) -> str:
    """Look up an entity by its name and return what is known about it: its kind, home city and founding year.

    Args:
        name: The entity's name, e.g. "Velmorra".
    """
    wanted = name.strip().lower()
    for entity in _entities():
        if entity["name"].lower() == wanted:
            return record_text(entity)
    raise ValueError(f"no entity named {name!r}")


def record_text(entity: dict) -> str:
    """What `lookup` returns for `entity`: its attributes as JSON."""
    return json.dumps({key: value for key, value in entity.items() if key != "name"})


def tool_schemas(tools: list[Callable] | None = None) -> list[dict]:
    """The JSON schemas the chat template shows (default: `lookup`'s)."""
    from ..tools import tool_schema

    return [tool_schema(tool) for tool in tools or [lookup]]


# ------------------------------------------------------------------------------------------------------ the rows
def questions(entities: list[dict], attributes: tuple[str, ...] = tuple(QUESTIONS)) -> list[dict]:
    """One question per entity and attribute: `{entity, attribute, question, answer, sentence, result}` (`result`:
    what `lookup` returns for the entity)."""
    rows = []
    for entity in entities:
        for attribute in attributes:
            question, sentence = QUESTIONS[attribute]
            value = str(entity[attribute])
            rows.append(
                {
                    "entity": entity["name"],
                    "attribute": attribute,
                    "question": question.format(name=entity["name"]),
                    "answer": value,
                    "sentence": sentence.format(name=entity["name"], value=value),
                    "result": record_text(entity),
                }
            )
    return rows


def tool_call_text(name: str, tool: str = "lookup") -> str:
    """A call as the `smollm2-tools` template writes it (and TRL's `qwen3_template` parser reads it)."""
    return f"<tool_call>\n{json.dumps({'name': tool, 'arguments': {'name': name}})}\n</tool_call>"


def demonstration_text(question: dict) -> str:
    """The privileged context: the call, the tool's result and the answer, as the conversation shows them."""
    call, result = tool_call_text(question["entity"]), question["result"]
    return f"{call}\n<tool_response>\n{result}\n</tool_response>\n{question['sentence']}"


def demonstration_messages(question: dict) -> list[dict]:
    """The same trajectory as chat messages (what SFT trains on)."""
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"name": question["entity"]}}}
    return [
        {"role": "user", "content": question["question"]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup", "content": question["result"]},
        {"role": "assistant", "content": question["sentence"]},
    ]


def sdft_rows(entities: list[dict]) -> list[dict]:
    """SDFT rows: `{prompt, privileged_context}`, the context a demonstration trajectory."""
    return [
        {"prompt": [{"role": "user", "content": q["question"]}], "privileged_context": demonstration_text(q)}
        for q in questions(entities)
    ]


def sft_rows(entities: list[dict]) -> list[dict]:
    """SFT rows for TRL's SFTTrainer: the demonstrations as `messages`, the tool list as `tools` (JSON text, which
    SFTTrainer loads: a list of schemas would not fit one Arrow type)."""
    tools = json.dumps(tool_schemas())
    return [{"messages": demonstration_messages(q), "tools": tools} for q in questions(entities)]


def eval_rows(entities: list[dict]) -> list[dict]:
    """Evaluation rows: `{prompt, entity, attribute, answer}`."""
    return [
        {
            "prompt": [{"role": "user", "content": q["question"]}],
            "entity": q["entity"],
            "attribute": q["attribute"],
            "answer": q["answer"],
        }
        for q in questions(entities)
    ]


def sdft_dataset(entities: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(sdft_rows(entities))


def sft_dataset(entities: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(sft_rows(entities))


# ------------------------------------------------------------------------------------------------- evaluation
class GreedyBackend:
    """A rollout backend (`rollouts.RolloutBackend`) that decodes greedily with `model.generate`, in batches."""

    def __init__(self, tokenizer, end_ids: list[int], max_new_tokens: int = 64, batch_size: int = 16):
        self.tokenizer = tokenizer
        self.end_ids = list(end_ids)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, model, prompt_ids, num_generations: int, step: int, max_new_tokens=None) -> Rollouts:
        prompts = [ids for ids in prompt_ids for _ in range(num_generations)]
        budgets = [self.max_new_tokens] * len(prompts) if max_new_tokens is None else list(max_new_tokens)
        budgets = [min(budget, self.max_new_tokens) for budget in budgets]
        pad = self.tokenizer.pad_token_id
        completions = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=model.device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(budgets[start : start + self.batch_size]),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=self.end_ids,
            )
            rows = zip(output[:, width:].tolist(), budgets[start : start + self.batch_size], strict=True)
            completions += cut_at_eos([row[:budget] for row, budget in rows], self.end_ids)
        return Rollouts(completions)

    def close(self) -> None:
        pass

    def describe(self) -> str | None:
        return f"greedy decoding, {self.max_new_tokens} new tokens per turn"


def _turns(completion: list[int], mask: list[int]) -> list[list[int]]:
    """The generated turns of a trajectory: the runs of tokens the tool mask marks as generated."""
    turns, current = [], []
    for token, generated in zip(completion, mask, strict=True):
        if generated:
            current.append(token)
        elif current:
            turns.append(current)
            current = []
    if current:
        turns.append(current)
    return turns


def _calls(message: dict) -> list[dict]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        calls.append({"name": function.get("name") if isinstance(function, dict) else None, "arguments": arguments})
    return calls


@torch.no_grad()
def evaluate_agentic(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int = 64,
    tools: list[Callable] | None = None,
    max_iterations: int = 2,
    max_completion_length: int = 192,
    batch_size: int = 16,
    num_samples: int = 4,
) -> dict:
    """Greedy multi-turn rollouts on `rows` (`{prompt, entity, answer}`), through `ToolCallingLoop` with `tools`
    (default: `lookup`) and up to `max_iterations` rounds of calls, `max_new_tokens` per turn.

    Rates: `tool_call_rate` (the first turn is a well-formed call of the first tool), `correct_call_rate` (and its
    `name` argument is the row's entity), `answer_accuracy` (the last generated turn holds the row's answer as a
    whole word, case-insensitive). With `num_samples` decoded trajectories and every row's outcome."""
    from ..chat_templates import MALFORMED, parse_turn, prepare_tool_tokenizer
    from ..rollouts.agentic import ToolCallingLoop, ToolLoopSettings
    from ..tools import tool_name

    tools = list(tools or [lookup])
    schemas = tool_schemas(tools)
    prepare_tool_tokenizer(tokenizer, tokenizer)  # the parser of tool calls (`response_template`)
    end_ids = eos_token_ids(model, tokenizer)
    prompt_ids = [
        list(
            tokenizer.apply_chat_template(
                row["prompt"], tools=schemas, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for row in rows
    ]
    backend = GreedyBackend(tokenizer, end_ids, max_new_tokens, batch_size)
    settings = ToolLoopSettings(max_completion_length, max_iterations)
    loop = ToolCallingLoop(backend, tokenizer, tokenizer, settings, tools=schemas, end_ids=end_ids)
    toolset = {tool_name(tool): tool for tool in tools}
    was_training = model.training
    model.eval()
    try:
        trajectories = loop.run(model, prompt_ids, 1, 0, [toolset] * len(rows))
    finally:
        model.train(was_training)
    expected_tool = tool_name(tools[0])
    outcomes = []
    for row, prompt, completion, mask in zip(
        rows, prompt_ids, trajectories.completions, trajectories.tool_mask, strict=True
    ):
        turns = _turns(completion, mask)
        first = turns[0] if turns else []
        message = parse_turn(tokenizer, first, prompt, schemas) if first else {}
        calls = [] if message.get(MALFORMED) else _calls(message)
        called = bool(calls) and all(call["name"] == expected_tool for call in calls)
        arguments = [call["arguments"] for call in calls if isinstance(call["arguments"], dict)]
        correct_call = called and any(
            str(args.get("name", "")).strip().lower() == row["entity"].lower() for args in arguments
        )
        final = tokenizer.decode(turns[-1], skip_special_tokens=True) if turns else ""
        outcomes.append(
            {
                "question": row["prompt"][-1]["content"],
                "answer": row["answer"],
                "tool_call": called,
                "correct_call": correct_call,
                "answer_correct": is_correct(final, [row["answer"]]),
                "turns": len(turns),
                "final": final,
            }
        )
    count = max(len(outcomes), 1)
    samples = [
        {"question": outcome["question"], "answer": outcome["answer"], "trajectory": tokenizer.decode(completion)}
        for outcome, completion in zip(outcomes[:num_samples], trajectories.completions[:num_samples])
    ]
    return {
        "tool_call_rate": sum(o["tool_call"] for o in outcomes) / count,
        "correct_call_rate": sum(o["correct_call"] for o in outcomes) / count,
        "answer_accuracy": sum(o["answer_correct"] for o in outcomes) / count,
        "total": len(outcomes),
        "tool_calls": trajectories.tool_stats.calls,
        "tool_failures": trajectories.tool_stats.failures,
        "mean_turns": sum(o["turns"] for o in outcomes) / count,
        "samples": samples,
        "outcomes": outcomes,
    }


def evaluate_probes(model, tokenizer, num_probes: int | None = None, max_new_tokens: int = 24) -> dict:
    """The general-knowledge probes (`probes.jsonl`), answered greedily without tools, as the demo scores them."""
    from .evaluation import accuracies
    from .knowledge import load_probes

    sets = {"general_probes": [(p["question"], p["answers"]) for p in load_probes(num_probes)]}
    return accuracies(model, tokenizer, sets, max_new_tokens)["general_probes"]


def agentic_scores(agentic: dict, probes: dict) -> dict:
    """`evaluate_agentic`'s rates and `evaluate_probes`' accuracy as `{name: {"accuracy", "correct", "total"}}` (the
    shape the knowledge task's results have): `tool_calls`, `correct_calls`, `answers` (with the decoded samples and
    every outcome) and `general_probes` (with the answers)."""
    total = agentic["total"]

    def entry(rate: float, **extra) -> dict:
        return {"accuracy": rate, "correct": round(rate * total), "total": total, **extra}

    return {
        "tool_calls": entry(agentic["tool_call_rate"], calls=agentic["tool_calls"], failures=agentic["tool_failures"]),
        "correct_calls": entry(agentic["correct_call_rate"]),
        "answers": entry(agentic["answer_accuracy"], samples=agentic["samples"], outcomes=agentic["outcomes"]),
        "general_probes": probes,
    }


class AgenticEvalCallback(KnowledgeEvalCallback):
    """The CLI's before/after evaluation of the bundled agentic task (`--agentic_eval`, set by `configs/agentic.yaml`):
    greedy multi-turn rollouts on the questions about the held-out entities (`rows`, default: all 48; the tool-call
    rate, calls with the asked name, right answers) and the general-knowledge probes, before training, at each
    evaluation and at the end. `results.json`, the logs (`agentic/<name>`) and the summary table as for the knowledge
    task."""

    log_prefix = "agentic"

    def __init__(self, rows=None, num_probes=None, max_new_tokens: int = 48, max_iterations: int = 2, **kwargs):
        super().__init__({}, max_new_tokens, **kwargs)
        self.rows = eval_rows(split_entities()[1]) if rows is None else rows
        self.num_probes, self.max_iterations = num_probes, max_iterations

    def evaluate(self, model, tokenizer) -> dict:
        spec = (self.rows, self.max_new_tokens)
        agentic = evaluate_agentic(model, tokenizer, *spec, max_iterations=self.max_iterations)
        return agentic_scores(agentic, evaluate_probes(model, tokenizer, self.num_probes))


__all__ = [
    "GreedyBackend",
    "QUESTIONS",
    "TEACHER_PROMPT_TEMPLATE",
    "AgenticEvalCallback",
    "agentic_scores",
    "demonstration_messages",
    "demonstration_text",
    "eval_rows",
    "evaluate_agentic",
    "evaluate_probes",
    "generate_entities",
    "load_entities",
    "lookup",
    "questions",
    "record_text",
    "sdft_dataset",
    "sdft_rows",
    "sft_dataset",
    "sft_rows",
    "split_entities",
    "tool_call_text",
    "tool_schemas",
    "write_resources",
]
