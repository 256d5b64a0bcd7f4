//! Anthropic-compatible `/v1/messages` and `/v1/messages/count_tokens`: the request is
//! read into typed structs (errors name the field as Anthropic does, e.g.
//! `messages.1.content.0.type`), turned into the chat messages the OpenAI route renders
//! (system turns anywhere, tool results as tool turns, assistant thinking / text /
//! tool_use blocks), and the output comes back as Anthropic content blocks or its
//! streaming event sequence, with `ping` events while a request waits or is prefilled.

use super::error::{ApiError, Dialect};
use super::flow::{self, FlowSender};
use super::openai::{mode_defaults, pending, request_id, Common};
use super::prompt::{self, ChatPrompt, ToolChoice};
use super::structured;
use super::{body_bytes, check_model, submit, Shared, Tracker};
use crate::engine::sampling::SamplingConfig;
use crate::engine::{Event, FinishReason, StopReason};
use crate::tokenizer::parser::{OutputParser, ParseEvent};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// A stream that has sent nothing for this long sends a `ping` event. Claude Code gives
/// up on a stream that stays silent for minutes, and a long prompt's prefill can.
const PING_EVERY: Duration = Duration::from_secs(5);

/// What stands in for an image or a binary document: this model reads text only.
const IMAGE_OMITTED: &str = "[image omitted: this model reads text only]";
const DOCUMENT_OMITTED: &str = "[document omitted: only text documents can be read]";

/// Test hook for clients that cannot add body fields (Claude Code): with
/// `--allow-forced-output`, the header `x-forced-outputs` holds a JSON list of outputs,
/// and a request whose conversation has N assistant turns gets the Nth (the last one
/// once the list runs out), so a scripted agent session can run a tool and go on.
fn forced_for_turn(
    state: &Shared,
    headers: &HeaderMap,
    turn: usize,
) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("x-forced-outputs") else {
        return Ok(None);
    };
    if !state.allow_forced_output {
        return Err(ApiError::bad_request(
            "x-forced-outputs: a test option; start the server with --allow-forced-output",
        ));
    }
    let outputs: Vec<String> = value
        .to_str()
        .ok()
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(|| ApiError::bad_request("x-forced-outputs: must be a JSON list of strings"))?;
    Ok(outputs.get(turn).or(outputs.last()).cloned())
}

fn fail(state: &Shared, e: ApiError) -> Response {
    state.metrics.error();
    e.in_dialect(Dialect::Anthropic).into_response()
}

/// The request as Anthropic defines it; fields this server has no use for
/// (`metadata`, `context_management`, `output_config`, `cache_control`, ...) are
/// accepted and ignored.
#[derive(Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    messages: Vec<InputMessage>,
    system: Option<Content>,
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stop_sequences: Option<Vec<String>>,
    tools: Option<Vec<ToolDefinition>>,
    tool_choice: Option<AnthropicToolChoice>,
    thinking: Option<Thinking>,
    /// Not Anthropic's; kept for reproducible sampling as on the OpenAI routes.
    seed: Option<i64>,
    /// Test hook (`--allow-forced-output`).
    forced_output: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Role {
    User,
    Assistant,
    /// Claude Code >= 2.1 puts system turns inside `messages`
    /// (beta `mid-conversation-system-2026-04-07`).
    System,
}

#[derive(Deserialize)]
struct InputMessage {
    role: Role,
    content: Content,
}

/// A string, or a list of content blocks.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {},
    Document {
        source: Option<Value>,
        title: Option<String>,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: Option<Content>,
        #[serde(default)]
        is_error: bool,
    },
    Thinking {
        thinking: String,
    },
    RedactedThinking {},
}

#[derive(Deserialize)]
struct ToolDefinition {
    name: String,
    description: Option<String>,
    input_schema: Option<Value>,
    /// Absent or "custom" for the client's own tools; Anthropic's server tools
    /// (`web_search_...`) name a versioned type.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Calls must follow `input_schema` exactly.
    #[serde(default)]
    strict: bool,
}

#[derive(Deserialize)]
struct AnthropicToolChoice {
    #[serde(rename = "type")]
    kind: ToolChoiceKind,
    name: Option<String>,
    #[serde(default)]
    disable_parallel_tool_use: bool,
}

