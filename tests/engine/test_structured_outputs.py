"""Structured outputs (xgrammar) and the batched sampler, through the LLM API on the tiny model.

The tiny model's random weights never write valid JSON by themselves, so an answer that validates
against its schema proves the constraint."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from glm5_ascend import LLM, SamplingParams
from glm5_ascend.engine.sampling_params import StructuredOutputsParams as SO
from tests.conftest import TEST_DEVICE

PROMPT = {"prompt_token_ids": list(range(40, 90))}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, seed=0)


def _gen(llm, prompts=None, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 40)
    return llm.generate(prompts or [PROMPT], SamplingParams(**kw))


def test_json_schema_answer_validates(llm):
    free = _gen(llm)[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(free)
    out = _gen(llm, max_tokens=80, structured_outputs=SO(json=SCHEMA, disable_any_whitespace=True))[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("so, check", [
    (SO(regex=r"[a-z]{3}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
    (SO(choice=["yes", "no", 'a "quoted" one']), lambda t: t in ("yes", "no", 'a "quoted" one')),
    (SO(grammar='root ::= "(" [0-9] [0-9]? ")"'), lambda t: re.fullmatch(r"\([0-9]{1,2}\)", t)),
    (SO(json_object=True, disable_any_whitespace=True), lambda t: isinstance(json.loads(t), dict)),
])
def test_regex_choice_grammar_json_object(llm, so, check):
    out = _gen(llm, structured_outputs=so, max_tokens=60)[0].outputs[0]
    assert out.finish_reason == "stop" and check(out.text), out.text


@pytest.mark.parametrize("so, msg", [
    (dict(json={"type": "objekt"}), "Invalid structured outputs json: .*objekt"),
    (dict(json='{"type": "object"'), "not valid JSON"),
    (dict(regex="a(b"), "Invalid structured outputs regex: .*parenthesis"),
    (dict(grammar='root ::= "a" | '), "Invalid structured outputs grammar"),
    (dict(grammar="   "), "grammar must be a non-empty string"),
    (dict(grammar="root ::= root"), "matches no text"),
    (dict(structural_tag="{}"), "Invalid structured outputs structural_tag: .*format"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(regex="a", choice=["a"]), "only use one kind"),
    (dict(), "none is specified"),
])
def test_bad_constraints_raise_one_clear_line(llm, so, msg):
    with pytest.raises(ValueError, match=msg) as e:
        _gen(llm, structured_outputs=SO(**so))
    assert "\n" not in str(e.value)
    assert not llm.llm_engine.has_unfinished_requests()


def test_constrained_row_leaves_its_batch_mates_alone(llm):
    """One constrained and seven unconstrained greedy requests: the seven are as without it."""
    prompts = [{"prompt_token_ids": list(range(40 + 3 * i, 80 + 3 * i))} for i in range(8)]
    alone = [o.outputs[0].token_ids for o in _gen(llm, prompts[1:], max_tokens=12, ignore_eos=True)]
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=SO(regex="[0-9]{12}"))]
    params += [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 7
    mixed = llm.generate(prompts, params)
    assert re.fullmatch("[0-9]{12}", mixed[0].outputs[0].text)
    assert [o.outputs[0].token_ids for o in mixed[1:]] == alone


def test_n_choices_and_seeds_each_follow_the_grammar(llm):
    so = SO(json=SCHEMA, disable_any_whitespace=True)
    out = _gen(llm, n=3, temperature=1.0, seed=7, max_tokens=80, structured_outputs=so)
    texts = [c.text for c in out[0].outputs]
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len(set(texts)) > 1


def test_seeded_draws_do_not_depend_on_batch_mates(llm):
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=10, ignore_eos=True)
    alone = _gen(llm, **kw)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(10, 30))}] * 3
    params = [SamplingParams(**kw)] + [SamplingParams(temperature=1.0, max_tokens=10, min_p=0.1)] * 3
    assert llm.generate([PROMPT] + others, params)[0].outputs[0].token_ids == alone


def test_constraint_starts_after_the_reasoning_end_token(llm):
    """start_after_token_id (the server's </think>): free text up to it, then the constraint."""
    free = _gen(llm, max_tokens=8, ignore_eos=True)[0].outputs[0].token_ids
    end = free[3]
    first = free.index(end)
    out = _gen(llm, max_tokens=30, structured_outputs=SO(regex="[0-9]{4}", start_after_token_id=end))[0].outputs[0]
    assert out.token_ids[: first + 1] == free[: first + 1]
    tail = llm.get_tokenizer().decode(out.token_ids[first + 1:], skip_special_tokens=True)
    assert re.fullmatch("[0-9]{4}", tail) and out.finish_reason == "stop"


def test_logprob_token_ids_are_reported_every_step(llm):
    greedy = _gen(llm, max_tokens=4, ignore_eos=True, logprobs=0)[0].outputs[0]
    pinned = [greedy.token_ids[0], 5, 200]
    out = _gen(llm, max_tokens=4, ignore_eos=True, logprob_token_ids=pinned)[0].outputs[0]
    assert out.token_ids == greedy.token_ids
    for entry in out.logprobs:
        assert set(pinned) <= set(entry) and all(entry[t].rank >= 1 for t in pinned)
    first = out.logprobs[0][pinned[0]]
    assert first.rank == 1 and abs(first.logprob - greedy.logprobs[0][pinned[0]].logprob) < 1e-5
    with pytest.raises(ValueError, match="out of vocabulary"):
        _gen(llm, logprob_token_ids=[10 ** 6])


def test_preempted_and_data_parallel_sequences_keep_their_grammar(tiny_model_dir):
    """A KV cache too small for the batch (preemption recomputes a sequence with its matcher as it
    was) and two DP groups (the second compiles the grammar in its own process): same constrained
    outputs as one process with room for all."""
    prompts = [{"prompt_token_ids": list(range(10 + 7 * i, 50 + 7 * i))} for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(regex="[0-9]{20}"))
    roomy = LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, seed=0, dtype="float32")
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    assert all(re.fullmatch("[0-9]{20}", o.outputs[0].text) for o in roomy.generate(prompts[:2], params))
    tight = dict(device=TEST_DEVICE, block_size=16, seed=0, dtype="float32", num_gpu_blocks_override=14,
                 max_num_batched_tokens=24, max_model_len=160)
    small = LLM(tiny_model_dir, **tight)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == want
    assert small.llm_engine.stats()["num_preemptions"] > 0
    dp = LLM(tiny_model_dir, **tight, data_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in dp.generate(prompts, params)] == want
    finally:
        dp.shutdown()


def test_strict_false_follows_the_schemas_own_additional_properties(llm):
    """response_format json_schema "strict": false -> SO(strict=False): undeclared keys allowed where the
    schema allows them; strict (the default, vLLM's) never generates them."""
    import xgrammar as xgr
    so = llm.llm_engine.structured_outputs
    tok = llm.get_tokenizer()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def accepts(text, **kw):
        m = xgr.GrammarMatcher(so.compile(SO(json=schema, **kw)))
        return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False)) and m.is_completed()

    assert accepts('{"a": 1}') and accepts('{"a": 1}', strict=False)
    assert not accepts('{"a": 1, "b": 2}') and accepts('{"a": 1, "b": 2}', strict=False)
