"""The bundled agentic task (`trl_sdft/demo/agentic.py`): the entity table, the `lookup` tool, the SDFT and SFT rows,
the bundled template's generation markers, and `evaluate_agentic` (tiny models only)."""

import json
import pathlib
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sdft.chat_templates import load_chat_template, parse_turn
from trl_sdft.demo import agentic
from trl_sdft.rollouts import Rollouts
from trl_sdft.testing import COLORS, NAMES, build_tool_tokenizer
from trl_sdft.testing import lookup as color_lookup

END = "<|im_end|>"


def color_rows(count: int = 4) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"What color is {name}?"}], "entity": name, "answer": color}
        for name, color in list(zip(NAMES, COLORS))[:count]
    ]


# ---------------------------------------------------------------------------------------------- the entity table
def test_entity_table_is_deterministic_and_splits_disjointly():
    entities = agentic.load_entities()
    assert entities == agentic.generate_entities()  # the bundled file is the seeded generator's output
    assert agentic.generate_entities() == agentic.generate_entities(agentic.SEED)
    assert agentic.generate_entities(agentic.SEED + 1) != entities
    assert len(entities) == agentic.NUM_ENTITIES
    names = [entity["name"] for entity in entities]
    assert len(set(n.lower() for n in names)) == len(names)
    assert not any(a != b and b.startswith(a) for a in names for b in names)
    for entity in entities:
        assert set(entity) == {"name", "kind", "city", "founded"}
    train, heldout = agentic.split_entities()
    assert (len(train), len(heldout)) == (agentic.NUM_TRAIN, agentic.NUM_ENTITIES - agentic.NUM_TRAIN)
    assert not {e["name"] for e in train} & {e["name"] for e in heldout}


