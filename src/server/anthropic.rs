//! Anthropic-compatible `/v1/messages` and `/v1/messages/count_tokens`: the request is
//! turned into the same chat messages the OpenAI route renders (system text, tool
//! results as tool turns, assistant thinking / text / tool_use blocks), and the output
//! comes back as Anthropic content blocks or its streaming event sequence.

use super::error::{ApiError, Dialect};
use super::openai::{mode_defaults, pending, request_id, Common};
use super::params::{self, field, opt_bool, opt_f32, opt_i64, opt_u64, Body};
use super::prompt::{self, ChatPrompt, ToolChoice};
use super::{request_body, submit, Shared, Tracker};
use crate::engine::sampling::SamplingConfig;
use crate::engine::{Event, FinishReason, StopReason};
use crate::tokenizer::parser::{OutputParser, ParseEvent};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

fn fail(state: &Shared, e: ApiError) -> Response {
    state.metrics.error();
    e.in_dialect(Dialect::Anthropic).into_response()
}

/// Text of a `system` field or a content list's text blocks.
fn text_of(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            for b in blocks {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push(
                        b.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ),
                    other => {
                        return Err(ApiError::param(
                            at,
                            format!("{at} holds a {other:?} block where text is expected"),
                        ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
        _ => Err(ApiError::param(
            at,
            format!("{at} must be a string or a list of text blocks"),
        )),
    }
}

/// Anthropic messages as OpenAI-style chat messages for the template.
fn to_chat_messages(body: &Body) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = field(body, "system") {
        out.push(json!({ "role": "system", "content": text_of(system, "system")? }));
    }
    let messages = field(body, "messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::param("messages", "messages must be a list"))?;
    if messages.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        let blocks: Vec<Value> = match content {
            Value::String(s) => vec![json!({ "type": "text", "text": s })],
            Value::Array(b) => b.clone(),
            _ => {
                return Err(ApiError::param(
                    "messages",
                    format!("{at}.content must be a string or a list of blocks"),
                ))
            }
        };
        match role {
            "user" => {
                let mut texts = Vec::new();
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => texts.push(
                            b.get("text")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        ),
                        Some("tool_result") => {
                            let id =
                                b.get("tool_use_id")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| {
                                        ApiError::param(
                                            "messages",
                                            format!("{at}.content[{j}] needs tool_use_id"),
                                        )
                                    })?;
                            let result = match b.get("content") {
                                None | Some(Value::Null) => String::new(),
                                Some(c) => text_of(c, "messages")?,
                            };
                            out.push(
                                json!({ "role": "tool", "tool_call_id": id, "content": result }),
                            );
                        }
                        Some("image") | Some("document") => {
                            return Err(ApiError::param(
                                "messages",
                                "image and document blocks are not supported (text-only model)",
                            ))
                        }
                        other => {
                            return Err(ApiError::param(
                                "messages",
                                format!("{at}.content[{j}] has unsupported type {other:?}"),
                            ))
                        }
                    }
                }
                if !texts.is_empty() {
                    out.push(json!({ "role": "user", "content": texts.join("\n") }));
                }
            }
            "assistant" => {
                let mut text = String::new();
                let mut reasoning = String::new();
                let mut calls = Vec::new();
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("thinking") => reasoning
                            .push_str(b.get("thinking").and_then(Value::as_str).unwrap_or("")),
                        Some("redacted_thinking") => {}
                        Some("tool_use") => {
                            let name = b.get("name").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::param("messages", format!("{at}.content[{j}] needs name"))
                            })?;
                            let id = b.get("id").and_then(Value::as_str).unwrap_or("");
                            let input = b.get("input").cloned().unwrap_or(json!({}));
                            calls.push(json!({ "id": id, "type": "function", "function": { "name": name, "arguments": input.to_string() } }));
                        }
                        other => {
                            return Err(ApiError::param(
                                "messages",
                                format!("{at}.content[{j}] has unsupported type {other:?}"),
                            ))
                        }
                    }
                }
                let mut msg = json!({ "role": "assistant", "content": text });
                if !reasoning.is_empty() {
                    msg["reasoning_content"] = json!(reasoning);
                }
                if !calls.is_empty() {
                    msg["tool_calls"] = json!(calls);
                }
                out.push(msg);
            }
            other => {
                return Err(ApiError::param(
                    "messages",
                    format!("{at}.role must be user or assistant, not {other:?}"),
                ))
            }
        }
    }
    Ok(out)
}

