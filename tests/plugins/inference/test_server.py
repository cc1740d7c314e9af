"""The OpenAI-compatible server over real HTTP on 127.0.0.1: outputs equal the engine's own,
concurrent requests all complete, bad requests get 4xx and never take the server down."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import import_or_skip

httpx = import_or_skip("httpx")
import_or_skip("fastapi")
import_or_skip("uvicorn")

from arbor_titan.data.chat_template import TURN_STOP, Message, encode_prompt  # noqa: E402
from plugins.inference.engine import Engine, create_engine  # noqa: E402
from plugins.inference.sampling import SamplingParams  # noqa: E402
from plugins.inference.server import BackgroundServer, ServerConfig, create_app  # noqa: E402
from plugins.inference.service import EngineLoop  # noqa: E402

KEY = "sk-test"
PROMPTS = ["def f(x):\n    return", "import", "class A:", "x = [", "for i in", "#", "if", "("]


@pytest.fixture(scope="module")
def server(loaded):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=4, max_len=64)
    loop = EngineLoop(engine).start()
    app = create_app(loop, ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=4096))
    with BackgroundServer(app) as background:
        yield background.url, loop
    loop.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(
        base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def engine_text(loaded, prompt, max_tokens, stop=()):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
    params = SamplingParams(max_new_tokens=max_tokens, stop=stop)
    return engine.generate([prompt], params)[0]


def sse_payloads(response):
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def complete(client, prompt, max_tokens, stream=False, **extra):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body.update(stream=stream, **extra)
    if not stream:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_payloads(response)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_completions_equal_the_engines_greedy_output(client, loaded):
    expected = engine_text(loaded, PROMPTS[0], 10)
    response = client.post(
        "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
    )
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"] == {
        "prompt_tokens": len(expected.prompt_ids),
        "completion_tokens": len(expected.output_ids),
        "total_tokens": len(expected.prompt_ids) + len(expected.output_ids),
    }
    assert complete(client, PROMPTS[0], 10, stream=True) == expected.text


def test_streamed_usage_comes_last_when_asked(client):
    body = {"prompt": "x", "max_tokens": 3, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        chunks = sse_payloads(response)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_completions_use_the_template_streaming_and_not(client, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = encode_prompt([Message(**m) for m in messages], loaded.tokenizer)
    expected = engine_text(loaded, rendered, 12, stop=(TURN_STOP,)).text
    body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body).json()
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": expected}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = sse_payloads(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_all_complete_with_their_own_outputs(client, loaded):
    expected = [engine_text(loaded, p, 6 + i).text for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [
            pool.submit(complete, client, p, 6 + i, stream=i % 2 == 0)
            for i, p in enumerate(PROMPTS)
        ]
        assert [f.result() for f in futures] == expected


TOO_LONG = "context_length_exceeded"
UNSUPPORTED = "unsupported_parameter"
WRONG_KEY = {"Authorization": "Bearer wrong"}


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "code"),
    [
        ({"content": b"{not json"}, 400, None, "invalid_json"),
        ({"json": [1, 2]}, 400, None, None),
        ({"json": {"max_tokens": 5}}, 400, "prompt", "missing_required_parameter"),
        ({"json": {"prompt": "x", "max_tokens": -1}}, 400, "max_tokens", None),
        ({"json": {"prompt": "x", "temperature": "hot"}}, 400, "temperature", None),
        ({"json": {"prompt": "x", "seed": 2**70}}, 400, "seed", None),
        ({"json": {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop", None),
        ({"json": {"prompt": "x" * 80, "max_tokens": 60}}, 400, "prompt", TOO_LONG),
        ({"json": {"prompt": [1, 9999]}}, 400, "prompt", None),
        ({"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model", "model_not_found"),
        ({"json": {"prompt": "x" * 5000}}, 413, None, "request_too_large"),
        ({"json": {"prompt": "x"}, "headers": WRONG_KEY}, 401, None, "invalid_api_key"),
        ({"json": {"prompt": "x", "tempreature": 0}}, 400, "tempreature", None),
        ({"json": {"prompt": "x", "max_tokens": "5"}}, 400, "max_tokens", None),
        ({"json": {"prompt": "x", "logit_bias": {"5": 10}}}, 400, "logit_bias", UNSUPPORTED),
        ({"json": {"prompt": "x", "n": 2}}, 400, "n", UNSUPPORTED),
        ({"json": {"prompt": "x", "echo": True}}, 400, "echo", UNSUPPORTED),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    client, kwargs, status, param, code
):
    response = client.post("/v1/completions", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert client.get("/health").status_code == 200
    assert complete(client, "x", 2)


def test_unsupported_fields_are_all_named_and_their_defaults_accepted(client):
    body = {"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": 1, "logprobs": 2}
    error = client.post("/v1/completions", json=body).json()["error"]
    assert error["message"].startswith(
        "not supported by this server: presence_penalty, frequency_penalty, logprobs"
    )
    no_ops = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    assert complete(client, "x", 2, **no_ops, logprobs=None, best_of=1)
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True}
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_a_vanishing_temperature_samples_greedily(client):
    greedy = complete(client, PROMPTS[0], 6)
    assert complete(client, PROMPTS[0], 6, temperature=1e-40) == greedy


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
    ],
)
def test_bad_chat_messages_name_the_field(client, messages, param):
    response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_auth_is_required_on_v1_only(server):
    url, _ = server
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    missing = httpx.post(f"{url}/v1/nothing", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_a_client_leaving_mid_stream_frees_its_slot(client, server):
    body = {"prompt": "x", "max_tokens": 60, "temperature": 0, "stream": True, "seed": 1}
    with client.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())
    loop = server[1]
    deadline = time.monotonic() + 10
    while loop.engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop.engine.running == 0


def test_metrics_parse_and_count_what_happened(client):
    parser = import_or_skip("prometheus_client.parser")
    complete(client, PROMPTS[1], 4)
    text = client.get("/metrics").text
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    ok = (("endpoint", "/v1/completions"), ("status", "200"))
    assert samples[("arbor_requests_total", ok)] >= 1
    assert samples[("arbor_generated_tokens_total", ())] >= 4
    assert samples[("arbor_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("arbor_inter_token_latency_seconds_count", ())] >= 3
    assert families["arbor_time_to_first_token_seconds"].type == "histogram"
    assert ("arbor_queue_length", ()) in samples and ("arbor_running_batch_size", ()) in samples


class FailingForward:
    slots, max_len, vocab_size = 2, 32, 384

    def assign(self, slot, prompt, positions):
        return 0

    def can_hold(self, positions):
        return True

    def release(self, slot):
        pass

    def prefill(self, tokens_s, slot, start):
        return torch.zeros(self.vocab_size)

    def decode(self, slots_b, tokens_b, positions_b, keys_len):
        raise RuntimeError("device lost")


def test_a_dead_engine_loop_fails_requests_and_health(tokenizer):
    loop = EngineLoop(Engine(FailingForward(), tokenizer, torch.device("cpu"))).start()
    with BackgroundServer(create_app(loop, ServerConfig())) as background:
        url = background.url
        failed = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert failed.status_code == 500 and "device lost" in failed.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert refused.status_code == 503


class SlowForward(FailingForward):
    """A forward whose decode steps take 20 ms: a long generation outlasts its client."""

    max_len = 2048

    def decode(self, slots_b, tokens_b, positions_b, keys_len):
        time.sleep(0.02)
        return torch.zeros(len(slots_b), self.vocab_size)


def test_a_non_streaming_client_that_leaves_frees_its_slot(tokenizer):
    engine = Engine(SlowForward(), tokenizer, torch.device("cpu"))
    loop = EngineLoop(engine).start()
    body = {"prompt": "x", "max_tokens": 2000, "temperature": 0}  # 40 s if nobody cancels
    with BackgroundServer(create_app(loop, ServerConfig())) as background:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{background.url}/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and not engine.has_work()
    loop.stop()
