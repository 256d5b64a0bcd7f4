"""End-to-end: a real `kimi-hybrid serve` driven by the official openai and anthropic SDKs.

Tool-call and reasoning plumbing is driven by the test-only `forced_output` field
(the forward pass still runs; the sampled tokens are replaced by the given text's).
"""

import json
import signal
import socket
import threading
import time

import anthropic
import httpx
import openai
import pydantic
import pytest
import typing

from conftest import API_KEY, MODEL, Server

REASONING = "I should check the weather."
CONTENT = "Let me look."
ARGS = '{"city": "Paris", "note": "a<b: x\\ny"}'
TOOL_OUTPUT = (
    f"{REASONING}</think>{CONTENT}<|tool_calls_section_begin|><|tool_call_begin|>"
    f"functions.get_weather:0<|tool_call_argument_begin|>{ARGS}<|tool_call_end|>"
    "<|tool_calls_section_end|>"
)
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base, api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_plain_and_streamed_agree(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"thinking": False}})
    assert full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    text = ""
    usage = None
    finish = None
    for chunk in client.chat.completions.create(
        **kw,
        stream=True, stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"thinking": False}},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == (choice.message.content or "")
    assert finish == choice.finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_token_ids_match_the_golden_continuation(client, golden):
    out = client.completions.create(
        model=MODEL, prompt=golden["prompt_ids"], max_tokens=len(golden["greedy_ids"]),
        temperature=0, logprobs=2,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    lp = out.choices[0].logprobs
    ids = [int(t.split(":")[1]) for t in lp.tokens]
    assert ids == golden["greedy_ids"]
    assert all(v <= 0 for v in lp.token_logprobs)
    # Greedy picks the most likely token: its log-probability tops the alternatives.
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2
        assert abs(max(top.values()) - chosen) < 1e-4
    assert out.usage.prompt_tokens == len(golden["prompt_ids"])
    assert out.usage.completion_tokens == len(golden["greedy_ids"])


def test_completions_echo_with_prompt_logprobs(client, golden):
    out = client.completions.create(
        model=MODEL, prompt=golden["prompt_ids"], max_tokens=2, temperature=0, echo=True,
        logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    lp = out.choices[0].logprobs
    n = len(golden["prompt_ids"])
    assert [int(t.split(":")[1]) for t in lp.tokens[:n]] == golden["prompt_ids"]
    assert lp.token_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == n + 2


def test_streamed_completion_matches(client, golden):
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=golden["prompt_ids"], max_tokens=8, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        ) if c.choices
    )
    full = client.completions.create(
        model=MODEL, prompt=golden["prompt_ids"], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].text


def test_tool_call_and_reasoning_through_openai(client):
    out = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=200,
        extra_body={"forced_output": TOOL_OUTPUT},
    )
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert msg.reasoning_content == REASONING
    assert msg.content == CONTENT
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.id == "functions.get_weather:0"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == json.loads(ARGS)


def test_tool_call_and_reasoning_streamed_through_openai(client):
    reasoning, reasoning_new_name, content, calls, finish = "", "", "", {}, None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=200, stream=True,
        extra_body={"forced_output": TOOL_OUTPUT},
    ):
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            # vLLM's current field, which `vllm bench serve` and LiteLLM read.
            reasoning_new_name += getattr(d, "reasoning", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["args"] += tc.function.arguments
            finish = c.finish_reason or finish
    assert reasoning == REASONING and reasoning_new_name == REASONING
    assert content == CONTENT
    assert finish == "tool_calls"
    assert calls[0]["id"] == "functions.get_weather:0"
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == json.loads(ARGS)


def test_named_tool_choice_writes_the_call_opening(client):
    out = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=50,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"forced_output": '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|>'},
    )
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


def test_stop_strings_are_cut(client):
    out = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=50, stop=["STOP"],
        extra_body={"forced_output": "hello world STOP more", "chat_template_kwargs": {"thinking": False}},
    )
    assert out.choices[0].message.content == "hello world "
    assert out.choices[0].finish_reason == "stop"
    text = ""
    for chunk in client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=50, stop=["STOP"], stream=True,
        extra_body={"forced_output": "hello world STOP more", "chat_template_kwargs": {"thinking": False}},
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
    assert text == "hello world "


