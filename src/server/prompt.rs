//! From a chat request to prompt token ids: messages normalised (content parts joined,
//! roles checked), tools and `tool_choice` checked, the checkpoint's chat template
//! rendered, and the reasoning mode worked out for the output parser.

use super::error::ApiError;
use super::openai::RuleMaker;
use super::structured::{self, Shape};
use super::AppState;
use crate::engine::constraint::{OutputConstraint, ReasoningBudget, SingleToolCall};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// What the model is asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Tools are offered; the model decides.
    Auto,
    /// Tools stay in the prompt but calls are not parsed.
    None,
    /// The output starts with a tool call (the section opening is written for the model).
    Required,
    /// The output starts with a call of this function.
    Named(String),
}

pub struct ChatPrompt {
    pub ids: Vec<u32>,
    /// The output starts in reasoning.
    pub thinking: bool,
    /// Tool-call sections are parsed.
    pub parse_tools: bool,
    /// Text written for the model after the generation prompt (a forced tool call's
    /// opening); the parser reads it before the generated text.
    pub prefill: String,
}

/// Message content as the template expects it: a string (text parts joined).
fn content_text(content: &Value, at: &str) -> Result<Value, ApiError> {
    match content {
        Value::Null => Ok(Value::String(String::new())),
        Value::String(_) => Ok(content.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" | "input_text" => texts.push(
                        part.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::param(at, format!("{at}[{j}] has no text")))?
                            .to_string(),
                    ),
                    // A text-only model: the image is named, not refused, so an agent's
                    // session survives a screenshot.
                    "image_url" | "input_image" | "image" => {
                        tracing::warn!(part = %format!("{at}[{j}]"), "image replaced by a placeholder (text-only model)");
                        texts.push("[image omitted: this model reads text only]".to_string())
                    }
                    "file" | "input_file" | "input_audio" => {
                        tracing::warn!(part = %format!("{at}[{j}]"), "{kind} replaced by a placeholder (text-only model)");
                        texts.push(format!("[{kind} omitted: this model reads text only]"))
                    }
                    other => {
                        return Err(ApiError::param(
                            at,
                            format!("{at}[{j}] has unsupported content type {other:?}"),
                        ))
                    }
                }
            }
            Ok(Value::String(texts.join("\n")))
        }
        _ => Err(ApiError::param(
            at,
            format!("{at} must be a string or a list of content parts"),
        )),
    }
}

/// Checks and normalises OpenAI-style messages.
pub fn normalise_messages(messages: &Value) -> Result<Vec<Value>, ApiError> {
    let list = messages
        .as_array()
        .ok_or_else(|| ApiError::param("messages", "messages must be a list"))?;
    if list.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let obj = m
            .as_object()
            .ok_or_else(|| ApiError::param("messages", format!("{at} must be an object")))?;
        let role = obj
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::param("messages", format!("{at} needs a role")))?;
        let mut msg = obj.clone();
        match role {
            "system" | "user" | "assistant" | "tool" => {}
            "developer" => {
                msg.insert("role".into(), json!("system"));
            }
            other => {
                return Err(ApiError::param(
                    "messages",
                    format!("{at} has unknown role {other:?}"),
                ))
            }
        }
        let content = content_text(
            obj.get("content").unwrap_or(&Value::Null),
            &format!("{at}.content"),
        )?;
        msg.insert("content".into(), content);
        if role == "assistant" {
            if let Some(calls) = obj.get("tool_calls").filter(|v| !v.is_null()) {
                let calls = calls.as_array().ok_or_else(|| {
                    ApiError::param("messages", format!("{at}.tool_calls must be a list"))
                })?;
                for (j, c) in calls.iter().enumerate() {
                    let ok = c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .is_some();
                    if !ok {
                        return Err(ApiError::param(
                            "messages",
                            format!("{at}.tool_calls[{j}] needs function.name"),
                        ));
                    }
                }
            }
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

/// Checks OpenAI `tools`: a list of `{"type": "function", "function": {"name", ...}}`.
pub fn check_tools(tools: &Value) -> Result<Vec<String>, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::param("tools", "tools must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::param(
                    "tools",
                    format!("tools[{i}].type must be \"function\""),
                ));
            }
            t.pointer("/function/name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::param("tools", format!("tools[{i}].function.name is missing"))
                })
        })
        .collect()
}

pub fn parse_tool_choice(v: Option<&Value>, tool_names: &[String]) -> Result<ToolChoice, ApiError> {
    let choice = match v {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of auto, none, required"),
                ))
            }
        },
        Some(obj) => {
            let name = obj
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::param("tool_choice", "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}")
                })?;
            ToolChoice::Named(name.to_string())
        }
    };
    match &choice {
        ToolChoice::Required if tool_names.is_empty() => Err(ApiError::param(
            "tool_choice",
            "tool_choice \"required\" needs tools",
        )),
        ToolChoice::Named(n) if !tool_names.contains(n) => Err(ApiError::param(
            "tool_choice",
            format!("tool_choice names {n:?}, which is not among the tools"),
        )),
        _ => Ok(choice),
    }
}

