//! The HTTP front end (axum on tokio): OpenAI-compatible `/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, Anthropic-compatible `/v1/messages`, plus
//! `/tokenize`, `/detokenize`, `/health` and `/metrics`. Handlers validate and render a
//! request to token ids, hand it to the engine thread, and turn the engine's events
//! into responses or server-sent event streams.

mod anthropic;
pub mod error;
mod flow;
pub mod launch;
pub mod metrics;
mod openai;
mod params;
mod prompt;
mod responses;
mod structured;

use crate::engine::{EngineHandle, Event, FinishReason, GenRequest, SubmitError};
use crate::tokenizer::chat_template::ChatTemplate;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::{ApiError, Dialect};
use metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Everything the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub template: ChatTemplate,
    /// The name responses report: the first of `--served-model-name`.
    pub served_model_name: String,
    /// Every name a request may use for the model (the first is `served_model_name`).
    pub model_names: Vec<String>,
    pub api_key: Option<String>,
    pub metrics: Metrics,
    pub shutting_down: AtomicBool,
    /// Accept the test-only `forced_output` request field.
    pub allow_forced_output: bool,
    pub created: u64,
    /// Conversations kept for the Responses API's `previous_response_id`.
    pub responses: responses::ResponseStore,
    /// How long a stream may sit unread (its generation paused) before it is dropped.
    pub stream_stall_timeout: Duration,
    /// The vocabulary for constrained decoding, built on first use.
    pub grammar: std::sync::OnceLock<Result<Arc<crate::engine::grammar::GrammarVocab>, String>>,
}

pub type Shared = Arc<AppState>;

/// Default cap on a request body (prompts of a full 256K context fit well within it).
pub const DEFAULT_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// Where browsers may call from (`--cors-allow-origin`): none, any, or a list.
#[derive(Debug, Clone, Default)]
pub enum Cors {
    #[default]
    Off,
    AnyOrigin,
    Origins(Vec<axum::http::HeaderValue>),
}

pub fn router(state: Shared, body_limit: usize) -> Router {
    router_with(state, body_limit, &Cors::Off)
}

pub fn router_with(state: Shared, body_limit: usize, cors: &Cors) -> Router {
    let app = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(access_log))
        .with_state(state);
    match cors {
        Cors::Off => app,
        Cors::AnyOrigin => app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any),
        ),
        Cors::Origins(origins) => app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins.clone())
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any),
        ),
    }
}

/// 404 with a body in the route's dialect, naming the path.
async fn unknown_route(req: Request) -> Response {
    let path = req.uri().path().to_string();
    let hint = if path.starts_with("/v1/v1/") {
        " (the base URL ends in /v1 twice: Anthropic clients take the server's address without /v1)"
    } else {
        ""
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {path}{hint}", req.method()),
    )
    .in_dialect(dialect_of(&path))
    .into_response()
}

async fn wrong_method(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{path} does not take {}", req.method()),
    )
    .in_dialect(dialect_of(&path))
    .into_response()
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn dialect_of(path: &str) -> Dialect {
    if path.starts_with("/v1/messages") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

/// API key and shutdown checks in front of every route but `/health` and `/metrics`.
async fn gate(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path == "/health" || path == "/metrics" {
        return next.run(req).await;
    }
    let dialect = dialect_of(&path);
    if state.shutting_down.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
        .in_dialect(dialect)
        .into_response();
    }
    if let Some(key) = &state.api_key {
        if !key_matches(req.headers(), key) {
            state.metrics.error();
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid or missing API key")
                .in_dialect(dialect)
                .into_response();
        }
    }
    let response = next.run(req).await;
    // Errors from the body-size limit come back as axum's plain text; reshape them.
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        state.metrics.error();
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than the server accepts",
        )
        .in_dialect(dialect)
        .into_response();
    }
    response
}

/// `Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic).
fn key_matches(headers: &HeaderMap, key: &str) -> bool {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    bearer == Some(key) || x_api_key == Some(key)
}

/// 200 once the engine can serve (its KV cache allocated), 503 before that and while
/// shutting down.
async fn health(State(state): State<Shared>) -> Response {
    let ready = state.engine.stats.ready.load(Ordering::SeqCst);
    if state.shutting_down.load(Ordering::SeqCst) || !ready {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.engine.stats),
    )
        .into_response()
}

/// The raw body, with the size limit's rejection mapped to our error shape.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server accepts".to_string()
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(status, message)
    })
}

/// An OpenAI-style request, once its size, syntax, field types and `model` are checked.
pub(crate) fn request_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<params::OpenAiRequest, ApiError> {
    let req = params::parse_request(&body_bytes(body)?)?;
    check_model(state, req.model.as_deref())?;
    Ok(req)
}

/// Checks the requested model name against the served one.
pub(crate) fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !state.model_names.iter().any(|n| n == m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist."),
        )),
        _ => Ok(()),
    }
}

/// A request for the engine, before its event channel is attached.
pub(crate) struct Pending {
    pub req: Box<dyn FnOnce(tokio::sync::mpsc::UnboundedSender<Event>) -> GenRequest + Send>,
}