#[derive(Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ToolChoiceKind {
    Auto,
    Any,
    Tool,
    None,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Thinking {
    Enabled {
        budget_tokens: u64,
    },
    Disabled {},
    /// What Claude Code's main loop sends: the model decides how long to think.
    Adaptive {},
}

/// `messages[1].content[0]` as Anthropic writes paths: `messages.1.content.0`.
fn anthropic_path(path: &str) -> String {
    path.replace('[', ".").replace(']', "")
}

/// Parses the body, naming the field at fault the way Anthropic's errors do.
fn parse_request(bytes: &[u8]) -> Result<MessagesRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = anthropic_path(&e.path().to_string());
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("The request body is not valid JSON: {inner}")
        } else if path == "." || path.is_empty() {
            // A missing top-level field: serde names it in its own message.
            match inner.to_string().strip_prefix("missing field `") {
                Some(rest) => format!("{}: Field required", rest.split('`').next().unwrap_or("")),
                None => inner.to_string(),
            }
        } else {
            format!("{path}: {inner}")
        };
        ApiError::bad_request(message)
    })
}

/// One content block, read from a list: errors name `at` (e.g. `messages.0.content.2`).
fn block(v: &Value, at: &str) -> Result<Block, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." {
            at.to_string()
        } else {
            format!("{at}.{}", anthropic_path(&inner))
        };
        ApiError::bad_request(format!("{path}: {}", e.into_inner()))
    })
}

/// What a client sent that this text-only model cannot read: logged, and replaced in
/// the prompt by a note saying so, never refused (an agent that reads a PNG would lose
/// its whole session to a 400).
fn omitted(kind: &str, at: &str) -> String {
    tracing::warn!(
        block = at,
        "{kind} block replaced by a placeholder (text-only model)"
    );
    if kind == "image" {
        IMAGE_OMITTED.to_string()
    } else {
        DOCUMENT_OMITTED.to_string()
    }
}

/// A document's text: plain-text and content-list sources are read; PDFs and URLs are
/// omitted.
fn document_text(source: Option<&Value>, title: Option<&str>, at: &str) -> String {
    let text = match source.and_then(|s| s.get("type")).and_then(Value::as_str) {
        Some("text") => source
            .and_then(|s| s.get("data"))
            .and_then(Value::as_str)
            .map(str::to_string),
        Some("content") => match source.and_then(|s| s.get("content")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(parts)) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            _ => None,
        },
        _ => None,
    };
    match (text, title) {
        (Some(t), Some(title)) => format!("{title}\n{t}"),
        (Some(t), None) => t,
        (None, _) => omitted("document", at),
    }
}

/// The text of a `system` field, a system turn or a tool result: text blocks joined,
/// images and documents as placeholders.
fn plain_text(content: &Content, at: &str) -> Result<String, ApiError> {
    let blocks = match content {
        Content::Text(s) => return Ok(s.clone()),
        Content::Blocks(b) => b,
    };
    let mut out = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.{j}");
        match block(b, &at)? {
            Block::Text { text } => out.push(text),
            Block::Image {} => out.push(omitted("image", &at)),
            Block::Document { source, title } => {
                out.push(document_text(source.as_ref(), title.as_deref(), &at))
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{at}.type: only text, image and document blocks may appear here"
                )))
            }
        }
    }
    Ok(out.join("\n"))
}