/// Anthropic tools (`{name, description, input_schema}`) as OpenAI function tools.
fn to_openai_tools(body: &Body) -> Result<Option<Value>, ApiError> {
    let Some(tools) = field(body, "tools") else {
        return Ok(None);
    };
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::param("tools", "tools must be a list"))?;
    if list.is_empty() {
        return Ok(None);
    }
    let converted = list
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::param("tools", format!("tools[{i}].name is missing"))
            })?;
            Ok(json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": t.get("description").cloned().unwrap_or(json!("")),
                    "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
                },
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Some(Value::Array(converted)))
}

fn tool_choice(body: &Body, names: &[String]) -> Result<ToolChoice, ApiError> {
    let Some(tc) = field(body, "tool_choice") else {
        return Ok(ToolChoice::Auto);
    };
    let kind = tc.get("type").and_then(Value::as_str).unwrap_or("");
    let choice = match kind {
        "auto" => ToolChoice::Auto,
        "none" => ToolChoice::None,
        "any" => ToolChoice::Required,
        "tool" => ToolChoice::Named(
            tc.get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::param("tool_choice", "tool_choice of type tool needs a name")
                })?
                .to_string(),
        ),
        other => {
            return Err(ApiError::param(
                "tool_choice",
                format!("tool_choice type {other:?} is not auto, any, tool or none"),
            ))
        }
    };
    let as_openai = match &choice {
        ToolChoice::Auto => json!("auto"),
        ToolChoice::None => json!("none"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Named(n) => json!({ "type": "function", "function": { "name": n } }),
    };
    prompt::parse_tool_choice(Some(&as_openai), names)
}

/// The conversation rendered, from an Anthropic request.
fn build_prompt(state: &Shared, body: &Body) -> Result<ChatPrompt, ApiError> {
    let messages = prompt::normalise_messages(&Value::Array(to_chat_messages(body)?))?;
    let tools = to_openai_tools(body)?;
    let names = match &tools {
        Some(t) => prompt::check_tools(t)?,
        None => Vec::new(),
    };
    let choice = tool_choice(body, &names)?;
    let mut kwargs = Map::new();
    if let Some(thinking) = field(body, "thinking") {
        match thinking.get("type").and_then(Value::as_str) {
            Some("enabled") | Some("adaptive") => {
                kwargs.insert("thinking".into(), json!(true));
            }
            Some("disabled") => {
                kwargs.insert("thinking".into(), json!(false));
            }
            _ => {
                return Err(ApiError::param(
                    "thinking",
                    "thinking.type must be enabled or disabled",
                ))
            }
        }
    }
    prompt::render(state, &messages, tools.as_ref(), &choice, &kwargs)
}

pub async fn count_tokens(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        let body = request_body(&state, body)?;
        let p = build_prompt(&state, &body)?;
        Ok(Json(json!({ "input_tokens": p.ids.len() })).into_response())
    };
    run().unwrap_or_else(|e| fail(&state, e))
}

pub async fn messages(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match message(&state, body).await {
        Ok(r) => r,
        Err(e) => fail(&state, e),
    }
}

