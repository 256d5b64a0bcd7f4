//! OpenAI's Responses API, `POST /v1/responses` (what Codex speaks): `input` as a
//! string or items (messages, function calls and their outputs, reasoning),
//! `instructions`, function tools, `tool_choice`, `parallel_tool_calls`,
//! `max_output_tokens`, `reasoning`, and `previous_response_id` over conversations kept
//! in memory (bounded, least recently used first out). The output is rendered and
//! parsed exactly as chat completions are; streams follow the Responses event sequence.

use super::error::ApiError;
use super::flow::{self, FlowSender};
use super::openai::{mode_defaults, pending, request_id, Common, Usage};
use super::params::SamplingDefaults;
use super::prompt::{self, ChatPrompt, ToolChoice};
use super::structured;
use super::{body_bytes, check_model, now_secs, submit, Shared, Tracker};
use crate::engine::sampling::SamplingConfig;
use crate::engine::{Event, FinishReason};
use crate::tokenizer::parser::{OutputParser, ParseEvent, ParsedOutput};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::mpsc::UnboundedReceiver;

/// Conversations kept for `previous_response_id`.
const STORED_RESPONSES: usize = 1024;
/// Their total size bound (JSON bytes of the stored messages).
const STORED_BYTES: usize = 256 << 20;

/// Finished conversations by response id, least recently used first out.
#[derive(Default)]
pub struct ResponseStore {
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    by_id: HashMap<String, (Vec<Value>, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl ResponseStore {
    /// The chat messages of a stored conversation (its input and its output).
    fn get(&self, id: &str) -> Option<Vec<Value>> {
        let mut inner = self.inner.lock().ok()?;
        let messages = inner.by_id.get(id)?.0.clone();
        if let Some(pos) = inner.order.iter().position(|k| k == id) {
            inner.order.remove(pos);
        }
        inner.order.push_back(id.to_string());
        Some(messages)
    }

    fn put(&self, id: String, messages: Vec<Value>) {
        let size = serde_json::to_vec(&messages).map_or(0, |v| v.len());
        if size > STORED_BYTES {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.bytes += size;
        inner.by_id.insert(id.clone(), (messages, size));
        inner.order.push_back(id);
        while inner.order.len() > STORED_RESPONSES || inner.bytes > STORED_BYTES {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some((_, s)) = inner.by_id.remove(&old) {
                inner.bytes -= s;
            }
        }
    }
}

#[derive(Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    input: Input,
    instructions: Option<String>,
    tools: Option<Vec<ToolDefinition>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    max_output_tokens: Option<u64>,
    reasoning: Option<Reasoning>,
    #[serde(default)]
    stream: bool,
    store: Option<bool>,
    previous_response_id: Option<String>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    text: Option<Value>,
    metadata: Option<Value>,
    /// Test hook (`--allow-forced-output`).
    forced_output: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Deserialize)]
struct ToolDefinition {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    description: Option<String>,
    parameters: Option<Value>,
    /// A namespace's own tools (Codex groups its sub-agent tools so).
    tools: Option<Vec<ToolDefinition>>,
    #[serde(default)]
    strict: bool,
}

#[derive(Deserialize)]
struct Reasoning {
    effort: Option<String>,
}

/// One input item; a bare `{role, content}` is a message.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Item {
    Message {
        role: String,
        content: Value,
    },
    FunctionCall {
        call_id: String,
        name: String,
        #[serde(default)]
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: Value,
    },
    Reasoning {
        #[serde(default)]
        summary: Vec<Value>,
        #[serde(default)]
        content: Option<Vec<Value>>,
    },
}

fn parse_request(bytes: &[u8]) -> Result<ResponsesRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the request body is not valid JSON: {inner}"))
        } else {
            let param = path.split(['.', '[']).next().unwrap_or("").to_string();
            ApiError::param(&param, format!("{path}: {inner}"))
        }
    })
}