/// Anthropic messages as OpenAI-style chat messages for the template.
fn to_chat_messages(req: &MessagesRequest) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = &req.system {
        out.push(json!({ "role": "system", "content": plain_text(system, "system")? }));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages: at least one message is required",
        ));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let at = format!("messages.{i}.content");
        let blocks = match &m.content {
            Content::Text(s) => vec![Block::Text { text: s.clone() }],
            Content::Blocks(b) => b
                .iter()
                .enumerate()
                .map(|(j, b)| block(b, &format!("{at}.{j}")))
                .collect::<Result<_, _>>()?,
        };
        match m.role {
            Role::System => {
                out.push(json!({ "role": "system", "content": plain_text(&m.content, &at)? }))
            }
            Role::User => {
                let mut texts = Vec::new();
                for (j, b) in blocks.into_iter().enumerate() {
                    let at = format!("{at}.{j}");
                    match b {
                        Block::Text { text } => texts.push(text),
                        Block::Image {} => texts.push(omitted("image", &at)),
                        Block::Document { source, title } => {
                            texts.push(document_text(source.as_ref(), title.as_deref(), &at))
                        }
                        Block::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                        } => {
                            let mut result = match &content {
                                None => String::new(),
                                Some(c) => plain_text(c, &format!("{at}.content"))?,
                            };
                            if is_error {
                                result = format!("Error: {result}");
                            }
                            out.push(json!({ "role": "tool", "tool_call_id": tool_use_id, "content": result }));
                        }
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "{at}.type: a user turn holds text, image, document and tool_result blocks"
                            )))
                        }
                    }
                }
                if !texts.is_empty() {
                    out.push(json!({ "role": "user", "content": texts.join("\n") }));
                }
            }
            Role::Assistant => {
                let mut text = String::new();
                let mut reasoning = String::new();
                let mut calls = Vec::new();
                for (j, b) in blocks.into_iter().enumerate() {
                    match b {
                        Block::Text { text: t } => text.push_str(&t),
                        Block::Thinking { thinking } => reasoning.push_str(&thinking),
                        Block::RedactedThinking {} => {}
                        Block::ToolUse { id, name, input } => {
                            let input = if input.is_null() { json!({}) } else { input };
                            calls.push(json!({ "id": id, "type": "function", "function": { "name": name, "arguments": input.to_string() } }));
                        }
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "{at}.{j}.type: an assistant turn holds text, thinking and tool_use blocks"
                            )))
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
        }
    }
    Ok(out)
}

/// Anthropic tools (`{name, description, input_schema}`) as OpenAI function tools.
fn to_openai_tools(req: &MessagesRequest) -> Result<Option<Value>, ApiError> {
    let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let converted = tools
        .iter()
        .enumerate()
        .map(|(i, t)| match t.kind.as_deref() {
            None | Some("custom") => Ok(json!({
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description.clone().unwrap_or_default(),
                    "parameters": t.input_schema.clone().unwrap_or(json!({"type": "object"})),
                    "strict": t.strict,
                },
            })),
            Some(other) => Err(ApiError::bad_request(format!(
                "tools.{i}.type: {other:?} is one of Anthropic's server tools, which this \
                 server does not run; declare it as a custom tool with an input_schema"
            ))),
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Some(Value::Array(converted)))
}

fn tool_choice(req: &MessagesRequest, names: &[String]) -> Result<ToolChoice, ApiError> {
    let Some(tc) = &req.tool_choice else {
        return Ok(ToolChoice::Auto);
    };
    let as_openai = match tc.kind {
        ToolChoiceKind::Auto => json!("auto"),
        ToolChoiceKind::None => json!("none"),
        ToolChoiceKind::Any => json!("required"),
        ToolChoiceKind::Tool => {
            let name = tc
                .name
                .as_deref()
                .ok_or_else(|| ApiError::bad_request("tool_choice.tool.name: Field required"))?;
            json!({ "type": "function", "function": { "name": name } })
        }
    };
    prompt::parse_tool_choice(Some(&as_openai), names)
}

/// The reasoning mode a request asks for: no `thinking` field means off, as on
/// Anthropic's API (Claude Code's side requests send none).
struct ThinkingMode {
    on: bool,
    budget: Option<usize>,
}

fn thinking_mode(req: &MessagesRequest) -> Result<ThinkingMode, ApiError> {
    let mode = match &req.thinking {
        None | Some(Thinking::Disabled {}) => ThinkingMode {
            on: false,
            budget: None,
        },
        Some(Thinking::Adaptive {}) => ThinkingMode {
            on: true,
            budget: None,
        },
        Some(Thinking::Enabled { budget_tokens }) => {
            if *budget_tokens < 1024 {
                return Err(ApiError::bad_request(
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
                ));
            }
            if let Some(max) = req.max_tokens {
                if max <= *budget_tokens {
                    return Err(ApiError::bad_request(
                        "`max_tokens` must be greater than `thinking.budget_tokens`",
                    ));
                }
            }
            ThinkingMode {
                on: true,
                budget: Some(*budget_tokens as usize),
            }
        }
    };
    let forces_tool = matches!(
        req.tool_choice.as_ref().map(|t| &t.kind),
        Some(ToolChoiceKind::Any | ToolChoiceKind::Tool)
    );
    if mode.on && forces_tool {
        return Err(ApiError::bad_request(
            "Thinking may not be enabled when tool_choice forces tool use.",
        ));
    }
    Ok(mode)
}

