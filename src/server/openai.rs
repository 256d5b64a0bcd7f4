//! OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! and vLLM's `/tokenize` and `/detokenize`. Responses and stream chunks follow vLLM's
//! shapes with `--tool-call-parser kimi_k2 --reasoning-parser kimi_k2`.

use super::error::ApiError;
use super::flow::{self, FlowSender};
use super::params::{self, Logprobs, OpenAiRequest, SamplingDefaults};
use super::prompt::{self, ChatPrompt};
use super::structured;
use super::{now_secs, request_body, submit, Pending, Shared, Tracker};
use crate::engine::constraint::OutputConstraint;
use crate::engine::sampling::{SamplingConfig, TokenLogprob};
use crate::engine::{Event, FinishReason, GenRequest, StopReason};
use crate::tokenizer::parser::{OutputParser, ParseEvent, ParsedOutput};
use crate::tokenizer::Specials;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:08x}",
        now_secs(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Generation settings common to chat and text completions.
pub(crate) struct Common {
    pub sampling: SamplingConfig,
    pub max_tokens: usize,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub forced: Option<Vec<u32>>,
    /// vLLM's `return_tokens_as_token_ids`: log-probability tokens as `token_id:N`.
    pub tokens_as_ids: bool,
    /// Makes each choice's output rules (fresh state per choice).
    pub rules: Option<RuleMaker>,
    /// A stream's backpressure flag (see `flow`), shared by its choices.
    pub backed_up: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Builds one sequence's output rules.
pub(crate) type RuleMaker = Arc<dyn Fn() -> Vec<Box<dyn OutputConstraint>> + Send + Sync>;

/// Reads the shared fields; `max_tokens` defaults to what the context leaves.
pub(crate) fn common(
    state: &Shared,
    req: &OpenAiRequest,
    prompt_len: usize,
    defaults: SamplingDefaults,
    max_token_fields: &[(&str, Option<u64>)],
) -> Result<Common, ApiError> {
    let vocab = state.engine.model_config.vocab_size;
    let limit = state.engine.config.max_model_len;
    if prompt_len >= limit {
        return Err(ApiError::param(
            "messages",
            format!(
                "This model's maximum context length is {limit} tokens. However, your request has {prompt_len} input tokens. Please reduce the length of the input."
            ),
        ));
    }
    let mut max_tokens = None;
    for &(name, value) in max_token_fields {
        if let Some(v) = value {
            if v == 0 {
                return Err(ApiError::param(name, format!("{name} must be at least 1")));
            }
            // prompt_len < limit (checked above), so no sum here can overflow.
            if v > (limit - prompt_len) as u64 {
                return Err(ApiError::param(
                    name,
                    format!(
                        "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt_len} in the input, {v} in the completion). Please reduce the length of the input or completion.",
                        prompt_len as u128 + v as u128
                    ),
                ));
            }
            max_tokens = Some(v as usize);
            break;
        }
    }
    let n = req.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::param("n", "n must be between 1 and 16"));
    }
    let mut sampling = params::sampling(req, defaults, vocab)?;
    let logprobs = match req.logprobs {
        None | Some(Logprobs::Flag(false)) => None,
        Some(Logprobs::Flag(true)) => Some(req.top_logprobs.unwrap_or(0) as usize),
        // Text completions give the count itself.
        Some(Logprobs::Count(k)) => Some(k as usize),
    };
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::param(
            "top_logprobs",
            "at most 20 log-probabilities per token",
        ));
    }
    sampling.logprobs = logprobs;
    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let stop_token_ids = match &req.stop_token_ids {
        Some(v) => params::token_ids(v, "stop_token_ids", vocab)?,
        None => Vec::new(),
    };
    let forced = match &req.forced_output {
        None => None,
        Some(_) if !state.allow_forced_output => {
            return Err(ApiError::param(
                "forced_output",
                "forced_output is a test option; start the server with --allow-forced-output",
            ))
        }
        Some(Value::String(s)) => Some(state.engine.tokenizer.encode(s, Specials::Recognise)),
        Some(_) => {
            return Err(ApiError::param(
                "forced_output",
                "forced_output must be a string",
            ))
        }
    };
    Ok(Common {
        sampling,
        max_tokens: max_tokens.unwrap_or(limit - prompt_len),
        n: n as usize,
        stream: req.stream.unwrap_or(false),
        include_usage,
        stop: params::stop_strings(&req.stop)?,
        stop_token_ids,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        skip_special_tokens: req.skip_special_tokens.unwrap_or(true),
        forced,
        tokens_as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        rules: None,
        backed_up: None,
    })
}

