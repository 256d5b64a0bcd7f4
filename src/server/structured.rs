//! Structured output for all three APIs: `response_format` (chat), `text.format`
//! (Responses) and forced tool calls (`tool_choice` required / named, Anthropic `any` /
//! `tool`) become one grammar each, enforced token by token by the engine
//! (`engine::grammar`). Tool calls are held to Kimi's native section markup, so the
//! streamed deltas stay what the kimi_k2 parser emits.

use super::error::ApiError;
use super::prompt::ToolChoice;
use super::AppState;
use crate::engine::grammar::{GrammarRule, GrammarVocab};
use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};
use std::sync::Arc;

/// What the output must be.
pub(crate) enum Shape {
    /// JSON matching this schema.
    Json(Value),
    /// The forced tool call(s), continuing the prompt's prefill (see `prompt::render`).
    ToolCalls {
        /// Each offered function's name and parameter schema.
        tools: Vec<(String, Value)>,
        choice: ToolChoice,
        parallel: bool,
    },
    /// Free text with calls the model may make (`tool_choice` auto) when a tool is
    /// `strict`: text and reasoning stay free, a call's arguments follow its schema
    /// (any JSON object for tools that are not strict).
    ToolCallsAuto {
        tools: Vec<(String, Value)>,
        parallel: bool,
    },
}

/// The shared grammar vocabulary, built on the first structured request.
fn vocab(state: &AppState) -> Result<Arc<GrammarVocab>, ApiError> {
    let built = state.grammar.get_or_init(|| {
        let tokenizer = state.engine.tokenizer.clone();
        let end = tokenizer
            .token_id("<|im_end|>")
            .or_else(|| tokenizer.eos_id())
            .ok_or_else(|| "the tokenizer has no end-of-turn token".to_string())?;
        GrammarVocab::new(tokenizer, end)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    built.clone().map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("structured output is unavailable: {e}"),
        )
    })
}

/// A schema as llguidance takes it: keywords it does not enforce are ignored rather
/// than refused (clients' schemas carry `format`, `title`, ... freely), and the JSON is
/// written in one layout (`, ` and `: `, no other whitespace), so a model cannot fill
/// its output with blanks the grammar would allow.
fn lenient(schema: &Value) -> Value {
    let mut s = match schema {
        Value::Object(_) => schema.clone(),
        // `true` / absent: any JSON value.
        _ => json!({}),
    };
    s["x-guidance"] = json!({
        "lenient": true,
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    });
    s
}

