"""Where vLLM's server and ours once differed (issue 18), checked as a client sees it: the openai client
against real server processes, the shared GLM-5 one and one started with vLLM's optional flags."""
from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, metric, metric_values, start_server

GREEDY = {"temperature": 0.0}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
NEVER = "\x01never-matching stop string\x02"  # holds back the last len-1 characters of every delta
PARITY_FLAGS = [
    "--served-model-name", MODEL, "--max-model-len", "1024", "--block-size", "16", "--uvicorn-log-level", "warning",
    "--enable-force-include-usage", "--enable-prompt-tokens-details", "--enable-per-request-metrics",
    "--enable-request-id-headers", "--root-path", "/api", "--enable-tokenizer-info-endpoint",
]
TIMING = {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms", "tokens_per_second"}


@pytest.fixture(scope="module")
def parity(tiny_model_dir, tmp_path_factory):
    srv = start_server(PARITY_FLAGS, tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pclient(parity):
    c = openai.OpenAI(base_url=parity.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def _root_client(url: str) -> openai.OpenAI:
    """A client whose base is the server root, for the routes outside /v1."""
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------- item 2: streams and fields
def test_empty_stream_options_send_no_usage(client):
    chat = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, stream=True,
        stream_options={}, extra_body=NO_THINK))
    assert chat and all(c.usage is None and c.choices for c in chat)
    cmpl = list(client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True, stream_options={}))
    assert cmpl and all(c.usage is None and c.choices for c in cmpl)


def test_force_include_usage_puts_usage_on_every_stream(pclient):
    chunks = list(pclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4, stream=True,
        extra_body={"ignore_eos": True, **NO_THINK}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    cmpl = list(pclient.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert cmpl[-1].choices == [] and cmpl[-1].usage.completion_tokens == 3


def test_chat_stream_return_token_ids_sends_every_id(client):
    """The first chunk carries prompt_token_ids; held-back text (a pending stop string) still streams its ids."""
    req = dict(model=MODEL, messages=[{"role": "user", "content": "count"}], max_completion_tokens=12,
               stop=[NEVER], temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True, **NO_THINK})
    full = client.chat.completions.create(**req)
    chunks = list(client.chat.completions.create(**req, stream=True))
    assert chunks[0].model_extra["prompt_token_ids"] == full.model_extra["prompt_token_ids"]
    assert all("prompt_token_ids" not in c.model_extra or c.model_extra["prompt_token_ids"] is None
               for c in chunks[1:])
    ids = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
    assert ids == full.choices[0].model_extra["token_ids"] and len(ids) == 12
    held = [c for c in chunks if c.choices and c.choices[0].model_extra.get("token_ids")
            and not c.choices[0].delta.content]
    assert held, "the text of the first tokens is held back, yet their ids must stream"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_fields_not_asked_for_are_null(client, http):
    cmpl = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()
    for key in ("system_fingerprint", "service_tier", "kv_transfer_params"):
        assert key in cmpl and cmpl[key] is None, key
    for key in ("token_ids", "prompt_token_ids", "prompt_logprobs", "logprobs", "stop_reason"):
        assert key in cmpl["choices"][0], key
    assert cmpl["choices"][0]["token_ids"] is None and cmpl["choices"][0]["prompt_token_ids"] is None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=2, extra_body=NO_THINK)
    extra = chat.model_extra
    for key in ("prompt_token_ids", "prompt_logprobs", "kv_transfer_params"):
        assert key in extra and extra[key] is None, key
    assert chat.choices[0].model_extra["token_ids"] is None
    assert chat.usage.prompt_tokens_details is None  # no --enable-prompt-tokens-details here


def test_prompt_tokens_details_counts_cached_prompt_tokens(pclient):
    prompt = "The prefix cache keeps full blocks of this prompt. " * 8  # > 16-token blocks, byte-level
    first = pclient.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    second = pclient.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details is None or first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and second.usage.prompt_tokens - 16 < cached < second.usage.prompt_tokens
    chat = pclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           max_completion_tokens=1, stream=True, extra_body=NO_THINK)
    chat = pclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           max_completion_tokens=1, stream=True, extra_body=NO_THINK)
    usage = list(chat)[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= 16


def test_per_request_metrics(pclient, client):
    out = pclient.completions.create(model=MODEL, prompt="time me", max_tokens=4, extra_body={"ignore_eos": True})
    m = out.model_extra["metrics"]
    assert set(m) == TIMING and all(isinstance(m[k], float) and m[k] >= 0 for k in TIMING)
    chat = pclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=3, extra_body={"ignore_eos": True, **NO_THINK})
    assert set(chat.model_extra["metrics"]) == TIMING
    chunks = list(pclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, stream=True,
        extra_body={"ignore_eos": True, **NO_THINK}))
    assert set(chunks[-1].model_extra["metrics"]) == TIMING
    assert all("metrics" not in c.model_extra for c in chunks[:-1])
    two = pclient.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
    assert two.model_extra["metrics"] is None  # vLLM reports them for one prompt and one choice only
    plain = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert plain.model_extra["metrics"] is None  # no --enable-per-request-metrics there