def test_seeds_repeat_and_differ(client, golden):
    def draw(seed):
        out = client.completions.create(
            model=MODEL, prompt=golden["prompt_ids"], max_tokens=16, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}, logprobs=0,
        )
        return out.choices[0].logprobs.tokens
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_n_choices(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, n=3, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2]
    # Usage counts the tokens of every choice.
    assert 3 <= out.usage.completion_tokens <= 12


def test_anthropic_plain_and_tool_use(claude):
    msg = claude.messages.create(model=MODEL, max_tokens=8, messages=USER, system="Be brief.")
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.output_tokens >= 1
    msg = claude.messages.create(
        model=MODEL, max_tokens=200, messages=USER, thinking={"type": "adaptive"},
        tools=[{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        extra_body={"forced_output": TOOL_OUTPUT},
    )
    kinds = [b.type for b in msg.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert msg.content[0].thinking == REASONING
    assert msg.content[1].text == CONTENT
    assert msg.content[2].name == "get_weather"
    assert msg.content[2].input == json.loads(ARGS)
    assert msg.stop_reason == "tool_use"


def test_anthropic_stream_event_sequence(claude):
    events = []
    with claude.messages.stream(
        model=MODEL, max_tokens=200, messages=USER, thinking={"type": "adaptive"},
        tools=[{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        extra_body={"forced_output": TOOL_OUTPUT},
    ) as stream:
        for ev in stream:
            events.append(ev)
        final = stream.get_final_message()
    types = [e.type for e in events]
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert "message_delta" in types
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    deltas = {e.delta.type for e in events if e.type == "content_block_delta"}
    assert {"thinking_delta", "text_delta", "input_json_delta"} <= deltas
    assert final.content[2].input == json.loads(ARGS)
    assert final.content[0].thinking == REASONING
    assert final.stop_reason == "tool_use"


def test_anthropic_tool_result_round_trip_and_count_tokens(claude):
    messages = USER + [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "functions.get_weather:0", "content": "Sunny"}]},
    ]
    count = claude.messages.count_tokens(model=MODEL, messages=messages)
    assert count.input_tokens > 10
    msg = claude.messages.create(model=MODEL, max_tokens=1100, messages=messages,
                                 thinking={"type": "enabled", "budget_tokens": 1024},
                                 extra_body={"forced_output": "Sunny.</think>It is sunny."})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[1].text == "It is sunny."


def test_anthropic_without_thinking_answers_in_text(claude):
    # No `thinking` field means thinking off, as on Anthropic's API: the first block is
    # text, and the SDK's text helpers see it.
    msg = claude.messages.create(model=MODEL, max_tokens=16, messages=USER,
                                 extra_body={"forced_output": "Hello there."})
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello there."
    with claude.messages.stream(model=MODEL, max_tokens=16, messages=USER,
                                extra_body={"forced_output": "Hello there."}) as stream:
        assert "".join(stream.text_stream) == "Hello there."
        final = stream.get_final_message()
    # Streamed usage carries the cache fields.
    assert final.usage.cache_read_input_tokens is not None
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 5


def test_anthropic_images_and_documents_become_placeholders(server, claude):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Read the file."}, image,
                                     {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain notes"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {"file_path": "a.png"}}]},
        # Claude Code's Read of a PNG answers with an image inside the tool result.
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]},
    ]
    tools = [{"name": "Read", "description": "Read a file", "input_schema": {"type": "object"}}]
    msg = claude.messages.create(model=MODEL, max_tokens=4, messages=messages, tools=tools)
    assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The placeholder stands where the image was (counted as text), and the log says so.
    with_image = claude.messages.count_tokens(model=MODEL, messages=messages, tools=tools)
    messages[2]["content"][0]["content"] = []
    without = claude.messages.count_tokens(model=MODEL, messages=messages, tools=tools)
    assert with_image.input_tokens > without.input_tokens
    assert "image block replaced by a placeholder" in server.read_log()