/// A Lark string literal (JSON's escapes are Lark's).
fn literal(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The grammar of a forced tool call, continuing after the prefill: `functions.` for
/// `required`, the call's opening up to its arguments for a named function.
fn tool_grammar(tools: &[(String, Value)], choice: &ToolChoice, parallel: bool) -> String {
    let args = |i: usize| format!("args{i}");
    let mut g = String::new();
    let more = if parallel {
        "more: <|tool_calls_section_end|> | <|tool_call_begin|> \"functions.\" call more\n"
    } else {
        "more: <|tool_calls_section_end|>\n"
    };
    match choice {
        ToolChoice::Named(name) => {
            let i = tools.iter().position(|(n, _)| n == name).unwrap_or(0);
            g.push_str(&format!(
                "start: {} <|tool_call_end|> <|tool_calls_section_end|>\n",
                args(i)
            ));
        }
        _ => {
            g.push_str("start: call more\n");
            let alternatives: Vec<String> = (0..tools.len())
                .map(|i| {
                    format!(
                        "{} IDX <|tool_call_argument_begin|> {} <|tool_call_end|>",
                        literal(&format!("{}:", tools[i].0)),
                        args(i)
                    )
                })
                .collect();
            g.push_str(&format!("call: {}\n", alternatives.join(" | ")));
            g.push_str(more);
            g.push_str("IDX: /[0-9]+/\n");
        }
    }
    for (i, (_, schema)) in tools.iter().enumerate() {
        g.push_str(&format!("{}: %json {}\n", args(i), lenient(schema)));
    }
    g
}

/// The grammar of an answer that may call tools: reasoning (when the output starts in
/// it) up to `</think>` or a tool-call section, free text, then at most one section.
/// Text is any run of ordinary tokens: special tokens match only where named, so the
/// model cannot open a section except through the grammar.
fn auto_tool_grammar(tools: &[(String, Value)], parallel: bool, reasoning: bool) -> String {
    let mut g = String::new();
    if reasoning {
        g.push_str("start: <think>? TEXT? (</think> TEXT? section? | section)\n");
    } else {
        g.push_str("start: TEXT? section?\n");
    }
    g.push_str(if parallel {
        "section: <|tool_calls_section_begin|> call+ <|tool_calls_section_end|>\n"
    } else {
        "section: <|tool_calls_section_begin|> call <|tool_calls_section_end|>\n"
    });
    let alternatives: Vec<String> = (0..tools.len())
        .map(|i| {
            format!(
                "{} IDX <|tool_call_argument_begin|> args{i} <|tool_call_end|>",
                literal(&format!("functions.{}:", tools[i].0))
            )
        })
        .collect();
    g.push_str(&format!(
        "call: <|tool_call_begin|> ({})\n",
        alternatives.join(" | ")
    ));
    g.push_str("IDX: /[0-9]+/\nTEXT: /(?s:.+)/\n");
    for (i, (_, schema)) in tools.iter().enumerate() {
        g.push_str(&format!("args{i}: %json {}\n", lenient(schema)));
    }
    g
}

/// The rule that holds one request's output to `shape`; `after_reasoning` is the
/// `</think>` token when the output starts in reasoning, which stays free.
pub(crate) fn rule(
    state: &AppState,
    shape: &Shape,
    after_reasoning: Option<u32>,
) -> Result<GrammarRule, ApiError> {
    let (grammar, what) = match shape {
        Shape::Json(schema) => (
            TopLevelGrammar::from_json_schema(lenient(schema)),
            "response_format",
        ),
        Shape::ToolCalls {
            tools,
            choice,
            parallel,
        } => (
            TopLevelGrammar::from_lark(tool_grammar(tools, choice, *parallel)),
            "tools",
        ),
        Shape::ToolCallsAuto { tools, parallel } => (
            TopLevelGrammar::from_lark(auto_tool_grammar(
                tools,
                *parallel,
                after_reasoning.is_some(),
            )),
            "tools",
        ),
    };
    let after = match shape {
        // A forced call opens right after the prompt; reasoning does not come first.
        // The auto grammar spells out the reasoning itself.
        Shape::ToolCalls { .. } | Shape::ToolCallsAuto { .. } => None,
        Shape::Json(_) => after_reasoning,
    };
    vocab(state)?
        .rule(grammar, after)
        .map_err(|e| ApiError::param(what, format!("{what} cannot be enforced: {e}")))
}

/// Function names and parameter schemas of chat-style tools; with `only_strict`, a
/// tool that is not `strict` gets any JSON object.
pub(crate) fn tool_schemas(tools: &Value, only_strict: bool) -> Vec<(String, Value)> {
    tools
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|t| {
                    let name = t.pointer("/function/name")?.as_str()?.to_string();
                    let strict = t.pointer("/function/strict") == Some(&Value::Bool(true));
                    let params = match t.pointer("/function/parameters") {
                        Some(p) if strict || !only_strict => p.clone(),
                        _ => json!({"type": "object"}),
                    };
                    Some((name, params))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn any_strict(tools: &Value) -> bool {
    tools.as_array().is_some_and(|list| {
        list.iter()
            .any(|t| t.pointer("/function/strict") == Some(&Value::Bool(true)))
    })
}

/// Chat's `response_format` (`{"type": "json_schema", "json_schema": {"schema": ...}}`,
/// `{"type": "json_object"}`, `{"type": "text"}`) or Responses' `text.format`
/// (`{"type": "json_schema", "schema": ...}`), as a shape.
pub(crate) fn json_shape(format: Option<&Value>, field: &str) -> Result<Option<Shape>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Shape::Json(json!({"type": "object"})))),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .or_else(|| format.get("schema"))
                .ok_or_else(|| {
                    ApiError::param(field, format!("{field} of type json_schema needs a schema"))
                })?;
            Ok(Some(Shape::Json(schema.clone())))
        }
        other => Err(ApiError::param(
            field,
            format!("{field}.type {other:?} is not one of text, json_object, json_schema"),
        )),
    }
}

/// The shape the tools give the output: a forced call's, or (with `auto` and a
/// `strict` tool) free text whose calls follow their schemas.
pub(crate) fn tool_shape(
    tools: Option<&Value>,
    choice: &ToolChoice,
    parallel: bool,
) -> Option<Shape> {
    match (tools, choice) {
        (Some(tools), ToolChoice::Required | ToolChoice::Named(_)) => Some(Shape::ToolCalls {
            tools: tool_schemas(tools, false),
            choice: choice.clone(),
            parallel,
        }),
        (Some(tools), ToolChoice::Auto) if any_strict(tools) => Some(Shape::ToolCallsAuto {
            tools: tool_schemas(tools, true),
            parallel,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_grammars_name_the_section_markers_and_escape_names() {
        let tools = vec![
            ("get_weather".to_string(), json!({"type": "object"})),
            ("odd\"name".to_string(), json!(true)),
        ];
        let g = tool_grammar(&tools, &ToolChoice::Required, false);
        assert!(g.contains("call: \"get_weather:\" IDX"), "{g}");
        assert!(g.contains("\"odd\\\"name:\""), "{g}");
        assert!(g.contains("more: <|tool_calls_section_end|>\n"), "{g}");
        let g = tool_grammar(&tools, &ToolChoice::Named("odd\"name".into()), true);
        assert!(g.starts_with("start: args1 <|tool_call_end|>"), "{g}");
    }
}