/// Submits one engine request per choice and merges their events, tagged with the
/// choice index. Dropping the receiver cancels every choice within one engine step.
pub(crate) fn submit(
    state: &AppState,
    choices: Vec<Pending>,
) -> Result<UnboundedReceiver<(usize, Event)>, ApiError> {
    // A request for more sequences than the server ever holds at once can never be
    // admitted: that is the request's fault (400), not a busy server (429).
    let capacity = state.engine.config.max_num_seqs + state.engine.config.max_waiting;
    if choices.len() > capacity {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "this request asks for {} sequences (prompts x n), but the server admits at \
                 most {capacity} at once (--max-num-seqs + --max-waiting)",
                choices.len()
            ),
        ));
    }
    let (merged_tx, merged_rx) = unbounded_channel();
    for (index, pending) in choices.into_iter().enumerate() {
        let (tx, mut rx) = unbounded_channel();
        state
            .engine
            .submit((pending.req)(tx))
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => {
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
                }
                SubmitError::Stopped => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                }
            })?;
        let merged_tx = merged_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            let end = matches!(ev, Event::Finished { .. } | Event::Error(_));
                            if merged_tx.send((index, ev)).is_err() || end {
                                break;
                            }
                        }
                        None => break,
                    },
                    _ = merged_tx.closed() => break,
                }
            }
        });
    }
    Ok(merged_rx)
}

/// The next engine event for a stream, or `None` once the events end, the stream's
/// body is gone (the client hung up), or the client has read nothing for the stall
/// timeout. The engine's requests are then dropped within one step, a long prompt's
/// prefill included, without waiting for a token to fail to send.
pub(crate) async fn next_for_stream(
    rx: &mut UnboundedReceiver<(usize, Event)>,
    out: &flow::FlowSender,
) -> Option<(usize, Event)> {
    tokio::select! {
        ev = rx.recv() => ev,
        _ = out.closed() => None,
        _ = out.stalled() => {
            tracing::warn!("a client left its stream unread past the stall timeout; dropping it");
            None
        }
    }
}

/// Records latency metrics from the events of one generation request, and writes its
/// log line when it ends (finished, failed, or dropped because the client went).
pub(crate) struct Tracker {
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    state: Shared,
    route: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    finish_reason: Option<FinishReason>,
    error: Option<String>,
    finished: bool,
}

impl Tracker {
    pub fn new(state: Shared, route: &'static str) -> Self {
        Tracker {
            started: Instant::now(),
            first_token: None,
            last_token: None,
            state,
            route,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            finish_reason: None,
            error: None,
            finished: false,
        }
    }