def test_anthropic_stream_pings_while_it_waits(server):
    with httpx.stream("POST", server.base + "/v1/messages",
                      headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                      json={"model": MODEL, "max_tokens": 2, "stream": True, "messages": USER},
                      timeout=30) as r:
        names = [line[len("event: "):] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"], names
    assert names[-1] == "message_stop"


# --- Responses API (what Codex speaks) ------------------------------------------------

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_responses_plain_and_streamed(client):
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=32,
                                reasoning={"effort": "none"},
                                extra_body={"forced_output": "Hello there."})
    assert r.status == "completed"
    assert r.output_text == "Hello there."
    assert r.usage.output_tokens >= 2 and r.usage.input_tokens > 5
    # Streamed: the SDK's helper assembles the same response from the events.
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=32,
                                 extra_body={"forced_output": "Let me see.</think>Hello there."}) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    assert final.output_text == "Hello there."
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens_details.reasoning_tokens >= 3
    # Running out of tokens is an incomplete response.
    r = client.responses.create(model=MODEL, input="Count.", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_responses_function_call_round_trip(client):
    call = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL],
                                instructions="Use tools.", reasoning={"effort": "none"},
                                extra_body={"forced_output": call})
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    # Its output fed back as an item, with the earlier items: the conversation goes on.
    follow = client.responses.create(
        model=MODEL, tools=[WEATHER_TOOL], reasoning={"effort": "none"},
        input=[{"role": "user", "content": "Weather in Paris?"}, calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
        extra_body={"forced_output": "It is sunny."})
    assert follow.output_text == "It is sunny."
    # Or through previous_response_id, the server holding the conversation.
    chained = client.responses.create(
        model=MODEL, tools=[WEATHER_TOOL], previous_response_id=r.id, reasoning={"effort": "none"},
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
        extra_body={"forced_output": "It is sunny."})
    assert chained.output_text == "It is sunny."
    # The stored turn renders exactly as the one the client sent back.
    assert chained.usage.input_tokens == follow.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope")
    # A streamed call comes as function_call_arguments deltas.
    with client.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER_TOOL],
                                 extra_body={"forced_output": call}) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert [o.type for o in final.output][-1] == "function_call"