# ---------------------------------------------------------------- item 4: flags and routes
def test_root_path(parity):
    spec = httpx.get(parity.url + "/openapi.json", timeout=30).json()
    assert {"url": "/api"} in spec.get("servers", [])
    behind_proxy = _root_client(parity.url + "/api/v1")
    assert [m.id for m in behind_proxy.models.list()] == [MODEL]


def test_request_id_headers(pclient, client):
    rid = uuid.uuid4().hex
    raw = pclient.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2,
        extra_headers={"X-Request-Id": rid}, extra_body=NO_THINK)
    assert raw.headers["x-request-id"] == rid and raw.parse().id == f"chatcmpl-{rid}"
    raw = pclient.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2, stream=True)
    assert len(raw.headers["x-request-id"]) == 32
    list(raw.parse())
    plain = client.models.with_raw_response.list()
    assert "x-request-id" not in plain.headers  # off unless --enable-request-id-headers


def test_tokenizer_info(parity, server):
    info = _root_client(parity.url).get("/tokenizer_info", cast_to=object)
    assert info["tokenizer_class"] and "chat_template" in info and isinstance(info.get("eos_token"), (str, dict))
    with pytest.raises(openai.NotFoundError):
        _root_client(server.url).get("/tokenizer_info", cast_to=object)


def test_invocations_route(server):
    c = _root_client(server.url)
    chat = c.post("/invocations", cast_to=openai.types.chat.ChatCompletion, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **NO_THINK})
    assert chat.object == "chat.completion" and chat.usage.completion_tokens >= 1
    cmpl = c.post("/invocations", cast_to=openai.types.Completion, body={"prompt": "hi", "max_tokens": 2})
    assert cmpl.object == "text_completion"
    with pytest.raises(openai.BadRequestError, match="messages.*prompt"):
        c.post("/invocations", cast_to=object, body={"input": "hi"})


def test_logit_bias_error_names_every_bad_key(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                  logit_bias={"5": 1.0, "999999": 2.0, "abc": 1.0, "-3": 1.0})
    message = e.value.body["message"]
    for key in ("999999", "abc", "-3"):
        assert key in message, message
    assert "'5'" not in message and e.value.body["param"] == "logit_bias"


def test_out_of_range_number_carries_pydantic_type(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, seed=2 ** 63)
    assert "less_than_equal" in e.value.body["message"] and e.value.body["param"] == "seed"


# ---------------------------------------------------------------- item 5: metrics
def test_vllm_metric_families(client, http):
    before = metric_values(http.get("/metrics").text)
    client.completions.create(model=MODEL, prompt="measure", max_tokens=7, n=2, extra_body={"ignore_eos": True})
    after = metric_values(http.get("/metrics").text)

    def grew(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("vllm:request_params_n_count") == 1 and grew("vllm:request_params_n_sum") == 2
    assert grew("vllm:request_params_max_tokens_count") == 1 and grew("vllm:request_params_max_tokens_sum") == 7
    for name in ("inference", "prefill", "decode", "queue"):
        assert grew(f"vllm:request_{name}_time_seconds_count") == 2, name  # one per choice, as vLLM fans n out
    assert grew("vllm:request_num_preemptions_count") == 2
    assert grew("vllm:iteration_tokens_total_count") >= 7  # at least one step per generated token
    assert metric(after, "vllm:iteration_tokens_total_bucket", le="16384.0") == metric(
        after, "vllm:iteration_tokens_total_count")
    assert metric(after, "vllm:request_params_n_bucket", le="20.0") >= 1
    assert metric(after, "vllm:cache_config_info", block_size="128") == 1
    for reason in ("capacity", "deferred"):
        assert f'vllm:num_requests_waiting_by_reason{{model_name="{MODEL}",reason="{reason}"}}' in after


# ---------------------------------------------------------------- item 3: prompt options and field policy
def test_truncation_side(client):
    prompt = list(range(10, 40))
    kept = {}
    for side in ("left", "right"):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={
            "truncate_prompt_tokens": 8, "truncation_side": side, "return_token_ids": True})
        kept[side] = out.choices[0].model_extra["prompt_token_ids"]
    assert kept == {"left": prompt[-8:], "right": prompt[:8]}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a long question " * 4}],
                                          max_completion_tokens=1, extra_body={
                                              "truncate_prompt_tokens": 5, "truncation_side": "right", **NO_THINK})
    assert chat.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"truncation_side": "middle"})
    assert e.value.body["param"] == "truncation_side"


@pytest.mark.parametrize("field,value", [("bad_words", ["x"]), ("logits_processors", ["my.proc"])])
def test_vllm_fields_not_implemented_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]
    ok = client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                   extra_body={"bad_words": [], "logits_processors": None})
    assert ok.choices  # their defaults ask for nothing, so they pass


def test_fields_unknown_to_vllm_are_ignored_with_a_warning(pclient, parity):
    out = pclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=1,
                                          extra_body={"frobnicate_level": 3, **NO_THINK})
    assert out.choices
    assert "ignored: ['frobnicate_level']" in parity.log_tail(20000)