fn item(v: &Value, at: &str) -> Result<Item, ApiError> {
    // A message may leave out its type.
    let owned;
    let v = if v.get("type").is_none() && v.get("role").is_some() {
        let mut m = v.clone();
        m["type"] = json!("message");
        owned = m;
        &owned
    } else {
        v
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." {
            at.to_string()
        } else {
            format!("{at}.{inner}")
        };
        ApiError::param("input", format!("{path}: {}", e.into_inner()))
    })
}

/// A message's content parts as text; images and files as placeholders.
fn content_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some(
                        "input_text" | "output_text" | "text" | "summary_text" | "reasoning_text",
                    ) => out.push(
                        part.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ),
                    Some("refusal") => out.push(
                        part.get("refusal")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ),
                    Some("input_image") => {
                        tracing::warn!(part = %format!("{at}[{j}]"), "image replaced by a placeholder (text-only model)");
                        out.push("[image omitted: this model reads text only]".to_string())
                    }
                    Some("input_file") => {
                        tracing::warn!(part = %format!("{at}[{j}]"), "file replaced by a placeholder");
                        out.push("[file omitted: only text can be read]".to_string())
                    }
                    other => {
                        return Err(ApiError::param(
                            "input",
                            format!(
                                "{at}[{j}].type {other:?} is not a content part this server reads"
                            ),
                        ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
        _ => Err(ApiError::param(
            "input",
            format!("{at} must be a string or a list of content parts"),
        )),
    }
}

/// Input items as chat messages: function calls join the assistant turn before them,
/// reasoning goes with the next assistant turn.
fn to_chat_messages(input: &Input) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Input::Text(s) => return Ok(vec![json!({ "role": "user", "content": s })]),
        Input::Items(items) => items,
    };
    let mut out: Vec<Value> = Vec::new();
    let mut reasoning = String::new();
    for (i, v) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        match item(v, &at)? {
            Item::Message { role, content } => {
                let text = content_text(&content, &format!("{at}.content"))?;
                let mut msg = json!({ "role": role, "content": text });
                if role == "assistant" && !reasoning.is_empty() {
                    msg["reasoning_content"] = json!(std::mem::take(&mut reasoning));
                }
                out.push(msg);
            }
            Item::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                let call = json!({ "id": call_id, "type": "function", "function": { "name": name, "arguments": arguments } });
                let joins_last = out.last().is_some_and(|m| m["role"] == "assistant");
                if !joins_last {
                    let mut msg = json!({ "role": "assistant", "content": "" });
                    if !reasoning.is_empty() {
                        msg["reasoning_content"] = json!(std::mem::take(&mut reasoning));
                    }
                    out.push(msg);
                }
                if let Some(last) = out.last_mut() {
                    match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => last["tool_calls"] = json!([call]),
                    }
                }
            }
            Item::FunctionCallOutput { call_id, output } => {
                let text = content_text(&output, &format!("{at}.output"))?;
                out.push(json!({ "role": "tool", "tool_call_id": call_id, "content": text }));
            }
            Item::Reasoning { summary, content } => {
                let parts = content.unwrap_or(summary);
                reasoning.push_str(&content_text(&Value::Array(parts), &at)?);
            }
        }
    }
    Ok(out)
}

/// Function tools as chat tools; a namespace's functions are offered by their names.
/// Tools the server cannot run itself (web search, hosted shells) are left out, with a
/// note in the log: Codex offers web search on every request.
fn to_chat_tools(tools: &[ToolDefinition], out: &mut Vec<Value>) {
    for t in tools {
        match (t.kind.as_str(), &t.name, &t.tools) {
            ("function", Some(name), _) => out.push(json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": t.description.clone().unwrap_or_default(),
                    "parameters": t.parameters.clone().unwrap_or(json!({"type": "object"})),
                    "strict": t.strict,
                },
            })),
            ("namespace", _, Some(inner)) => to_chat_tools(inner, out),
            (kind, name, _) => {
                tracing::debug!(
                    kind,
                    name = name.as_deref().unwrap_or(""),
                    "tool left out: not a function tool"
                )
            }
        }
    }
}