    pub fn on_event(&mut self, ev: &Event) {
        let now = Instant::now();
        match ev {
            Event::Token { .. } => {
                match self.last_token {
                    None => {
                        self.first_token = Some(now);
                        self.state
                            .metrics
                            .time_to_first_token((now - self.started).as_secs_f64())
                    }
                    Some(t) => self.state.metrics.inter_token((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            Event::Finished {
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                reason,
                ..
            } => {
                self.prompt_tokens += prompt_tokens;
                self.completion_tokens += completion_tokens;
                self.cached_tokens += cached_tokens;
                self.finish_reason = Some(*reason);
                self.state.metrics.finished(
                    (now - self.started).as_secs_f64(),
                    *prompt_tokens,
                    *completion_tokens,
                )
            }
            Event::Error(message) => {
                self.state.metrics.error();
                self.error = Some(message.clone());
                self.finished = true;
            }
            Event::PromptLogprobs(_) => {}
        }
    }

    /// Call when every choice has ended.
    pub fn done(&mut self) {
        self.finished = true;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.finished {
            self.state.metrics.aborted();
        }
        let ttft_ms = self
            .first_token
            .map(|t| (t - self.started).as_secs_f64() * 1e3);
        let duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let finish = match (&self.error, self.finished, self.finish_reason) {
            (Some(_), _, _) => "error",
            (None, false, _) => "client_gone",
            (None, true, Some(reason)) => reason.as_str(),
            (None, true, None) => "stop",
        };
        let model = self.state.served_model_name.as_str();
        match &self.error {
            Some(error) => tracing::error!(
                route = self.route,
                model,
                status = 500,
                prompt_tokens = self.prompt_tokens,
                completion_tokens = self.completion_tokens,
                cached_tokens = self.cached_tokens,
                ttft_ms,
                duration_ms,
                finish,
                error = error.as_str(),
                "request failed"
            ),
            None => tracing::info!(
                route = self.route,
                model,
                status = 200,
                prompt_tokens = self.prompt_tokens,
                completion_tokens = self.completion_tokens,
                cached_tokens = self.cached_tokens,
                ttft_ms,
                duration_ms,
                finish,
                "request"
            ),
        }
    }
}

/// Marks a response whose request a [`Tracker`] logs when it ends, so the access log
/// does not log it again.
#[derive(Clone, Copy)]
pub(crate) struct LoggedByTracker;

/// A generation route's response, whose request its tracker logs.
pub(crate) fn tracked(mut response: Response) -> Response {
    response.extensions_mut().insert(LoggedByTracker);
    response
}

/// The request log for everything a tracker does not cover: errors (with their
/// message), model lists, tokenizer routes, unknown paths.
async fn access_log(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    if response.extensions().get::<LoggedByTracker>().is_some() {
        return response;
    }
    let status = response.status().as_u16();
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    let method = method.as_str();
    match response.extensions().get::<error::ErrorMessage>() {
        Some(error::ErrorMessage(message)) => tracing::warn!(
            method,
            route = path.as_str(),
            status,
            duration_ms,
            error = message.as_str(),
            "request refused"
        ),
        None if path == "/health" || path == "/metrics" => {
            tracing::debug!(
                method,
                route = path.as_str(),
                status,
                duration_ms,
                "request"
            )
        }
        None => tracing::info!(
            method,
            route = path.as_str(),
            status,
            duration_ms,
            "request"
        ),
    }
    response
}

/// How `serve` runs.
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub body_limit: usize,
    /// How long running streams may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    pub cors: Cors,
    /// Connections served at once (more only get `/health`).
    pub max_connections: usize,
    /// Header read timeout, and the longest wait between a request body's chunks.
    pub read_timeout: Duration,
}

/// Serves until SIGTERM or Ctrl-C: then new requests get 503 while running ones finish
/// (up to `drain_timeout`), and the process returns.
///
/// Connections are served by hyper directly so that each has a header read timeout and
/// the server a connection limit: a client that opens connections and sends nothing
/// (or a body a byte a minute) is cut off after `read_timeout`, and connections beyond
/// `max_connections` only get `/health` (and 503 elsewhere), one request each.
pub async fn serve(state: Shared, opts: ServeOptions) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await?;
    let addr = listener.local_addr()?;
    let app = router_with(state.clone(), opts.body_limit, &opts.cors).layer(
        tower_http::timeout::RequestBodyTimeoutLayer::new(opts.read_timeout),
    );
    let overflow = Router::new()
        .route("/health", get(health))
        .fallback(too_many_connections)
        .with_state(state.clone());
    eprintln!("{}", banner(&state, addr));
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let drained = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let state = state.clone();
        let drained = drained.clone();
        let drain = opts.drain_timeout;
        async move {
            wait_for_signal().await;
            state.shutting_down.store(true, Ordering::SeqCst);
            eprintln!("shutting down: refusing new requests, finishing running ones");
            let deadline = Instant::now() + drain;
            while state.engine.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drained.notify_one();
        }
    };
    tokio::spawn(signal);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait for connections to close.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drained.notified() => break,
        };
        let _ = stream.set_nodelay(true);
        // A bounded send buffer: a client that stops reading is noticed after about
        // this much rather than after the kernel's autotuned megabytes (streamed tokens
        // are small; this is still ample for any response at LAN speed).
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES);
        let permit = slots.clone().try_acquire_owned().ok();
        let mut builder = Builder::new(TokioExecutor::new());
        let (service, header_timeout) = match &permit {
            Some(_) => (app.clone(), opts.read_timeout),
            None => {
                builder.http1().keep_alive(false);
                (
                    overflow.clone(),
                    opts.read_timeout.min(Duration::from_secs(2)),
                )
            }
        };
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(HTTP1_BUFFER_BYTES);
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    // Streams still open after the drain deadline are cut.
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    Ok(())
}

/// The kernel send buffer of each connection.
const SEND_BUFFER_BYTES: usize = 128 << 10;
/// hyper's HTTP/1 buffer per connection (request headers and queued response bytes).
const HTTP1_BUFFER_BYTES: usize = 64 << 10;

/// What connections beyond `--max-connections` get for anything but `/health`.
async fn too_many_connections(req: Request) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server has as many connections open as --max-connections allows; retry later",
    )
    .in_dialect(dialect_of(req.uri().path()))
    .into_response()
}

/// What a user needs to point clients at the server: both API bases (Anthropic
/// clients add `/v1` themselves) and the variables Claude Code and Codex read.
fn banner(state: &AppState, addr: std::net::SocketAddr) -> String {
    let base = format!("http://{addr}");
    let model = &state.served_model_name;
    let key = if state.api_key.is_some() {
        "<your --api-key>"
    } else {
        "none"
    };
    format!(
        "kimi-hybrid serving {model} (also as: {others})\n  \
         OpenAI API:    {base}/v1\n  \
         Anthropic API: {base}\n  \
         Claude Code:   export ANTHROPIC_BASE_URL={base} ANTHROPIC_API_KEY={key} ANTHROPIC_MODEL={model}\n  \
         Codex:         export OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={key}  \
         (a provider with wire_api = \"responses\")",
        others = if state.model_names.len() > 1 {
            state.model_names[1..].join(", ")
        } else {
            "-".to_string()
        },
    )
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