/// An Anthropic request rendered: the prompt, its reasoning mode, and the tools and
/// tool choice (as chat's) its output rules need.
struct Built {
    prompt: ChatPrompt,
    mode: ThinkingMode,
    tools: Option<Value>,
    choice: ToolChoice,
}

async fn build_prompt(state: &Shared, req: &MessagesRequest) -> Result<Built, ApiError> {
    let messages = prompt::normalise_messages(&Value::Array(to_chat_messages(req)?))?;
    let tools = to_openai_tools(req)?;
    let names = match &tools {
        Some(t) => prompt::check_tools(t)?,
        None => Vec::new(),
    };
    let choice = tool_choice(req, &names)?;
    let mode = thinking_mode(req)?;
    let mut kwargs = Map::new();
    kwargs.insert("thinking".into(), json!(mode.on));
    Ok(Built {
        prompt: prompt::render_off_thread(state, messages, tools.clone(), choice.clone(), kwargs)
            .await?,
        mode,
        tools,
        choice,
    })
}

/// A request's body, checked for size, syntax, fields and model.
fn read_request(
    state: &Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<MessagesRequest, ApiError> {
    let req = parse_request(&body_bytes(body)?)?;
    if let Some(m) = &req.model {
        check_model(state, Some(m))
            .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("model: {m}")))?;
    }
    Ok(req)
}

pub async fn count_tokens(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req = read_request(&state, body)?;
        let p = build_prompt(&state, &req).await?.prompt;
        Ok::<_, ApiError>(Json(json!({ "input_tokens": p.ids.len() })).into_response())
    };
    run.await.unwrap_or_else(|e| fail(&state, e))
}

pub async fn messages(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match message(&state, &headers, body).await {
        Ok(r) => super::tracked(r),
        Err(e) => fail(&state, e),
    }
}

/// A number field inside `[min, max]`, named as Anthropic names it.
fn in_range(value: Option<f64>, name: &str, min: f64, max: f64) -> Result<Option<f32>, ApiError> {
    match value {
        Some(x) if !(min..=max).contains(&x) => Err(ApiError::bad_request(format!(
            "{name}: Input should be between {min} and {max}"
        ))),
        v => Ok(v.map(|x| x as f32)),
    }
}

async fn message(
    state: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req = read_request(state, body)?;
    if req.forced_output.is_none() {
        let turn = req
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        req.forced_output = forced_for_turn(state, headers, turn)?;
    }
    let max_tokens = req
        .max_tokens
        .ok_or_else(|| ApiError::bad_request("max_tokens: Field required"))?;
    if max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens: Input should be greater than or equal to 1",
        ));
    }
    let Built {
        prompt: p,
        mode,
        tools,
        choice,
    } = build_prompt(state, &req).await?;
    let limit = state.engine.config.max_model_len;
    if p.ids.len() >= limit {
        return Err(ApiError::bad_request(format!(
            "prompt is too long: {} tokens > {} maximum",
            p.ids.len(),
            limit - 1
        )));
    }
    let defaults = mode_defaults(p.thinking);
    let mut sampling = SamplingConfig {
        temperature: in_range(req.temperature, "temperature", 0.0, 2.0)?
            .unwrap_or(defaults.temperature),
        top_p: in_range(req.top_p, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p),
        ..SamplingConfig::default()
    };
    if let Some(k) = req.top_k {
        if k < 0 {
            return Err(ApiError::bad_request(
                "top_k: Input should be greater than or equal to 0",
            ));
        }
        sampling.top_k = k as usize;
    }
    sampling.seed = req.seed.map(|s| s as u64);
    let forced = match &req.forced_output {
        None => None,
        Some(s) if state.allow_forced_output => Some(
            state
                .engine
                .tokenizer
                .encode(s, crate::tokenizer::Specials::Recognise),
        ),
        Some(_) => {
            return Err(ApiError::bad_request(
                "forced_output: a test option; start the server with --allow-forced-output",
            ))
        }
    };
    let stop = req.stop_sequences.clone().unwrap_or_default();
    if stop.len() > 16 {
        return Err(ApiError::bad_request(
            "stop_sequences: at most 16 stop sequences",
        ));
    }
    let one_call = req
        .tool_choice
        .as_ref()
        .is_some_and(|t| t.disable_parallel_tool_use);
    let spec = prompt::OutputSpec {
        budget: mode.budget,
        one_call,
        shape: structured::tool_shape(tools.as_ref(), &choice, !one_call),
    };
    let rules = prompt::output_rules(state, spec, &p)?;
    let flow = req
        .stream
        .then(|| flow::channel(state.stream_stall_timeout));
    let c = Common {
        sampling,
        // A max_tokens beyond the context is not cut here: the engine ends the output
        // when the context fills, and says so (model_context_window_exceeded).
        max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        n: 1,
        stream: req.stream,
        include_usage: true,
        stop,
        stop_token_ids: Vec::new(),
        ignore_eos: false,
        skip_special_tokens: true,
        forced,
        tokens_as_ids: false,
        rules,
        backed_up: flow.as_ref().map(|(_, _, flag)| flag.clone()),
    };
    let rx = submit(state, pending(&p.ids, &c, true, None))?;
    // Anthropic message ids read `msg_...`.
    let id = request_id("msg").replacen('-', "_", 1);
    if let Some((tx, body, _)) = flow {
        tokio::spawn(stream_message(state.clone(), rx, tx, id, p));
        Ok(Sse::new(body).into_response())
    } else {
        collect_message(state, rx, id, &p).await
    }
}