/// Responses' `tool_choice` (`{"type": "function", "name": ...}`) in chat's form.
fn tool_choice(v: Option<&Value>, names: &[String]) -> Result<ToolChoice, ApiError> {
    let as_chat = match v {
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::param("tool_choice", "tool_choice of type function needs a name")
            })?;
            Some(json!({ "type": "function", "function": { "name": name } }))
        }
        other => other.cloned(),
    };
    prompt::parse_tool_choice(as_chat.as_ref(), names)
}

/// What a finished or streamed response says about itself.
struct Meta {
    id: String,
    created_at: u64,
    model: String,
    echo: Map<String, Value>,
}

impl Meta {
    fn response(&self, status: &str, output: Vec<Value>, usage: Option<&Usage>) -> Value {
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "error": null,
            "incomplete_details": if status == "incomplete" { json!({ "reason": "max_output_tokens" }) } else { Value::Null },
            "usage": usage.map(|u| json!({
                "input_tokens": u.prompt,
                "input_tokens_details": { "cached_tokens": u.cached },
                "output_tokens": u.completion,
                "output_tokens_details": { "reasoning_tokens": u.reasoning },
                "total_tokens": u.prompt + u.completion,
            })),
        });
        for (k, v) in &self.echo {
            r[k] = v.clone();
        }
        r
    }
}

fn output_items(id: &str, out: &ParsedOutput) -> Vec<Value> {
    let mut items = Vec::new();
    if !out.reasoning.is_empty() {
        items.push(json!({
            "type": "reasoning", "id": format!("rs_{id}"), "summary": [],
            "content": [{ "type": "reasoning_text", "text": out.reasoning }],
        }));
    }
    if !out.content.is_empty() {
        items.push(json!({
            "type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
            "content": [{ "type": "output_text", "text": out.content, "annotations": [] }],
        }));
    }
    for (i, call) in out.tool_calls.iter().enumerate() {
        items.push(json!({
            "type": "function_call", "id": format!("fc_{id}_{i}"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": "completed",
        }));
    }
    items
}

/// The assistant turn a stored conversation continues from.
fn assistant_message(out: &ParsedOutput) -> Value {
    let mut msg = json!({ "role": "assistant", "content": out.content });
    if !out.reasoning.is_empty() {
        msg["reasoning_content"] = json!(out.reasoning);
    }
    if !out.tool_calls.is_empty() {
        msg["tool_calls"] = out
            .tool_calls
            .iter()
            .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
            .collect();
    }
    msg
}

pub async fn responses(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match respond(&state, body).await {
        Ok(r) => super::tracked(r),
        Err(e) => {
            state.metrics.error();
            e.into_response()
        }
    }
}

fn in_range(v: Option<f64>, name: &str, min: f64, max: f64) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(min..=max).contains(&x) => Err(ApiError::param(
            name,
            format!("{name} must be between {min} and {max}, got {x}"),
        )),
        v => Ok(v.map(|x| x as f32)),
    }
}