def test_models_retrieve_and_json_404(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = httpx.get(server.base + "/v1/nothing-here", headers={"authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "nothing-here" in r.json()["error"]["message"]


# --- structured output with random weights ---------------------------------------------

class Forecast(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: typing.Literal["Paris", "Oslo", "Lima"]
    days: typing.Annotated[int, pydantic.Field(ge=1, le=9)]
    metric: bool


FORECAST_TOOL = {"type": "function", "function": {
    "name": "forecast", "strict": True, "parameters": Forecast.model_json_schema()}}


def test_chat_completions_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        out = client.chat.completions.parse(
            model=MODEL, messages=USER, response_format=Forecast, max_tokens=200, seed=seed,
            temperature=1.0, extra_body={"chat_template_kwargs": {"thinking": False}})
        assert isinstance(out.choices[0].message.parsed, Forecast), out


def test_required_tool_choice_returns_schema_valid_arguments(client, claude):
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL, messages=USER, tools=[FORECAST_TOOL], tool_choice="required",
            max_tokens=120, seed=seed, temperature=1.0)
        calls = out.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "forecast"
        Forecast.model_validate_json(calls[0].function.arguments)
        assert "<|tool_call" not in (out.choices[0].message.content or "")
    msg = claude.messages.create(
        model=MODEL, max_tokens=120, messages=USER, tool_choice={"type": "any"},
        tools=[{"name": "forecast", "input_schema": Forecast.model_json_schema()}])
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) >= 1 and msg.stop_reason == "tool_use"
    Forecast.model_validate(uses[0].input)


def test_responses_text_format_json_schema(client):
    r = client.responses.parse(model=MODEL, input="Forecast?", text_format=Forecast,
                               max_output_tokens=200, reasoning={"effort": "none"})
    assert isinstance(r.output_parsed, Forecast)


def test_request_log_is_one_json_line_per_request():
    s = Server("--log-format", "json", "--cors-allow-origin", "*")
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=9)
        r = httpx.options(s.base + "/v1/chat/completions",
                          headers={"origin": "http://x.test", "access-control-request-method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "*"
        time.sleep(0.2)
        lines = [json.loads(l) for l in s.read_log().splitlines() if l.startswith("{")]
    finally:
        s.stop()
    done = [l for l in lines if l.get("route") == "/v1/chat/completions" and l.get("status") == 200]
    assert len(done) == 1, lines
    line = done[0]
    assert line["model"] == MODEL and line["completion_tokens"] == 3 and line["prompt_tokens"] > 3
    assert line["finish"] == "length" and line["ttft_ms"] > 0 and line["duration_ms"] >= line["ttft_ms"]
    refused = [l for l in lines if l.get("status") == 400]
    assert len(refused) == 1 and "temperature" in refused[0]["error"], lines


# --- errors ---------------------------------------------------------------------------

def test_bad_json_and_bad_parameters(server, client):
    r = httpx.post(server.base + "/v1/chat/completions", content=b"{not json",
                   headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"


def test_prompt_longer_than_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 600, max_tokens=1)
    assert "maximum context length is 512" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=100)


def test_wrong_api_key_and_unknown_model(server):
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad_claude = anthropic.Anthropic(base_url=server.base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_claude.messages.create(model=MODEL, max_tokens=4, messages=USER)
    good = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="no-such-model", messages=USER)
    good_claude = anthropic.Anthropic(base_url=server.base, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as e:
        good_claude.messages.create(model="no-such-model", max_tokens=4, messages=USER)
    assert e.value.body["type"] == "error"


def test_body_too_large(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)})
    r = httpx.post(server.base + "/v1/completions", content=body,
                   headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == 413


# --- load and cancellation ------------------------------------------------------------

def test_32_streaming_clients_a_quarter_disconnect(server):
    results = {}

    def worker(i):
        c = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        stream = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i}"}], max_tokens=48,
            stream=True, extra_body={"ignore_eos": True},
        )
        n, finish = 0, None
        for chunk in stream:
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
            n += 1
            if i % 4 == 0 and n == 5:
                stream.close()
                results[i] = "closed"
                return
        results[i] = finish

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 32
    for i, r in results.items():
        assert r == ("closed" if i % 4 == 0 else "length"), (i, r)
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m["kimi_hybrid_num_requests_running"] == 0 and m["kimi_hybrid_kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m["kimi_hybrid_num_requests_running"] == 0
    assert m["kimi_hybrid_num_requests_waiting"] == 0
    assert m["kimi_hybrid_kv_blocks_used"] == 0
    assert m['kimi_hybrid_requests_total{outcome="aborted"}'] >= 8
    assert m["kimi_hybrid_time_to_first_token_seconds_count"] >= 32


def test_queue_full_then_graceful_shutdown():
    s = Server("--max-num-seqs", "1", "--max-waiting", "0", "--max-model-len", "4096")
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=600, stream=True,
                                      extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
        assert e.value.status_code == 503
        finish = None
        for chunk in stream:
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
        assert finish == "length"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


# --- long prompts ---------------------------------------------------------------------

LONG_PROMPT = [3 + i * 7 % 1000 for i in range(8192)]


@pytest.fixture(scope="module")
def long_server():
    # 256 tokens per step: an 8,192-token prompt alone takes 32 steps.
    s = Server("--max-model-len", "9000", "--max-batch-tokens", "256", "--no-prefix-caching")
    yield s
    s.stop()


def test_anthropic_reasoning_budget_closes_thinking(long_server):
    claude = anthropic.Anthropic(base_url=long_server.base, api_key="unused", max_retries=0)
    # Output that would think on (the test hook stands in for the model) is cut at the
    # budget: the reasoning block closes and the rest is the answer.
    msg = claude.messages.create(model=MODEL, max_tokens=1200, messages=USER,
                                 thinking={"type": "enabled", "budget_tokens": 1024},
                                 extra_body={"forced_output": " a" * 1100})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == " a" * 1024
    assert msg.content[1].text == " a" * 75


def wait_for_steps(server, at_least, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = server.metrics()["kimi_hybrid_engine_steps_total"]
        if steps >= at_least:
            return steps
        time.sleep(0.02)
    raise AssertionError("the engine made no progress")


def test_a_short_request_overtakes_a_long_prefill(long_server):
    c = openai.OpenAI(base_url=long_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    base = long_server.metrics()["kimi_hybrid_engine_steps_total"]
    done = {}

    def long_request():
        t = time.time()
        c.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=1)
        done["long"] = time.time() - t

    worker = threading.Thread(target=long_request)
    worker.start()
    wait_for_steps(long_server, base + 3)
    t = time.time()
    short = c.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=1)
    short_secs = time.time() - t
    long_running = "long" not in done
    worker.join(timeout=120)
    print(f"short request {short_secs:.2f} s during a long prefill of {done.get('long', 0):.2f} s")
    assert short.choices[0].finish_reason == "length"
    assert long_running, "the long prompt finished before the short request"
    assert "long" in done


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_mid_prefill_stops_its_prefill(long_server, stream):
    base = long_server.metrics()["kimi_hybrid_engine_steps_total"]
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1, "stream": stream}
    if stream:
        # The headers come at once; the client hangs up while the prompt is prefilled.
        with httpx.stream("POST", long_server.base + "/v1/completions", json=body, timeout=120):
            wait_for_steps(long_server, base + 3)
    else:
        # A client that gives up (its read timeout) while the prompt is prefilled.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(long_server.base + "/v1/completions", json=body,
                       timeout=httpx.Timeout(120, read=0.3))
    gone_at = long_server.metrics()["kimi_hybrid_engine_steps_total"]
    t = time.time()
    while time.time() < t + 5:
        m = long_server.metrics()
        if m["kimi_hybrid_num_requests_running"] == 0 and m["kimi_hybrid_num_requests_waiting"] == 0:
            break
        time.sleep(0.02)
    print(f"stream={stream}: running 0 after {time.time() - t:.2f} s, "
          f"{m['kimi_hybrid_engine_steps_total'] - gone_at:.0f} steps after the client went")
    assert m["kimi_hybrid_num_requests_running"] == 0
    assert m["kimi_hybrid_kv_blocks_used"] == 0
    # The prompt needs 32 steps; it must have stopped well before.
    assert m["kimi_hybrid_engine_steps_total"] - base < 28