/// One engine request per choice; seeded requests get seed, seed+1, ... per choice.
pub(crate) fn pending(
    prompt: &[u32],
    c: &Common,
    skip_special_tokens: bool,
    prompt_logprobs: Option<usize>,
) -> Vec<Pending> {
    (0..c.n)
        .map(|i| {
            let mut sampling = c.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let prompt = prompt.to_vec();
            let stop = c.stop.clone();
            let stop_token_ids = c.stop_token_ids.clone();
            let (max_tokens, ignore_eos, forced) = (c.max_tokens, c.ignore_eos, c.forced.clone());
            let rules = c.rules.clone();
            let backed_up = c.backed_up.clone();
            Pending {
                req: Box::new(move |events| GenRequest {
                    prompt,
                    sampling,
                    max_tokens,
                    stop,
                    stop_token_ids,
                    ignore_eos,
                    skip_special_tokens,
                    prompt_logprobs,
                    forced,
                    constraints: rules.map(|make| make()).unwrap_or_default(),
                    client_backed_up: backed_up,
                    events,
                }),
            }
        })
        .collect()
}

fn token_text(state: &Shared, id: u32, as_id: bool) -> String {
    if as_id {
        return format!("token_id:{id}");
    }
    state
        .engine
        .tokenizer
        .token_bytes(id)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn chat_logprob(state: &Shared, lp: &TokenLogprob, as_ids: bool) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = state.engine.tokenizer.token_bytes(id).unwrap_or_default();
        json!({
            "token": token_text(state, id, as_ids),
            "logprob": finite(logprob),
            "bytes": bytes,
        })
    };
    let mut v = entry(lp.token, lp.logprob);
    v["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
    v
}

/// JSON has no infinities; vLLM reports -9999 for impossible tokens.
fn finite(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        -9999.0
    }
}

fn stop_reason_json(stop: &Option<StopReason>) -> Value {
    match stop {
        Some(StopReason::Text(s)) => json!(s),
        Some(StopReason::Token(t)) => json!(t),
        None => Value::Null,
    }
}

fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

/// Chat usage also counts the completion's reasoning tokens.
fn chat_usage_json(usage: &Usage) -> Value {
    let mut v = usage_json(usage.prompt, usage.completion, usage.cached);
    v["completion_tokens_details"] = json!({ "reasoning_tokens": usage.reasoning });
    v
}