async fn respond(
    state: &Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_request(&body_bytes(body)?)?;
    check_model(state, req.model.as_deref())?;
    // The conversation so far: a stored one, then this request's input.
    let mut history = match &req.previous_response_id {
        None => Vec::new(),
        Some(id) => state.responses.get(id).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("Previous response with id '{id}' not found."),
            )
            .with_param("previous_response_id")
        })?,
    };
    history.extend(to_chat_messages(&req.input)?);
    let mut messages = Vec::new();
    if let Some(instructions) = &req.instructions {
        messages.push(json!({ "role": "system", "content": instructions }));
    }
    messages.extend(history.iter().cloned());
    let messages = prompt::normalise_messages(&Value::Array(messages))?;
    let mut tools = Vec::new();
    to_chat_tools(req.tools.as_deref().unwrap_or_default(), &mut tools);
    let tools = (!tools.is_empty()).then_some(Value::Array(tools));
    let names = match &tools {
        Some(t) => prompt::check_tools(t)?,
        None => Vec::new(),
    };
    let choice = tool_choice(req.tool_choice.as_ref(), &names)?;
    let thinking = !matches!(
        req.reasoning.as_ref().and_then(|r| r.effort.as_deref()),
        Some("none" | "minimal")
    );
    let mut kwargs = Map::new();
    kwargs.insert("thinking".into(), json!(thinking));
    let p =
        prompt::render_off_thread(state, messages, tools.clone(), choice.clone(), kwargs).await?;
    let limit = state.engine.config.max_model_len;
    if p.ids.len() >= limit {
        return Err(ApiError::param(
            "input",
            format!(
                "This model's maximum context length is {limit} tokens. However, your request has {} input tokens.",
                p.ids.len()
            ),
        ));
    }
    let max_tokens = match req.max_output_tokens {
        Some(0) => {
            return Err(ApiError::param(
                "max_output_tokens",
                "max_output_tokens must be at least 1",
            ))
        }
        Some(n) => (n as usize).min(limit - p.ids.len()),
        None => limit - p.ids.len(),
    };
    let defaults: SamplingDefaults = mode_defaults(p.thinking);
    let sampling = SamplingConfig {
        temperature: in_range(req.temperature, "temperature", 0.0, 2.0)?
            .unwrap_or(defaults.temperature),
        top_p: in_range(req.top_p, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p),
        ..SamplingConfig::default()
    };
    let forced = match &req.forced_output {
        None => None,
        Some(s) if state.allow_forced_output => Some(
            state
                .engine
                .tokenizer
                .encode(s, crate::tokenizer::Specials::Recognise),
        ),
        Some(_) => {
            return Err(ApiError::param(
                "forced_output",
                "forced_output is a test option; start the server with --allow-forced-output",
            ))
        }
    };
    let one_call = req.parallel_tool_calls == Some(false);
    let shape = match structured::tool_shape(tools.as_ref(), &choice, !one_call) {
        Some(shape) => Some(shape),
        None => structured::json_shape(
            req.text.as_ref().and_then(|t| t.get("format")),
            "text.format",
        )?,
    };
    let spec = prompt::OutputSpec {
        budget: None,
        one_call,
        shape,
    };
    let rules = prompt::output_rules(state, spec, &p)?;
    let flow = req
        .stream
        .then(|| flow::channel(state.stream_stall_timeout));
    let c = Common {
        sampling,
        max_tokens,
        n: 1,
        stream: req.stream,
        include_usage: true,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: false,
        skip_special_tokens: true,
        forced,
        tokens_as_ids: false,
        rules,
        backed_up: flow.as_ref().map(|(_, _, flag)| flag.clone()),
    };
    let rx = submit(state, pending(&p.ids, &c, true, None))?;
    let mut echo = Map::new();
    echo.insert("instructions".into(), json!(req.instructions));
    echo.insert("max_output_tokens".into(), json!(req.max_output_tokens));
    echo.insert("parallel_tool_calls".into(), json!(!one_call));
    echo.insert(
        "previous_response_id".into(),
        json!(req.previous_response_id),
    );
    echo.insert(
        "reasoning".into(),
        json!({ "effort": req.reasoning.as_ref().and_then(|r| r.effort.clone()), "summary": null }),
    );
    echo.insert("store".into(), json!(req.store.unwrap_or(true)));
    echo.insert("temperature".into(), json!(c.sampling.temperature));
    echo.insert("top_p".into(), json!(c.sampling.top_p));
    echo.insert(
        "text".into(),
        req.text
            .clone()
            .unwrap_or(json!({ "format": { "type": "text" } })),
    );
    echo.insert(
        "tool_choice".into(),
        req.tool_choice.clone().unwrap_or(json!("auto")),
    );
    echo.insert("tools".into(), json!([]));
    echo.insert("truncation".into(), json!("disabled"));
    echo.insert("metadata".into(), req.metadata.clone().unwrap_or(json!({})));
    let meta = Meta {
        id: request_id("resp").replacen('-', "_", 1),
        created_at: now_secs(),
        model: state.served_model_name.clone(),
        echo,
    };
    // Kept for `previous_response_id` once the output is known (`store: false` keeps
    // nothing, as OpenAI's API does).
    let keep = req.store.unwrap_or(true).then_some(history);
    if let Some((tx, body, _)) = flow {
        tokio::spawn(stream_response(state.clone(), rx, tx, meta, p, keep));
        Ok(Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        collect_response(state, rx, meta, &p, keep).await
    }
}