/// Renders the conversation and encodes it on tokio's blocking pool: a template runs
/// up to its instruction budget (tens of milliseconds) and a long prompt takes as long
/// to encode, which must not hold up the workers that serve other requests' streams.
pub async fn render_off_thread(
    state: &super::Shared,
    messages: Vec<Value>,
    tools: Option<Value>,
    tool_choice: ToolChoice,
    kwargs: Map<String, Value>,
) -> Result<ChatPrompt, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        render(&state, &messages, tools.as_ref(), &tool_choice, &kwargs)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the prompt failed: {e}"),
        )
    })?
}

/// Renders the conversation and encodes it.
pub fn render(
    state: &AppState,
    messages: &[Value],
    tools: Option<&Value>,
    tool_choice: &ToolChoice,
    kwargs: &Map<String, Value>,
) -> Result<ChatPrompt, ApiError> {
    let mut rendered = state
        .template
        .render_prompt(
            &state.engine.tokenizer,
            &Value::Array(messages.to_vec()),
            tools,
            true,
            kwargs,
        )
        .map_err(|e| ApiError::bad_request(format!("cannot render the chat template: {e}")))?;
    let text = &mut rendered.text;
    let thinking = state.template.supports_thinking()
        && kwargs.get("thinking") != Some(&Value::Bool(false))
        && !text.ends_with("</think>");
    // Calls are numbered across the conversation.
    let earlier_calls: usize = messages
        .iter()
        .filter_map(|m| m.get("tool_calls").and_then(Value::as_array))
        .map(Vec::len)
        .sum();
    let prefill = match tool_choice {
        ToolChoice::Required => "<|tool_calls_section_begin|><|tool_call_begin|>functions.".to_string(),
        ToolChoice::Named(name) => format!(
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{earlier_calls}<|tool_call_argument_begin|>"
        ),
        _ => String::new(),
    };
    // The prefill is the server's own markup: its special tokens are real.
    text.push_str(&prefill);
    let ids = state.engine.tokenizer.encode_rendered(&rendered);
    Ok(ChatPrompt {
        ids,
        thinking,
        parse_tools: tools.is_some() && *tool_choice != ToolChoice::None,
        prefill,
    })
}

/// What a request asks of its output beyond sampling.
#[derive(Default)]
pub(crate) struct OutputSpec {
    /// Tokens of reasoning before `</think>` is written for the model.
    pub budget: Option<usize>,
    /// At most one tool call when the model calls tools of its own accord.
    pub one_call: bool,
    /// A grammar the output must follow (JSON, forced tool calls).
    pub shape: Option<Shape>,
}

/// A request's output rules, made fresh for each of its sequences. The grammar is
/// compiled here, so a schema it cannot take is the request's error.
pub(crate) fn output_rules(
    state: &AppState,
    spec: OutputSpec,
    prompt: &ChatPrompt,
) -> Result<Option<RuleMaker>, ApiError> {
    let tokenizer = &state.engine.tokenizer;
    let id = |t: &str| tokenizer.token_id(t);
    let budget = spec.budget.and_then(|b| {
        let section: Vec<u32> = id("<|tool_calls_section_begin|>").into_iter().collect();
        Some((b, id("</think>")?, section))
    });
    // A forced call's grammar already bounds the number of calls.
    let one_call = if spec.one_call && prompt.parse_tools && spec.shape.is_none() {
        id("<|tool_call_end|>").zip(id("<|tool_calls_section_end|>"))
    } else {
        None
    };
    let after_reasoning = if prompt.thinking {
        id("</think>")
    } else {
        None
    };
    let grammar = match &spec.shape {
        Some(shape) => Some(structured::rule(state, shape, after_reasoning)?),
        None => None,
    };
    if budget.is_none() && one_call.is_none() && grammar.is_none() {
        return Ok(None);
    }
    Ok(Some(Arc::new(move || {
        let mut rules: Vec<Box<dyn OutputConstraint>> = Vec::new();
        if let Some((b, close, section)) = &budget {
            rules.push(Box::new(ReasoningBudget::new(*b, *close, section)));
        }
        if let Some((call_end, section_end)) = one_call {
            rules.push(Box::new(SingleToolCall::new(call_end, section_end)));
        }
        if let Some(g) = &grammar {
            rules.push(Box::new(g.fork()));
        }
        rules
    })))
}