def test_bundled_row_files_match_the_generator(tmp_path):
    written = agentic.write_resources(tmp_path)
    bundled = agentic.RESOURCE_DIR
    from importlib import resources

    for name in ("entities.jsonl", "train.jsonl", "eval.jsonl"):
        package = resources.files("trl_sdft.resources").joinpath(bundled).joinpath(name).read_text()
        assert (written / name).read_text() == package, name
    train, heldout = agentic.split_entities()
    train_rows = [json.loads(line) for line in (written / "train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(line) for line in (written / "eval.jsonl").read_text().splitlines()]
    assert len(train_rows) == 3 * len(train) and len(eval_rows) == 3 * len(heldout)
    held_names = {e["name"] for e in heldout}
    assert not any(name in row["privileged_context"] for row in train_rows for name in held_names)
    assert {row["entity"] for row in eval_rows} == held_names


# ------------------------------------------------------------------------------------------------------ the tool
def test_lookup_answers_known_names_and_raises_on_unknown():
    entity = agentic.load_entities()[5]
    result = json.loads(agentic.lookup(entity["name"]))
    assert result == {"kind": entity["kind"], "city": entity["city"], "founded": entity["founded"]}
    assert agentic.lookup(f"  {entity['name'].upper()} ") == agentic.lookup(entity["name"])
    with pytest.raises(ValueError, match="no entity named 'Nobodyhere'"):
        agentic.lookup("Nobodyhere")
    schema = agentic.tool_schemas()[0]["function"]
    assert schema["name"] == "lookup" and schema["parameters"]["required"] == ["name"]
    assert schema["parameters"]["properties"]["name"]["type"] == "string"


def test_unknown_name_becomes_an_error_result():
    from trl_sdft.tools import call_tools

    call = {"type": "function", "function": {"name": "lookup", "arguments": {"name": "Nobodyhere"}}}
    (result,) = call_tools([call], {"lookup": agentic.lookup})
    assert result.failed and "no entity named" in json.loads(result.message["content"])["error"]


# ------------------------------------------------------------------------------------------------------ the rows
def test_privileged_context_holds_a_call_the_parser_reads():
    tokenizer = build_tool_tokenizer()
    train, _ = agentic.split_entities()
    for row, question in zip(agentic.sdft_rows(train[:3]), agentic.questions(train[:3])):
        context = row["privileged_context"]
        call = context[: context.index("</tool_call>") + len("</tool_call>")]
        assert call == agentic.tool_call_text(question["entity"])
        ids = tokenizer(call + END, add_special_tokens=False)["input_ids"]
        message = parse_turn(tokenizer, ids, [], agentic.tool_schemas())
        assert message["tool_calls"] == [
            {"type": "function", "function": {"name": "lookup", "arguments": {"name": question["entity"]}}}
        ]
        assert agentic.lookup(question["entity"]) in context and context.endswith(question["sentence"])
        assert question["answer"] in question["sentence"]


def smollm2_tools_tokenizer():
    tokenizer = build_tool_tokenizer()
    tokenizer.chat_template = load_chat_template("smollm2-tools")
    return tokenizer


def test_demonstration_is_what_the_bundled_template_renders():
    """The call and result in the privileged context are the text the model writes and reads in a rollout."""
    tokenizer = smollm2_tools_tokenizer()
    question = agentic.questions(agentic.split_entities()[0][:1])[0]
    text = tokenizer.apply_chat_template(
        agentic.demonstration_messages(question), tools=agentic.tool_schemas(), tokenize=False
    )
    call, result = agentic.tool_call_text(question["entity"]), agentic.lookup(question["entity"])
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert f"<tool_response>\n{result}\n</tool_response>" in text
    assert f"<|im_start|>assistant\n{question['sentence']}<|im_end|>" in text
    assert '"name": "lookup"' in text.split("<|im_start|>user")[0]  # the tools are listed in the system prompt


def test_bundled_template_marks_what_the_assistant_writes():
    from trl.chat_template_utils import (
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
        supports_tool_calling,
    )

    tokenizer = smollm2_tools_tokenizer()
    assert supports_tool_calling(tokenizer) and is_chat_template_prefix_preserving(tokenizer)
    assert is_chat_template_stop_token_trained(tokenizer)
    row = agentic.sft_rows(agentic.split_entities()[0][:1])[0]
    rendered = tokenizer.apply_chat_template(
        row["messages"],
        tools=json.loads(row["tools"]),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    marked = tokenizer.decode([token for token, keep in zip(ids, mask) if keep])
    question = agentic.questions(agentic.split_entities()[0][:1])[0]
    assert marked == f"{agentic.tool_call_text(question['entity'])}{END}{question['sentence']}{END}"
    # The markers change nothing in the text: the template without them renders the same bytes.
    plain = re.sub(r"\{%-? *(end)?generation *-?%\}", "", tokenizer.chat_template)
    for messages in (row["messages"], row["messages"][:2], [{"role": "user", "content": "hi"}]):
        for tools in (None, json.loads(row["tools"])):
            for generation_prompt in (False, True):
                kwargs = dict(tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
                assert tokenizer.apply_chat_template(messages, **kwargs) == tokenizer.apply_chat_template(
                    messages, chat_template=plain, **kwargs
                )


def test_sft_rows_carry_the_same_tools_as_sdft():
    from trl.data_utils import is_conversational

    rows = agentic.sft_rows(agentic.split_entities()[0][:2])
    assert is_conversational(rows[0])
    assert json.loads(rows[0]["tools"]) == agentic.tool_schemas()
    roles = [message["role"] for message in rows[0]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]


# ------------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize(
    "replies, expected",
    [
        ([agentic.tool_call_text("@NAME@") + END, "It is @ANSWER@." + END], (1.0, 1.0, 1.0)),
        ([agentic.tool_call_text("Zorbo") + END, "No idea." + END], (1.0, 0.25, 0.0)),
        (['<tool_call>\n{"name": "lookup", "arguments": \n</tool_call>' + END, "No." + END], (0.0, 0.0, 0.0)),
        ([agentic.tool_call_text("Zorbo", tool="search") + END, "No." + END], (0.0, 0.0, 0.0)),
        (["I think it is red." + END], (0.0, 0.0, 0.25)),
    ],
    ids=["right-call", "wrong-name", "malformed", "other-tool", "no-call"],
)
def test_evaluate_agentic_counts_scripted_calls(monkeypatch, replies, expected):
    tokenizer = build_tool_tokenizer()
    model = torch.nn.Linear(1, 1)  # never run: the backend is scripted
    model.generation_config = None
    rows = color_rows(4)
    answers = {row["entity"]: row["answer"] for row in rows}

    def generate(self, model, prompt_ids, num_generations, step):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            name = next(n for n in NAMES if f"What color is {n}?" in text)
            reply = replies[min(text.count("<tool_response>"), len(replies) - 1)]
            reply = reply.replace("@NAME@", name).replace("@ANSWER@", answers[name])
            out += [self.tokenizer(reply, add_special_tokens=False)["input_ids"]] * num_generations
        return Rollouts(out)

    monkeypatch.setattr(agentic.GreedyBackend, "generate", generate)
    result = agentic.evaluate_agentic(model, tokenizer, rows, tools=[color_lookup], num_samples=2)
    got = (result["tool_call_rate"], result["correct_call_rate"], result["answer_accuracy"])
    assert got == expected
    assert result["total"] == 4 and len(result["samples"]) == 2
    if expected[0]:
        assert result["tool_calls"] == 4 and "<tool_response>" in result["samples"][0]["trajectory"]


def test_evaluate_agentic_on_the_tiny_tool_model(tool_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32)
    result = agentic.evaluate_agentic(model, tokenizer, color_rows(8), max_new_tokens=32, tools=[color_lookup])
    for key in ("tool_call_rate", "correct_call_rate", "answer_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["correct_call_rate"] <= result["tool_call_rate"]
    assert result["tool_call_rate"] > 0  # trained on `lookup` trajectories, it calls the tool greedily
    assert result["tool_calls"] >= round(result["tool_call_rate"] * 8)
    assert not model.training


def test_greedy_backend_cuts_at_the_end_token(tool_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32)
    backend = agentic.GreedyBackend(tokenizer, [tokenizer.eos_token_id], max_new_tokens=40, batch_size=2)
    prompts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for row in color_rows(3)
    ]
    first = backend.generate(model, prompts, 2, 0).completions
    assert len(first) == 6 and first[0] == first[1]  # greedy: the copies agree
    for ids in first:
        assert tokenizer.eos_token_id not in ids[:-1] and len(ids) <= 40
    # Batching does not change greedy answers (left padding with a mask).
    alone = agentic.GreedyBackend(tokenizer, [tokenizer.eos_token_id], 40, 1).generate(model, prompts, 1, 0)
    assert alone.completions == first[::2]


# ------------------------------------------------------------------------------------------ the run's before/after
def test_agentic_eval_scores_before_and_after_and_prints_the_table(tool_model_dir, tmp_path, capsys):
    """Before: `configs/agentic.yaml` ended with averaged metrics and a path; nothing said what the run learned."""
    from datasets import Dataset

    from trl_sdft import SDFTConfig, SDFTTrainer
    from trl_sdft.cli import print_summary
    from trl_sdft.testing import tool_rows

    callback = agentic.AgenticEvalCallback(rows=color_rows(4), num_probes=3, max_new_tokens=32)
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=1)
    args.update(max_completion_length=48, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = SDFTTrainer(
        AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32),
        args=SDFTConfig(**args, distillation_topk=5),
        train_dataset=Dataset.from_list(tool_rows()),
        processing_class=AutoTokenizer.from_pretrained(tool_model_dir),
        tools=[color_lookup],
        callbacks=[callback],
    )
    callback.attach(trainer)
    trainer.train()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for moment in ("baseline", "final"):
        scores = results[moment]
        assert set(scores) >= {"tool_calls", "correct_calls", "answers", "general_probes"}
        assert scores["tool_calls"]["total"] == 4 and scores["general_probes"]["total"] == 3
        assert scores["tool_calls"]["accuracy"] > 0  # the tiny tool model calls `lookup` greedily
        assert scores["correct_calls"]["accuracy"] <= scores["tool_calls"]["accuracy"]
    assert any("agentic/tool_calls" in entry for entry in trainer.state.log_history)
    print_summary(callback.results, 1.0, str(tmp_path / "out"))
    table = capsys.readouterr().out
    for name in ("tool_calls", "correct_calls", "answers", "general_probes"):
        assert re.search(rf"^{name} +\d+/\d+ +\d+% +\d+/\d+ +\d+%$", table, re.M), table


def test_the_agentic_config_asks_for_the_before_and_after_table():
    from trl_sdft import cli

    script_args, training_args, _ = cli.parse(
        ["--config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "agentic.yaml")]
    )
    assert script_args.agentic_eval and not script_args.knowledge_eval and training_args.max_steps > 0