fn parser_for(p: &ChatPrompt) -> (OutputParser, Vec<ParseEvent>) {
    let mut parser = OutputParser::new(p.thinking, p.parse_tools);
    let first = parser.push(&p.prefill);
    (parser, first)
}

async fn collect_response(
    state: &Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    meta: Meta,
    p: &ChatPrompt,
    keep: Option<Vec<Value>>,
) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(state.clone(), "/v1/responses");
    let (mut parser, first) = parser_for(p);
    let mut out = ParsedOutput::default();
    for e in first {
        out.apply(e);
    }
    let mut usage = Usage::default();
    let mut reason = None;
    while let Some((_, ev)) = rx.recv().await {
        tracker.on_event(&ev);
        match ev {
            Event::Token { ref text, .. } => {
                usage.count_token(&parser);
                for e in parser.push(text) {
                    out.apply(e);
                }
            }
            Event::Finished {
                ref tail,
                reason: r,
                ..
            } => {
                for e in parser.push(tail).into_iter().chain(parser.finish()) {
                    out.apply(e);
                }
                usage.add(&ev);
                reason = Some(r);
                break;
            }
            Event::Error(message) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
            Event::PromptLogprobs(_) => {}
        }
    }
    tracker.done();
    let reason = reason.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine ended the request without a result",
        )
    })?;
    if let Some(mut history) = keep {
        history.push(assistant_message(&out));
        state.responses.put(meta.id.clone(), history);
    }
    let status = if reason != FinishReason::Stop {
        "incomplete"
    } else {
        "completed"
    };
    Ok(Json(meta.response(status, output_items(&meta.id, &out), Some(&usage))).into_response())
}

/// Writes the Responses event sequence, numbering events as OpenAI does.
struct EventWriter {
    tx: FlowSender,
    sequence: u64,
    alive: bool,
}

impl EventWriter {
    fn send(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        let ev = SseEvent::default().event(kind).data(data.to_string());
        if self.tx.send(ev).is_err() {
            self.alive = false;
        }
    }
}

/// The output item being streamed.
enum Open {
    None,
    Reasoning {
        index: usize,
        text: String,
    },
    Message {
        index: usize,
        text: String,
    },
    Call {
        index: usize,
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

struct Items {
    w: EventWriter,
    open: Open,
    done: Vec<Value>,
    response_id: String,
}

impl Items {
    fn item_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}_{}", self.response_id, self.done.len())
    }

