"""Prometheus metrics with vLLM's names, each labelled with model_name.

Every app has its own CollectorRegistry, so several servers (or test apps) can
live in one process. Gauges and the engine's own counters (prefix cache,
preemptions) are read from the step thread's stats snapshot at scrape time;
per-request counters and histograms are updated as each request ends.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from glm5_ascend.engine.async_engine import RequestStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
         40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_ITERATION = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_N = [1, 2, 5, 10, 20]
_PREEMPTIONS = [1, 2, 3, 4, 5, 10, 20]
_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
            480.0, 960.0, 1920.0, 7680.0]


def _sizes(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's request-size buckets)."""
    out, base = [], 1
    while True:
        for m in (1, 2, 5):
            v = m * base
            if v > max_model_len:
                return out
            out.append(float(v))
        base *= 10


class _EngineCollector:
    """Gauges and engine-owned counters, read from the latest stats snapshot."""

    def __init__(self, stats_source, model_name: str, cache_info: dict | None):
        self.stats_source = stats_source
        self.model_name = model_name
        self.cache_info = cache_info

    def collect(self):
        s = self.stats_source() or {}
        label = [self.model_name]
        for family, name, doc, key in (
                (GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
                 "num_running"),
                (GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 "num_waiting"),
                (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 "kv_cache_usage"),
                (CounterMetricFamily, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens.",
                 "prefix_cache_queries"),
                (CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens.",
                 "prefix_cache_hits"),
                (CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                 "num_preemptions")):
            m = family(name, doc, labels=["model_name"])
            m.add_metric(label, float(s.get(key, 0)))
            yield m
        # Every waiting request here waits for room (KV blocks, --max-num-seqs); none is deferred.
        m = GaugeMetricFamily("vllm:num_requests_waiting_by_reason", "Number of requests waiting, by reason.",
                              labels=["model_name", "reason"])
        m.add_metric(label + ["capacity"], float(s.get("num_waiting", 0)))
        m.add_metric(label + ["deferred"], 0.0)
        yield m
        if self.cache_info:
            keys = sorted(self.cache_info)
            m = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=keys)
            m.add_metric([str(self.cache_info[k]) for k in keys], 1.0)
            yield m
        # Not vLLM's: where the time goes, for `glm5-ascend bench serve`'s breakdown.
        c = CounterMetricFamily("glm5:engine_step_seconds", "Engine step thread wall time by phase.",
                                labels=["model_name", "phase"])
        for phase, secs in (s.get("step_seconds") or {}).items():
            c.add_metric(label + [phase], float(secs))
        yield c
        c = CounterMetricFamily("glm5:tokenize_seconds", "Server time in chat templates and tokenization.",
                                labels=["model_name"])
        c.add_metric(label, float(s.get("tokenize_seconds", 0.0)))
        yield c


class Metrics:
    """The server's metrics; ``observe`` is the AsyncEngine's on_request_done callback (any thread)."""

    def __init__(self, model_name: str, max_model_len: int, stats_source, cache_info: dict | None = None):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                                         registry=r)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              lab, buckets=_TTFT, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             lab, buckets=_ITL, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             lab, buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", lab,
                                    buckets=_LATENCY, registry=r)
        phases = {}
        for phase, doc in (("inference", "RUNNING"), ("prefill", "PREFILL"), ("decode", "DECODE")):
            phases[phase] = Histogram(f"vllm:request_{phase}_time_seconds",
                                      f"Histogram of time spent in {doc} phase for request.", lab,
                                      buckets=_LATENCY, registry=r)
        self.inference_time, self.prefill_time, self.decode_time = (phases[k] for k in ("inference", "prefill",
                                                                                        "decode"))
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per "
                                          "engine_step.", lab, buckets=_ITERATION, registry=r)
        self.params_n = Histogram("vllm:request_params_n", "Histogram of the n request parameter.", lab,
                                  buckets=_N, registry=r)
        self.preemptions = Histogram("vllm:request_num_preemptions", "Number of preemptions per request.", lab,
                                     buckets=_PREEMPTIONS, registry=r)
        sizes = _sizes(max_model_len)
        self.params_max_tokens = Histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens "
                                           "request parameter.", lab, buckets=sizes, registry=r)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", lab,
                                    buckets=sizes, registry=r)
        self.req_generation = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                        lab, buckets=sizes, registry=r)
        for reason in ("stop", "length", "abort"):  # present from the start, as vLLM does
            self.request_success.labels(model_name, reason)
        for series in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e,
                       self.queue_time, self.req_prompt, self.req_generation, self.inference_time,
                       self.prefill_time, self.decode_time, self.iteration_tokens, self.params_n,
                       self.preemptions, self.params_max_tokens):
            series.labels(model_name)
        r.register(_EngineCollector(stats_source, model_name, cache_info))

    def observe_step(self, tokens: int) -> None:
        """The AsyncEngine's on_step callback: tokens one engine step ran (prefill chunks + decodes)."""
        self.iteration_tokens.labels(self.model_name).observe(tokens)

    def observe(self, s: RequestStats) -> None:
        """Count each of a request's n choices as one request, as vLLM (which fans n out) does."""
        m = self.model_name
        per_choice = s.choice_generation_tokens or [s.generation_tokens]
        self.prompt_tokens.labels(m).inc(s.prompt_tokens * len(per_choice))
        self.generation_tokens.labels(m).inc(s.generation_tokens)
        for reason in s.finish_reasons:
            self.request_success.labels(m, reason).inc()
        self.params_n.labels(m).observe(s.n)
        if s.max_tokens:
            self.params_max_tokens.labels(m).observe(s.max_tokens)
        last = s.last_token if s.last_token is not None else s.finished
        for i, generated in enumerate(per_choice):
            self.preemptions.labels(m).observe(s.choice_preemptions[i] if i < len(s.choice_preemptions) else 0)
            if s.first_scheduled is not None:
                self.inference_time.labels(m).observe(max(0.0, last - s.first_scheduled))
                if s.first_token is not None:
                    self.prefill_time.labels(m).observe(max(0.0, s.first_token - s.first_scheduled))
            if s.first_token is not None:
                self.decode_time.labels(m).observe(max(0.0, last - s.first_token))
            self.req_prompt.labels(m).observe(s.prompt_tokens)
            self.req_generation.labels(m).observe(generated)
            self.e2e.labels(m).observe(max(0.0, s.finished - s.arrival))
            if s.first_token is not None:
                self.ttft.labels(m).observe(max(0.0, s.first_token - s.arrival))
            if s.first_scheduled is not None:
                self.queue_time.labels(m).observe(max(0.0, s.first_scheduled - s.arrival))
        for gap in s.inter_token_latencies:
            self.itl.labels(m).observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