# --- slow and silent clients ---------------------------------------------------------

def _unread_stream(server, max_tokens):
    """A streaming request whose client then reads nothing (a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_clients_that_stop_reading_are_paused_then_dropped():
    s = Server("--max-model-len", "9000", "--stream-stall-timeout", "4")
    try:
        silent = [_unread_stream(s, 8000) for _ in range(4)]
        # Their generation stops once their backlog is unread: the engine's step count
        # stands still while all four still hold their places.
        deadline = time.time() + 30
        while time.time() < deadline:
            before = s.metrics()["kimi_hybrid_engine_steps_total"]
            time.sleep(0.5)
            m = s.metrics()
            if m["kimi_hybrid_engine_steps_total"] == before and m["kimi_hybrid_num_requests_running"] == 4:
                break
        else:
            raise AssertionError(f"generation did not pause: {s.metrics()}")
        # Everyone else is served at once.
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)
        started = time.time()
        out = client.completions.create(model=MODEL, prompt="hi", max_tokens=8)
        assert out.usage.completion_tokens == 8 and time.time() - started < 5
        # After the stall timeout the silent streams are dropped and their blocks freed.
        deadline = time.time() + 15
        while time.time() < deadline and s.metrics()["kimi_hybrid_num_requests_running"] > 0:
            time.sleep(0.25)
        m = s.metrics()
        assert m["kimi_hybrid_num_requests_running"] == 0 and m["kimi_hybrid_kv_blocks_used"] == 0, m
        assert "left its stream unread" in s.read_log()
        for sock in silent:
            sock.close()
    finally:
        s.stop()


def test_half_sent_requests_are_cut_off_and_health_always_answers():
    s = Server("--request-read-timeout", "1", "--max-connections", "4")
    try:
        # Partial headers on more connections than the server serves at once.
        hanging = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            hanging.append(sock)
        # Beyond the limit, /health still answers (and nothing else does).
        assert httpx.get(s.base + "/health", timeout=5).status_code == 200
        r = httpx.post(s.base + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                       timeout=5)
        assert r.status_code in (200, 503)
        if r.status_code == 503:
            assert "max-connections" in r.json()["error"]["message"]
        # The half-sent requests are closed by the server after the read timeout.
        time.sleep(2.5)
        for sock in hanging:
            sock.settimeout(2)
            try:
                assert sock.recv(4096) is not None  # an error response or EOF
            except (ConnectionResetError, socket.timeout) as e:
                raise AssertionError(f"connection still open: {e!r}")
            sock.close()
        # With the slots free again, requests are served.
        r = httpx.post(s.base + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                       timeout=10)
        assert r.status_code == 200, r.text
        # A body sent too slowly is cut off too.
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\"")
        sock.settimeout(5)
        reply = sock.recv(4096)
        assert reply == b"" or b" 400 " in reply.split(b"\r\n")[0] or b" 408 " in reply.split(b"\r\n")[0], reply
        sock.close()
    finally:
        s.stop()