    fn close(&mut self) {
        let open = std::mem::replace(&mut self.open, Open::None);
        let item = match open {
            Open::None => return,
            Open::Reasoning { index, text } => {
                let id = self.item_id("rs");
                self.w.send("response.reasoning_text.done", json!({ "item_id": id, "output_index": index, "content_index": 0, "text": text }));
                json!({ "type": "reasoning", "id": id, "summary": [], "content": [{ "type": "reasoning_text", "text": text }] })
            }
            Open::Message { index, text } => {
                let id = self.item_id("msg");
                let part = json!({ "type": "output_text", "text": text, "annotations": [] });
                self.w.send("response.output_text.done", json!({ "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": [] }));
                self.w.send("response.content_part.done", json!({ "item_id": id, "output_index": index, "content_index": 0, "part": part }));
                json!({ "type": "message", "id": id, "status": "completed", "role": "assistant", "content": [part] })
            }
            Open::Call {
                index,
                id,
                call_id,
                name,
                arguments,
            } => {
                self.w.send("response.function_call_arguments.done", json!({ "item_id": id, "output_index": index, "name": name, "arguments": arguments }));
                json!({ "type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": "completed" })
            }
        };
        let index = self.done.len();
        self.w.send(
            "response.output_item.done",
            json!({ "output_index": index, "item": item }),
        );
        self.done.push(item);
    }