async fn message(
    state: &Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = request_body(state, body)?;
    let p = build_prompt(state, &body)?;
    let max_tokens = opt_u64(&body, "max_tokens")?
        .ok_or_else(|| ApiError::param("max_tokens", "max_tokens is required"))?;
    let limit = state.engine.config.max_model_len;
    if max_tokens == 0 {
        return Err(ApiError::param(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    if p.ids.len() >= limit {
        return Err(ApiError::param(
            "messages",
            format!(
                "prompt is too long: {} tokens > {} maximum",
                p.ids.len(),
                limit - 1
            ),
        ));
    }
    let defaults = mode_defaults(p.thinking);
    let mut sampling = SamplingConfig {
        temperature: opt_f32(&body, "temperature", 0.0, 2.0)?.unwrap_or(defaults.temperature),
        top_p: opt_f32(&body, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p),
        ..SamplingConfig::default()
    };
    if let Some(k) = opt_i64(&body, "top_k")? {
        if k < 0 {
            return Err(ApiError::param("top_k", "top_k must not be negative"));
        }
        sampling.top_k = k as usize;
    }
    sampling.seed = opt_i64(&body, "seed")?.map(|s| s as u64);
    let forced = match field(&body, "forced_output") {
        None => None,
        Some(Value::String(s)) if state.allow_forced_output => {
            Some(state.engine.tokenizer.encode(s, crate::tokenizer::Specials::Recognise))
        }
        Some(_) => {
            return Err(ApiError::param(
                "forced_output",
                "forced_output is a test option (a string); start the server with --allow-forced-output",
            ))
        }
    };
    let c = Common {
        sampling,
        // The context bounds the output even when max_tokens asks for more.
        max_tokens: (max_tokens as usize).min(limit - p.ids.len()),
        n: 1,
        stream: opt_bool(&body, "stream")?.unwrap_or(false),
        include_usage: true,
        stop: params::stop_strings(&body, "stop_sequences")?,
        stop_token_ids: Vec::new(),
        ignore_eos: false,
        skip_special_tokens: true,
        forced,
        tokens_as_ids: false,
    };
    let rx = submit(state, pending(&p.ids, &c, true, None))?;
    // Anthropic message ids read `msg_...`.
    let id = request_id("msg").replacen('-', "_", 1);
    if c.stream {
        let (tx, out) = unbounded_channel();
        tokio::spawn(stream_message(state.clone(), rx, tx, id, p));
        let stream = UnboundedReceiverStream::new(out).map(Ok::<_, Infallible>);
        Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        collect_message(state, rx, id, &p).await
    }
}

fn stop_reason(
    reason: FinishReason,
    stop: &Option<StopReason>,
    tool_use: bool,
) -> (&'static str, Value) {
    match (reason, stop) {
        (FinishReason::Length, _) => ("max_tokens", Value::Null),
        (_, Some(StopReason::Text(s))) => ("stop_sequence", json!(s)),
        _ if tool_use => ("tool_use", Value::Null),
        _ => ("end_turn", Value::Null),
    }
}

/// A tool call's arguments as the `input` object (invalid JSON is kept as a string
/// under `_raw` so nothing the model wrote is lost).
fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ if arguments.trim().is_empty() => json!({}),
        _ => json!({ "_raw": arguments }),
    }
}

async fn collect_message(
    state: &Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    id: String,
    p: &ChatPrompt,
) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(state.clone());
    let mut parser = OutputParser::new(p.thinking, p.parse_tools);
    let mut out = crate::tokenizer::parser::ParsedOutput::default();
    for e in parser.push(&p.prefill) {
        out.apply(e);
    }
    let mut end = None;
    while let Some((_, ev)) = rx.recv().await {
        tracker.on_event(&ev);
        match ev {
            Event::Token { text, .. } => {
                for e in parser.push(&text) {
                    out.apply(e);
                }
            }
            Event::Finished {
                tail,
                reason,
                stop,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                for e in parser.push(&tail).into_iter().chain(parser.finish()) {
                    out.apply(e);
                }
                end = Some((
                    reason,
                    stop,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                ));
                break;
            }
            Event::Error(message) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
            Event::PromptLogprobs(_) => {}
        }
    }
    tracker.done();
    let (reason, stop, prompt_tokens, completion_tokens, cached) = end.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine ended the request without a result",
        )
    })?;
    let mut content = Vec::new();
    if !out.reasoning.is_empty() {
        content.push(json!({ "type": "thinking", "thinking": out.reasoning, "signature": "" }));
    }
    if !out.content.is_empty() {
        content.push(json!({ "type": "text", "text": out.content }));
    }
    for call in &out.tool_calls {
        content.push(json!({ "type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(&call.arguments) }));
    }
    let (stop_reason, stop_sequence) = stop_reason(reason, &stop, !out.tool_calls.is_empty());
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": state.served_model_name,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {
            "input_tokens": prompt_tokens - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": completion_tokens,
        },
    }))
    .into_response())
}