/// Anthropic's `stop_reason` and `stop_sequence`. Anthropic tells the two length stops
/// apart, and Claude Code words its error after which one it was.
fn stop_reason(
    reason: FinishReason,
    stop: &Option<StopReason>,
    tool_use: bool,
) -> (&'static str, Value) {
    match (reason, stop) {
        (FinishReason::ContextFull, _) => ("model_context_window_exceeded", Value::Null),
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
    let mut tracker = Tracker::new(state.clone(), "/v1/messages");
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
    tx: FlowSender,
    open: Open,
    index: i64,
    alive: bool,
    last_sent: Instant,
}

impl BlockWriter {
    fn send(&mut self, kind: &str, data: Value) {
        let ev = SseEvent::default().event(kind).data(data.to_string());
        self.last_sent = Instant::now();
        if self.tx.send(ev).is_err() {
            self.alive = false;
        }
    }

    fn ping(&mut self) {
        self.send("ping", json!({ "type": "ping" }));
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
    tx: FlowSender,
    id: String,
    p: ChatPrompt,
) {
    let mut tracker = Tracker::new(state.clone(), "/v1/messages");
    let mut w = BlockWriter {
        tx,
        open: Open::None,
        index: -1,
        alive: true,
        last_sent: Instant::now(),
    };
    w.send(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": state.served_model_name,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {
                    "input_tokens": p.ids.len(), "output_tokens": 0,
                    "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                },
            },
        }),
    );
    w.ping();
    let mut parser = OutputParser::new(p.thinking, p.parse_tools);
    let mut tool_use = false;
    let first = parser.push(&p.prefill);
    for e in first {
        tool_use |= matches!(e, ParseEvent::ToolCallStart { .. });
        w.apply(e);
    }
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        let ev = tokio::select! {
            ev = super::next_for_stream(&mut rx, &w.tx) => ev,
            _ = pings.tick() => {
                if w.last_sent.elapsed() >= PING_EVERY {
                    w.ping();
                }
                continue;
            }
        };
        let Some((_, ev)) = ev else {
            return;
        };
        tracker.on_event(&ev);
        let (text, end) = match ev {
            Event::Token { text, .. } => (text, None),
            Event::Finished {
                tail,
                reason,
                stop,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => (
                tail,
                Some((
                    reason,
                    stop,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                )),
            ),
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
        if let Some((reason, stop, prompt_tokens, output_tokens, cached)) = end {
            w.close();
            let (stop_reason, stop_sequence) = stop_reason(reason, &stop, tool_use);
            w.send(
                "message_delta",
                json!({
                    "type": "message_delta",
                    "delta": { "stop_reason": stop_reason, "stop_sequence": stop_sequence },
                    "usage": {
                        "input_tokens": prompt_tokens - cached,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": cached,
                        "output_tokens": output_tokens,
                    },
                }),
            );
            w.send("message_stop", json!({ "type": "message_stop" }));
            tracker.done();
            return;
        }
    }
}