    fn apply(&mut self, e: ParseEvent) {
        match e {
            ParseEvent::Reasoning(delta) => {
                if !matches!(self.open, Open::Reasoning { .. }) {
                    self.close();
                    let index = self.done.len();
                    let id = self.item_id("rs");
                    self.w.send("response.output_item.added", json!({ "output_index": index, "item": { "type": "reasoning", "id": id, "summary": [], "content": [] } }));
                    self.open = Open::Reasoning {
                        index,
                        text: String::new(),
                    };
                }
                let id = self.item_id("rs");
                let index = self.done.len();
                if let Open::Reasoning { text, .. } = &mut self.open {
                    text.push_str(&delta);
                }
                self.w.send("response.reasoning_text.delta", json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": delta }));
            }
            ParseEvent::Content(delta) => {
                if !matches!(self.open, Open::Message { .. }) {
                    self.close();
                    let index = self.done.len();
                    let id = self.item_id("msg");
                    self.w.send("response.output_item.added", json!({ "output_index": index, "item": { "type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": [] } }));
                    self.w.send("response.content_part.added", json!({ "item_id": id, "output_index": index, "content_index": 0, "part": { "type": "output_text", "text": "", "annotations": [] } }));
                    self.open = Open::Message {
                        index,
                        text: String::new(),
                    };
                }
                let id = self.item_id("msg");
                let index = self.done.len();
                if let Open::Message { text, .. } = &mut self.open {
                    text.push_str(&delta);
                }
                self.w.send("response.output_text.delta", json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": [] }));
            }
            ParseEvent::ToolCallStart {
                id: call_id, name, ..
            } => {
                self.close();
                let index = self.done.len();
                let id = self.item_id("fc");
                self.w.send("response.output_item.added", json!({ "output_index": index, "item": { "type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": "", "status": "in_progress" } }));
                self.open = Open::Call {
                    index,
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                };
            }
            ParseEvent::ToolCallArgs { delta, .. } => {
                if let Open::Call {
                    index,
                    id,
                    arguments,
                    ..
                } = &mut self.open
                {
                    arguments.push_str(&delta);
                    let (index, id) = (*index, id.clone());
                    self.w.send(
                        "response.function_call_arguments.delta",
                        json!({ "item_id": id, "output_index": index, "delta": delta }),
                    );
                }
            }
        }
    }
}

async fn stream_response(
    state: Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    tx: FlowSender,
    meta: Meta,
    p: ChatPrompt,
    keep: Option<Vec<Value>>,
) {
    let mut tracker = Tracker::new(state.clone(), "/v1/responses");
    let mut items = Items {
        w: EventWriter {
            tx,
            sequence: 0,
            alive: true,
        },
        open: Open::None,
        done: Vec::new(),
        response_id: meta.id.clone(),
    };
    let started = meta.response("in_progress", Vec::new(), None);
    items
        .w
        .send("response.created", json!({ "response": started }));
    items
        .w
        .send("response.in_progress", json!({ "response": started }));
    let (mut parser, first) = parser_for(&p);
    let mut out = ParsedOutput::default();
    for e in first {
        out.apply(e.clone());
        items.apply(e);
    }
    let mut usage = Usage::default();
    while let Some((_, ev)) = super::next_for_stream(&mut rx, &items.w.tx).await {
        tracker.on_event(&ev);
        let (text, end) = match ev {
            Event::Token { ref text, .. } => {
                usage.count_token(&parser);
                (text.clone(), None)
            }
            Event::Finished {
                ref tail, reason, ..
            } => {
                usage.add(&ev);
                (tail.clone(), Some(reason))
            }
            Event::Error(message) => {
                let failed = meta.response("failed", std::mem::take(&mut items.done), None);
                items.w.send(
                    "error",
                    json!({ "code": "server_error", "message": message, "param": null }),
                );
                items
                    .w
                    .send("response.failed", json!({ "response": failed }));
                return;
            }
            Event::PromptLogprobs(_) => continue,
        };
        let mut events = parser.push(&text);
        if end.is_some() {
            events.extend(parser.finish());
        }
        for e in events {
            out.apply(e.clone());
            items.apply(e);
        }
        if !items.w.alive {
            return;
        }
        if let Some(reason) = end {
            items.close();
            tracker.done();
            if let Some(mut history) = keep {
                history.push(assistant_message(&out));
                state.responses.put(meta.id.clone(), history);
            }
            let (status, kind) = if reason != FinishReason::Stop {
                ("incomplete", "response.incomplete")
            } else {
                ("completed", "response.completed")
            };
            let done = meta.response(status, std::mem::take(&mut items.done), Some(&usage));
            items.w.send(kind, json!({ "response": done }));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_chat_turns() {
        let input = Input::Items(vec![
            json!({"role": "developer", "content": [{"type": "input_text", "text": "rules"}]}),
            json!({"type": "message", "role": "user", "content": "list files"}),
            json!({"type": "reasoning", "summary": [{"type": "summary_text", "text": "use ls"}]}),
            json!({"type": "function_call", "call_id": "c1", "name": "exec", "arguments": "{\"cmd\":\"ls\"}"}),
            json!({"type": "function_call", "call_id": "c2", "name": "exec", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c1", "output": "a.txt"}),
            json!({"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "b"}]}),
        ]);
        let m = to_chat_messages(&input).expect("converts");
        assert_eq!(m.len(), 5, "{m:?}");
        assert_eq!(m[0]["role"], "developer");
        assert_eq!(m[2]["role"], "assistant");
        assert_eq!(m[2]["reasoning_content"], "use ls");
        assert_eq!(m[2]["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(m[3]["tool_call_id"], "c1");
        assert_eq!(m[4]["content"], "b");
    }

    #[test]
    fn bad_items_name_their_place() {
        let input = Input::Items(vec![json!({"type": "function_call", "name": "x"})]);
        let e = to_chat_messages(&input)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.starts_with("input[0]: missing field `call_id`"), "{e}");
        let input = Input::Items(vec![json!({"type": "teleport"})]);
        let e = to_chat_messages(&input)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("input[0]") && e.contains("teleport"), "{e}");
    }

    #[test]
    fn the_store_forgets_the_least_recently_used() {
        let store = ResponseStore::default();
        for i in 0..STORED_RESPONSES {
            store.put(
                format!("r{i}"),
                vec![json!({"role": "user", "content": "x"})],
            );
        }
        // Touch r0 so that r1 and r2 go first.
        assert!(store.get("r0").is_some());
        for i in STORED_RESPONSES..STORED_RESPONSES + 2 {
            store.put(
                format!("r{i}"),
                vec![json!({"role": "user", "content": "x"})],
            );
        }
        assert!(store.get("r0").is_some());
        assert!(store.get("r1").is_none());
        assert!(store.get("r2").is_none());
        assert!(store.get(&format!("r{}", STORED_RESPONSES + 1)).is_some());
    }
}