fn sse_json(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn sse_response(
    body: impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn model_card(state: &Shared, name: &str) -> Value {
    json!({
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "kimi-hybrid",
        "root": state.served_model_name,
        "max_model_len": state.engine.config.max_model_len,
    })
}

pub async fn models(State(state): State<Shared>) -> Response {
    let data: Vec<Value> = state
        .model_names
        .iter()
        .map(|n| model_card(&state, n))
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{id}`: the model under any of its served names.
pub async fn model(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match super::check_model(&state, Some(&id)) {
        Ok(()) => Json(model_card(&state, &id)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn fail(state: &Shared, e: ApiError) -> Response {
    state.metrics.error();
    e.into_response()
}

/// The reasoning mode's default sampling: thinking 1.0, instant 0.6; top_p 0.95.
pub(crate) fn mode_defaults(thinking: bool) -> SamplingDefaults {
    SamplingDefaults {
        temperature: if thinking { 1.0 } else { 0.6 },
        top_p: 0.95,
    }
}

pub async fn chat_completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(&state, body).await {
        Ok(r) => super::tracked(r),
        Err(e) => fail(&state, e),
    }
}

async fn chat(state: &Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req = request_body(state, body)?;
    let messages = prompt::normalise_messages(
        req.messages
            .as_ref()
            .ok_or_else(|| ApiError::param("messages", "messages is required"))?,
    )?;
    let tools = req.tools.as_ref();
    let tool_names = match tools {
        Some(t) => prompt::check_tools(t)?,
        None => Vec::new(),
    };
    let tool_choice = prompt::parse_tool_choice(req.tool_choice.as_ref(), &tool_names)?;
    let tools = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    let kwargs: Map<String, Value> = req.chat_template_kwargs.clone().unwrap_or_default();
    let chat_prompt =
        prompt::render_off_thread(state, messages, tools.cloned(), tool_choice.clone(), kwargs)
            .await?;
    let fields = [
        ("max_completion_tokens", req.max_completion_tokens),
        ("max_tokens", req.max_tokens),
    ];
    let mut c = common(
        state,
        &req,
        chat_prompt.ids.len(),
        mode_defaults(chat_prompt.thinking),
        &fields,
    )?;
    let parallel = req.parallel_tool_calls != Some(false);
    let shape = match structured::tool_shape(tools, &tool_choice, parallel) {
        Some(shape) => Some(shape),
        None => structured::json_shape(req.response_format.as_ref(), "response_format")?,
    };
    let spec = prompt::OutputSpec {
        budget: None,
        one_call: !parallel,
        shape,
    };
    c.rules = prompt::output_rules(state, spec, &chat_prompt)?;
    let flow = c.stream.then(|| {
        let (tx, body, backed_up) = flow::channel(state.stream_stall_timeout);
        c.backed_up = Some(backed_up);
        (tx, body)
    });
    // Reasoning and tool-call markers stay in the text for the parser either way.
    let choices = pending(&chat_prompt.ids, &c, c.skip_special_tokens, None);
    let rx = submit(state, choices)?;
    let meta = ChatMeta {
        id: request_id("chatcmpl"),
        created: now_secs(),
        model: state.served_model_name.clone(),
    };
    if let Some((tx, body)) = flow {
        let state = state.clone();
        let flags = (
            c.include_usage,
            c.sampling.logprobs.is_some(),
            c.tokens_as_ids,
        );
        tokio::spawn(stream_chat(state, rx, tx, meta, chat_prompt, c.n, flags));
        Ok(sse_response(body))
    } else {
        collect_chat(
            state,
            rx,
            meta,
            &chat_prompt,
            c.n,
            (c.sampling.logprobs.is_some(), c.tokens_as_ids),
        )
        .await
    }
}

struct ChatMeta {
    id: String,
    created: u64,
    model: String,
}

#[derive(Default)]
pub(crate) struct Usage {
    pub prompt: usize,
    pub completion: usize,
    pub cached: usize,
    /// Tokens generated inside a reasoning block.
    pub reasoning: usize,
}

impl Usage {
    /// Counts a generated token that `parser` is about to read as reasoning.
    pub fn count_token(&mut self, parser: &OutputParser) {
        if parser.in_reasoning() {
            self.reasoning += 1;
        }
    }

    pub fn add(&mut self, ev: &Event) {
        if let Event::Finished {
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            ..
        } = ev
        {
            // Every choice shares the prompt.
            self.prompt = *prompt_tokens;
            self.cached = self.cached.max(*cached_tokens);
            self.completion += completion_tokens;
        }
    }
}

fn new_parser(p: &ChatPrompt) -> (OutputParser, Vec<ParseEvent>) {
    let mut parser = OutputParser::new(p.thinking, p.parse_tools);
    let first = parser.push(&p.prefill);
    (parser, first)
}

async fn collect_chat(
    state: &Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    meta: ChatMeta,
    p: &ChatPrompt,
    n: usize,
    (want_logprobs, as_ids): (bool, bool),
) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(state.clone(), "/v1/chat/completions");
    let mut parsed: Vec<ParsedOutput> = vec![ParsedOutput::default(); n];
    let mut parsers = Vec::with_capacity(n);
    for out in parsed.iter_mut() {
        let (parser, first) = new_parser(p);
        for e in first {
            out.apply(e);
        }
        parsers.push(parser);
    }
    let mut logprobs: Vec<Vec<Value>> = vec![Vec::new(); n];
    let mut finish: Vec<Option<(FinishReason, Option<StopReason>)>> = vec![None; n];
    let mut usage = Usage::default();
    let mut ended = 0;
    while let Some((i, ev)) = rx.recv().await {
        tracker.on_event(&ev);
        match ev {
            Event::Token { text, logprob, .. } => {
                usage.count_token(&parsers[i]);
                for e in parsers[i].push(&text) {
                    parsed[i].apply(e);
                }
                if let Some(lp) = logprob {
                    logprobs[i].push(chat_logprob(state, &lp, as_ids));
                }
            }
            Event::Finished {
                ref tail,
                reason,
                ref stop,
                ..
            } => {
                for e in parsers[i].push(tail).into_iter().chain(parsers[i].finish()) {
                    parsed[i].apply(e);
                }
                usage.add(&ev);
                finish[i] = Some((reason, stop.clone()));
                ended += 1;
            }
            Event::Error(message) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
            Event::PromptLogprobs(_) => {}
        }
        if ended == n {
            break;
        }
    }
    tracker.done();
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let out = &parsed[i];
            let (reason, stop) = finish[i].clone().unwrap_or((FinishReason::Stop, None));
            let has_calls = !out.tool_calls.is_empty();
            let mut message = json!({
                "role": "assistant",
                "content": if out.content.is_empty() && has_calls { Value::Null } else { json!(out.content) },
                "tool_calls": out.tool_calls.iter().map(|c| json!({
                    "id": c.id,
                    "type": "function",
                    "function": { "name": c.name, "arguments": c.arguments },
                })).collect::<Vec<_>>(),
            });
            // vLLM's current name and its earlier one, for clients that read either.
            let reasoning = if p.thinking && !out.reasoning.is_empty() {
                json!(out.reasoning)
            } else {
                Value::Null
            };
            message["reasoning"] = reasoning.clone();
            message["reasoning_content"] = reasoning;
            json!({
                "index": i,
                "message": message,
                "logprobs": if want_logprobs { json!({ "content": logprobs[i] }) } else { Value::Null },
                "finish_reason": if has_calls && reason == FinishReason::Stop { "tool_calls" } else { reason.as_str() },
                "stop_reason": stop_reason_json(&stop),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": chat_usage_json(&usage),
    }))
    .into_response())
}

async fn stream_chat(
    state: Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    tx: FlowSender,
    meta: ChatMeta,
    p: ChatPrompt,
    n: usize,
    (include_usage, want_logprobs, as_ids): (bool, bool, bool),
) {
    let mut tracker = Tracker::new(state.clone(), "/v1/chat/completions");
    let chunk = |choices: Value| {
        json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
        })
    };
    let mut parsers = Vec::with_capacity(n);
    let mut pending_events = Vec::with_capacity(n);
    for i in 0..n {
        let (parser, first) = new_parser(&p);
        parsers.push(parser);
        pending_events.push(first);
        let role = chunk(
            json!([{ "index": i, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]),
        );
        if tx.send(sse_json(&role)).is_err() {
            return;
        }
    }
    let mut had_calls = vec![false; n];
    let mut usage = Usage::default();
    let mut ended = 0;
    while let Some((i, ev)) = super::next_for_stream(&mut rx, &tx).await {
        tracker.on_event(&ev);
        let (text, logprob, end) = match ev {
            Event::Token { text, logprob, .. } => {
                usage.count_token(&parsers[i]);
                (text, logprob, None)
            }
            Event::Finished {
                ref tail,
                reason,
                ref stop,
                ..
            } => {
                usage.add(&ev);
                (tail.clone(), None, Some((reason, stop.clone())))
            }
            Event::Error(message) => {
                let _ = tx.send(sse_json(&json!({ "error": { "message": message, "type": "InternalServerError", "code": 500 } })));
                return;
            }
            Event::PromptLogprobs(_) => continue,
        };
        let mut events = std::mem::take(&mut pending_events[i]);
        events.extend(parsers[i].push(&text));
        if end.is_some() {
            events.extend(parsers[i].finish());
        }
        let mut lp = logprob.map(|lp| json!({ "content": [chat_logprob(&state, &lp, as_ids)] }));
        for e in events {
            let delta = match e {
                ParseEvent::Reasoning(s) => json!({ "reasoning": s, "reasoning_content": s }),
                ParseEvent::Content(s) => json!({ "content": s }),
                ParseEvent::ToolCallStart { index, id, name } => {
                    had_calls[i] = true;
                    json!({ "tool_calls": [{ "index": index, "id": id, "type": "function", "function": { "name": name, "arguments": "" } }] })
                }
                ParseEvent::ToolCallArgs { index, delta } => {
                    json!({ "tool_calls": [{ "index": index, "function": { "arguments": delta } }] })
                }
            };
            let c = chunk(
                json!([{ "index": i, "delta": delta, "logprobs": lp.take(), "finish_reason": null }]),
            );
            if tx.send(sse_json(&c)).is_err() {
                return;
            }
        }
        if let Some(lp) = lp.filter(|_| want_logprobs) {
            // A token with no visible text still reports its log-probability.
            let c =
                chunk(json!([{ "index": i, "delta": {}, "logprobs": lp, "finish_reason": null }]));
            if tx.send(sse_json(&c)).is_err() {
                return;
            }
        }
        if let Some((reason, stop)) = end {
            let reason = if had_calls[i] && reason == FinishReason::Stop {
                "tool_calls"
            } else {
                reason.as_str()
            };
            let c = chunk(
                json!([{ "index": i, "delta": {}, "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason_json(&stop) }]),
            );
            if tx.send(sse_json(&c)).is_err() {
                return;
            }
            ended += 1;
            if ended == n {
                break;
            }
        }
    }
    if ended < n {
        return;
    }
    tracker.done();
    if include_usage {
        let mut c = chunk(json!([]));
        c["usage"] = chat_usage_json(&usage);
        let _ = tx.send(sse_json(&c));
    }
    let _ = tx.send(SseEvent::default().data("[DONE]"));
}

/// A text-completion prompt: a string or token ids; a list of either is a batch.
fn completion_prompts(state: &Shared, v: &Value) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab = state.engine.model_config.vocab_size;
    let tok = &state.engine.tokenizer;
    let one = |v: &Value| -> Result<Vec<u32>, ApiError> {
        match v {
            Value::String(s) => Ok(tok.encode(s, Specials::Recognise)),
            Value::Array(_) => params::token_ids(v, "prompt", vocab),
            _ => Err(ApiError::param(
                "prompt",
                "prompt must be a string, token ids, or a list of either",
            )),
        }
    };
    let prompts = match v {
        Value::Array(items) if items.first().is_some_and(|f| f.is_string() || f.is_array()) => {
            items.iter().map(one).collect::<Result<Vec<_>, _>>()?
        }
        _ => vec![one(v)?],
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::param("prompt", "prompt must not be empty"));
    }
    Ok(prompts)
}

pub async fn completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completion(&state, body).await {
        Ok(r) => super::tracked(r),
        Err(e) => fail(&state, e),
    }
}

async fn completion(
    state: &Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = request_body(state, body)?;
    let prompts = completion_prompts(
        state,
        req.prompt
            .as_ref()
            .ok_or_else(|| ApiError::param("prompt", "prompt is required"))?,
    )?;
    let echo = req.echo.unwrap_or(false);
    // Plain completions default to the engine's neutral sampling (temperature 1).
    let defaults = SamplingDefaults {
        temperature: 1.0,
        top_p: 1.0,
    };
    let mut commons = Vec::new();
    for p in &prompts {
        commons.push(common(
            state,
            &req,
            p.len(),
            defaults,
            &[("max_tokens", req.max_tokens)],
        )?);
    }
    // OpenAI's text-completion default is 16 tokens.
    let explicit_max = req.max_tokens.is_some();
    let flow = req.stream.unwrap_or(false).then(|| {
        let (tx, body, backed_up) = flow::channel(state.stream_stall_timeout);
        for c in commons.iter_mut() {
            c.backed_up = Some(backed_up.clone());
        }
        (tx, body)
    });
    let mut all = Vec::new();
    for (p, c) in prompts.iter().zip(commons.iter_mut()) {
        if !explicit_max {
            c.max_tokens = c.max_tokens.min(16);
        }
        let prompt_lp =
            (echo && c.sampling.logprobs.is_some()).then(|| c.sampling.logprobs.unwrap_or(0));
        all.extend(pending(p, c, c.skip_special_tokens, prompt_lp));
    }
    let c = &commons[0];
    let n = c.n;
    let total = all.len();
    let rx = submit(state, all)?;
    let meta = ChatMeta {
        id: request_id("cmpl"),
        created: now_secs(),
        model: state.served_model_name.clone(),
    };
    let echo_texts: Vec<String> = prompts
        .iter()
        .map(|p| {
            if echo {
                state.engine.tokenizer.decode(p).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .collect();
    let ctx = CompletionCtx {
        meta,
        echo_texts,
        prompts,
        n,
        total,
        logprobs: c.sampling.logprobs,
        as_ids: c.tokens_as_ids,
    };
    if let Some((tx, body)) = flow {
        tokio::spawn(stream_completion(
            state.clone(),
            rx,
            tx,
            ctx,
            c.include_usage,
        ));
        Ok(sse_response(body))
    } else {
        collect_completion(state, rx, ctx).await
    }
}

struct CompletionCtx {
    meta: ChatMeta,
    echo_texts: Vec<String>,
    prompts: Vec<Vec<u32>>,
    /// Choices per prompt.
    n: usize,
    total: usize,
    logprobs: Option<usize>,
    as_ids: bool,
}

/// OpenAI legacy log-probabilities of tokens, with text offsets counted from `offset`.
struct LegacyLogprobs {
    as_ids: bool,
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    offset: usize,
}

impl LegacyLogprobs {
    fn new(as_ids: bool) -> Self {
        LegacyLogprobs {
            as_ids,
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
            offset: 0,
        }
    }

    fn push(&mut self, state: &Shared, id: u32, lp: Option<&TokenLogprob>) {
        let text = token_text(state, id, false);
        self.text_offset.push(self.offset);
        self.offset += text.len();
        self.tokens.push(json!(token_text(state, id, self.as_ids)));
        match lp {
            Some(lp) => {
                self.token_logprobs.push(json!(finite(lp.logprob)));
                let mut top = Map::new();
                for &(t, l) in &lp.top {
                    top.insert(token_text(state, t, self.as_ids), json!(finite(l)));
                }
                self.top_logprobs.push(Value::Object(top));
            }
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
        }
    }

    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

async fn collect_completion(
    state: &Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    ctx: CompletionCtx,
) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(state.clone(), "/v1/completions");
    let mut texts: Vec<String> = (0..ctx.total)
        .map(|i| ctx.echo_texts[i / ctx.n].clone())
        .collect();
    let mut lps: Vec<LegacyLogprobs> = (0..ctx.total)
        .map(|_| LegacyLogprobs::new(ctx.as_ids))
        .collect();
    let mut finish: Vec<Option<(FinishReason, Option<StopReason>)>> = vec![None; ctx.total];
    let mut usage = Usage::default();
    let mut prompt_total = 0;
    let mut ended = 0;
    while let Some((i, ev)) = rx.recv().await {
        tracker.on_event(&ev);
        match ev {
            Event::PromptLogprobs(list) => {
                let prompt = &ctx.prompts[i / ctx.n];
                for (id, lp) in prompt.iter().zip(&list) {
                    lps[i].push(state, *id, lp.as_ref());
                }
            }
            Event::Token { id, text, logprob } => {
                texts[i].push_str(&text);
                if ctx.logprobs.is_some() {
                    lps[i].push(state, id, logprob.as_ref());
                }
            }
            Event::Finished {
                ref tail,
                reason,
                ref stop,
                prompt_tokens,
                ..
            } => {
                texts[i].push_str(tail);
                finish[i] = Some((reason, stop.clone()));
                if i % ctx.n == 0 {
                    prompt_total += prompt_tokens;
                }
                usage.add(&ev);
                ended += 1;
            }
            Event::Error(message) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
        }
        if ended == ctx.total {
            break;
        }
    }
    tracker.done();
    let choices: Vec<Value> = (0..ctx.total)
        .map(|i| {
            let (reason, stop) = finish[i].clone().unwrap_or((FinishReason::Stop, None));
            json!({
                "index": i,
                "text": texts[i],
                "logprobs": if ctx.logprobs.is_some() { lps[i].json() } else { Value::Null },
                "finish_reason": reason.as_str(),
                "stop_reason": stop_reason_json(&stop),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": ctx.meta.id,
        "object": "text_completion",
        "created": ctx.meta.created,
        "model": ctx.meta.model,
        "choices": choices,
        "usage": usage_json(prompt_total, usage.completion, usage.cached),
    }))
    .into_response())
}

async fn stream_completion(
    state: Shared,
    mut rx: UnboundedReceiver<(usize, Event)>,
    tx: FlowSender,
    ctx: CompletionCtx,
    include_usage: bool,
) {
    let mut tracker = Tracker::new(state.clone(), "/v1/completions");
    let chunk = |choices: Value| {
        json!({
            "id": ctx.meta.id,
            "object": "text_completion",
            "created": ctx.meta.created,
            "model": ctx.meta.model,
            "choices": choices,
        })
    };
    let mut echoed = vec![false; ctx.total];
    let mut usage = Usage::default();
    let mut prompt_total = 0;
    let mut ended = 0;
    while let Some((i, ev)) = super::next_for_stream(&mut rx, &tx).await {
        tracker.on_event(&ev);
        let mut text = String::new();
        if !echoed[i] {
            echoed[i] = true;
            text.push_str(&ctx.echo_texts[i / ctx.n]);
        }
        let (logprobs, end) = match ev {
            Event::PromptLogprobs(list) => {
                let mut l = LegacyLogprobs::new(ctx.as_ids);
                for (id, lp) in ctx.prompts[i / ctx.n].iter().zip(&list) {
                    l.push(&state, *id, lp.as_ref());
                }
                (Some(l.json()), None)
            }
            Event::Token {
                id,
                text: t,
                logprob,
            } => {
                text.push_str(&t);
                let l = ctx.logprobs.map(|_| {
                    let mut l = LegacyLogprobs::new(ctx.as_ids);
                    l.push(&state, id, logprob.as_ref());
                    l.json()
                });
                (l, None)
            }
            Event::Finished {
                ref tail,
                reason,
                ref stop,
                prompt_tokens,
                ..
            } => {
                text.push_str(tail);
                if i % ctx.n == 0 {
                    prompt_total += prompt_tokens;
                }
                usage.add(&ev);
                (None, Some((reason, stop.clone())))
            }
            Event::Error(message) => {
                let _ = tx.send(sse_json(&json!({ "error": { "message": message, "type": "InternalServerError", "code": 500 } })));
                return;
            }
        };
        let (reason, stop) = match &end {
            Some((r, s)) => (json!(r.as_str()), stop_reason_json(s)),
            None => (Value::Null, Value::Null),
        };
        let c = chunk(
            json!([{ "index": i, "text": text, "logprobs": logprobs, "finish_reason": reason, "stop_reason": stop }]),
        );
        if tx.send(sse_json(&c)).is_err() {
            return;
        }
        if end.is_some() {
            ended += 1;
            if ended == ctx.total {
                break;
            }
        }
    }
    if ended < ctx.total {
        return;
    }
    tracker.done();
    if include_usage {
        let mut c = chunk(json!([]));
        c["usage"] = usage_json(prompt_total, usage.completion, usage.cached);
        let _ = tx.send(sse_json(&c));
    }
    let _ = tx.send(SseEvent::default().data("[DONE]"));
}

/// vLLM's `/tokenize`: `{"prompt": ...}` or `{"messages": [...]}`.
pub async fn tokenize(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        let req = request_body(&state, body)?;
        let ids = if let Some(messages) = &req.messages {
            let messages = prompt::normalise_messages(messages)?;
            let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
            let add = req.add_generation_prompt.unwrap_or(true);
            let rendered = state
                .template
                .render_prompt(
                    &state.engine.tokenizer,
                    &Value::Array(messages),
                    req.tools.as_ref(),
                    add,
                    &kwargs,
                )
                .map_err(|e| {
                    ApiError::bad_request(format!("cannot render the chat template: {e}"))
                })?;
            state.engine.tokenizer.encode_rendered(&rendered)
        } else {
            let prompt = match &req.prompt {
                Some(Value::String(s)) => s,
                Some(_) => return Err(ApiError::param("prompt", "prompt must be a string")),
                None => return Err(ApiError::param("prompt", "give prompt or messages")),
            };
            state.engine.tokenizer.encode(prompt, Specials::Recognise)
        };
        Ok(Json(json!({
            "count": ids.len(),
            "max_model_len": state.engine.config.max_model_len,
            "tokens": ids,
        }))
        .into_response())
    };
    run().unwrap_or_else(|e| fail(&state, e))
}

pub async fn detokenize(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        let req = request_body(&state, body)?;
        let tokens = req
            .tokens
            .as_ref()
            .ok_or_else(|| ApiError::param("tokens", "tokens is required"))?;
        let ids = params::token_ids(tokens, "tokens", state.engine.tokenizer.vocab_size())?;
        let text = state
            .engine
            .tokenizer
            .decode(&ids)
            .map_err(|e| ApiError::param("tokens", e.to_string()))?;
        Ok(Json(json!({ "prompt": text })).into_response())
    };
    run().unwrap_or_else(|e| fail(&state, e))
}