/// Which content block is open in a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Thinking,
    Text,
    Tool,
}

struct BlockWriter {
    tx: UnboundedSender<SseEvent>,
    open: Open,
    index: i64,
    alive: bool,
}

impl BlockWriter {
    fn send(&mut self, kind: &str, data: Value) {
        let ev = SseEvent::default().event(kind).data(data.to_string());
        if self.tx.send(ev).is_err() {
            self.alive = false;
        }
    }

    fn close(&mut self) {
        if self.open == Open::Thinking {
            let index = self.index;
            self.send(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": index, "delta": { "type": "signature_delta", "signature": "" } }),
            );
        }
        if self.open != Open::None {
            let index = self.index;
            self.send(
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": index }),
            );
            self.open = Open::None;
        }
    }

    fn open(&mut self, kind: Open, block: Value) {
        self.close();
        self.index += 1;
        self.open = kind;
        let index = self.index;
        self.send(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block": block }),
        );
    }

    fn delta(&mut self, delta: Value) {
        let index = self.index;
        self.send(
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": index, "delta": delta }),
        );
    }

    fn apply(&mut self, e: ParseEvent) {
        match e {
            ParseEvent::Reasoning(s) => {
                if self.open != Open::Thinking {
                    self.open(
                        Open::Thinking,
                        json!({ "type": "thinking", "thinking": "", "signature": "" }),
                    );
                }
                self.delta(json!({ "type": "thinking_delta", "thinking": s }));
            }
            ParseEvent::Content(s) => {
                if self.open != Open::Text {
                    self.open(Open::Text, json!({ "type": "text", "text": "" }));
                }
                self.delta(json!({ "type": "text_delta", "text": s }));
            }
            ParseEvent::ToolCallStart { id, name, .. } => {
                self.open(
                    Open::Tool,
                    json!({ "type": "tool_use", "id": id, "name": name, "input": {} }),
                );
            }
            ParseEvent::ToolCallArgs { delta, .. } => {
                self.delta(json!({ "type": "input_json_delta", "partial_json": delta }));
            }
        }
    }
}

async fn stream_message(
    state: Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    tx: UnboundedSender<SseEvent>,
    id: String,
    p: ChatPrompt,
) {
    let mut tracker = Tracker::new(state.clone());
    let mut w = BlockWriter {
        tx,
        open: Open::None,
        index: -1,
        alive: true,
    };
    w.send(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": state.served_model_name,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": p.ids.len(), "output_tokens": 0 },
            },
        }),
    );
    let mut parser = OutputParser::new(p.thinking, p.parse_tools);
    let mut tool_use = false;
    let first = parser.push(&p.prefill);
    for e in first {
        tool_use |= matches!(e, ParseEvent::ToolCallStart { .. });
        w.apply(e);
    }
    while let Some((_, ev)) = super::next_for_stream(&mut rx, &w.tx).await {
        tracker.on_event(&ev);
        let (text, end) = match ev {
            Event::Token { text, .. } => (text, None),
            Event::Finished {
                tail,
                reason,
                stop,
                completion_tokens,
                ..
            } => (tail, Some((reason, stop, completion_tokens))),
            Event::Error(message) => {
                w.send("error", json!({ "type": "error", "error": { "type": "api_error", "message": message } }));
                return;
            }
            Event::PromptLogprobs(_) => continue,
        };
        let mut events = parser.push(&text);
        if end.is_some() {
            events.extend(parser.finish());
        }
        for e in events {
            tool_use |= matches!(e, ParseEvent::ToolCallStart { .. });
            w.apply(e);
        }
        if !w.alive {
            return;
        }
        if let Some((reason, stop, output_tokens)) = end {
            w.close();
            let (stop_reason, stop_sequence) = stop_reason(reason, &stop, tool_use);
            w.send(
                "message_delta",
                json!({
                    "type": "message_delta",
                    "delta": { "stop_reason": stop_reason, "stop_sequence": stop_sequence },
                    "usage": { "output_tokens": output_tokens },
                }),
            );
            w.send("message_stop", json!({ "type": "message_stop" }));
            tracker.done();
            return;
        }
    }
}
