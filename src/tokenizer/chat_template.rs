//! Chat templates rendered as transformers' `apply_chat_template` renders them with jinja2:
//! `trim_blocks` and `lstrip_blocks`, loop controls, no auto-escaping, its `tojson`
//! (Python `json.dumps` with `ensure_ascii=False`: `", "`/`": "` separators, key order
//! kept), `raise_exception`, `strftime_now`, a `namespace` whose lists support
//! `.append`/`.pop`, Python string and dict methods, and Python's spelling of `None`,
//! `True` and `False` in output. Messages get transformers' reasoning-field aliases.

use super::quote::Rendered;
use super::Tokenizer;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde_json::{Map, Value as Json};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The built-in K2.6-style template, used when a checkpoint ships none.
pub const BUILTIN_KIMI_TEMPLATE: &str = include_str!("templates/kimi-k2.6.jinja");

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("chat template from {source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error("rendering the chat template from {source_name}: {message}")]
    Render {
        source_name: String,
        message: String,
    },
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file, `tokenizer_config.json`, or "built-in").
    source_name: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// The checkpoint's own template: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json` (a string, or a list of `{name, template}` from which
    /// `default` is taken), else the built-in K2.6-style template.
    pub fn from_dir(dir: &Path) -> Result<Self, TemplateError> {
        let file = dir.join("chat_template.jinja");
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Json> = match crate::files::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str(&text).map_err(|e| TemplateError::Invalid {
                    source_name: config_path.display().to_string(),
                    message: format!("not valid JSON: {e}"),
                })?,
            ),
            Err(_) => None,
        };
        let token = |key: &str| -> Option<String> {
            match config.as_ref()?.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        if file.exists() {
            let source =
                crate::files::read_to_string(&file).map_err(|source| TemplateError::Io {
                    path: file.display().to_string(),
                    source,
                })?;
            return Self::new(source, &file.display().to_string(), bos, eos);
        }
        if let Some(t) = config.as_ref().and_then(|c| c.get("chat_template")) {
            let name = format!("{} (chat_template)", config_path.display());
            let source = match t {
                Json::String(s) => s.clone(),
                Json::Array(items) => items
                    .iter()
                    .find(|i| i.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|i| i.get("template")?.as_str())
                    .ok_or_else(|| TemplateError::Invalid {
                        source_name: name.clone(),
                        message: "a list of templates needs one named \"default\"".into(),
                    })?
                    .to_string(),
                _ => {
                    return Err(TemplateError::Invalid {
                        source_name: name,
                        message: "must be a string or a list of {name, template}".into(),
                    })
                }
            };
            return Self::new(source, &name, bos, eos);
        }
        Self::builtin(bos, eos)
    }

    /// The checkpoint's own template, or the built-in one (with the tokenizer's BOS/EOS
    /// text) when it ships none.
    pub fn for_checkpoint(
        dir: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let template = Self::from_dir(dir)?;
        if template.source_name().starts_with("built-in") {
            Self::builtin(bos_token, eos_token)
        } else {
            Ok(template)
        }
    }

    /// Whether the template knows the `<think>` reasoning format.
    pub fn supports_thinking(&self) -> bool {
        self.env
            .get_template(TEMPLATE_NAME)
            .is_ok_and(|t| t.source().contains("<think>"))
    }

    pub fn builtin(
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        Self::new(
            BUILTIN_KIMI_TEMPLATE.to_string(),
            "built-in K2.6 template",
            bos_token,
            eos_token,
        )
    }

    pub fn new(
        source: String,
        source_name: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(unknown_method);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_function("namespace", namespace_with_lists);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Invalid {
                source_name: source_name.to_string(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source_name: source_name.to_string(),
            bos_token,
            eos_token,
        })
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Renders a request's conversation into a prompt for `tokenizer`: as [`Self::render`],
    /// with every special-token string inside the request's own strings kept as text
    /// (see [`super::quote`]); encode it with [`Tokenizer::encode_rendered`].
    pub fn render_prompt(
        &self,
        tokenizer: &Tokenizer,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<Rendered, TemplateError> {
        let quoting = tokenizer.quoting();
        let mut messages = messages.clone();
        quoting.quote(&mut messages);
        let mut tools = tools.cloned();
        if let Some(t) = &mut tools {
            quoting.quote(t);
        }
        let mut kwargs = Json::Object(kwargs.clone());
        quoting.quote(&mut kwargs);
        let Json::Object(kwargs) = kwargs else {
            unreachable!("an object stays an object")
        };
        let text = self.render(&messages, tools.as_ref(), add_generation_prompt, &kwargs)?;
        Ok(quoting.restore(&text))
    }

    /// Renders `messages` (a JSON array of message objects). `kwargs` are extra template
    /// variables (`thinking`, `preserve_thinking`, ...).
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<String, TemplateError> {
        let err = |message: String| TemplateError::Render {
            source_name: self.source_name.clone(),
            message,
        };
        let messages = messages
            .as_array()
            .ok_or_else(|| err("messages must be a JSON array".into()))?;
        let mut aliased = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let obj = m
                .as_object()
                .ok_or_else(|| err(format!("message {i} is not an object")))?;
            aliased.push(Json::Object(alias_reasoning_fields(obj)));
        }
        let mut ctx = Map::new();
        if let Some(t) = &self.bos_token {
            ctx.insert("bos_token".into(), Json::String(t.clone()));
        }
        if let Some(t) = &self.eos_token {
            ctx.insert("eos_token".into(), Json::String(t.clone()));
        }
        for (k, v) in kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Json::Array(aliased));
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| err(describe(&e)))?;
        let mut out = CappedOutput::default();
        match template.render_captured_to(Value::from_serialize(&ctx), &mut out) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| err("the template wrote text that is not UTF-8".into())),
            Err(_) if out.overflowed => Err(err(format!(
                "the rendered prompt exceeds {} MiB",
                TEMPLATE_MAX_OUTPUT >> 20
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(err(format!(
                "rendering took more than {TEMPLATE_FUEL} template instructions (a runaway \
                 loop in the template?)"
            ))),
            Err(e) => Err(err(describe(&e))),
        }
    }
}

/// transformers' `_alias_reasoning_fields`: a message with reasoning under any of
/// `reasoning_content`, `thinking`, `reasoning` gets it as `thinking` (first) and
/// `reasoning_content` too, as `{"thinking": r, **message, "reasoning_content": r}`.
fn alias_reasoning_fields(message: &Map<String, Json>) -> Map<String, Json> {
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| message.get(*k).filter(|v| !v.is_null()))
        .cloned();
    let Some(r) = reasoning else {
        return message.clone();
    };
    let mut out = Map::new();
    out.insert("thinking".into(), r.clone());
    for (k, v) in message {
        out.insert(k.clone(), v.clone());
    }
    out.insert("reasoning_content".into(), r);
    out
}

fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text.push_str(": ");
            text.push_str(detail);
        }
    }
    if let Some(line) = e.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// A list that templates may change with `.append(x)`, `.pop()`, `.pop(i)`, `.extend(xs)`
/// (jinja2 lists are Python lists; minijinja's are immutable).
#[derive(Debug, Default)]
struct MutableList(Mutex<Vec<Value>>);

impl MutableList {
    fn items(&self) -> Vec<Value> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Object for MutableList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let items = self.items();
        let i = key.as_i64()?;
        let i = if i < 0 { items.len() as i64 + i } else { i };
        items.get(usize::try_from(i).ok()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.items())
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        let mut items = self
            .0
            .lock()
            .map_err(|_| Error::new(ErrorKind::InvalidOperation, "list lock poisoned"))?;
        match (method, args) {
            ("append", [x]) => {
                items.push(x.clone());
                Ok(Value::from(()))
            }
            ("extend", [xs]) => {
                items.extend(xs.try_iter()?);
                Ok(Value::from(()))
            }
            ("pop", []) => items
                .pop()
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "pop from empty list")),
            ("pop", [i]) => {
                let len = items.len() as i64;
                let i = i.as_i64().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidOperation, "list index must be an integer")
                })?;
                let idx = if i < 0 { len + i } else { i };
                if idx < 0 || idx >= len {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "pop index out of range",
                    ));
                }
                Ok(items.remove(idx as usize))
            }
            _ => Err(Error::new(
                ErrorKind::UnknownMethod,
                format!(
                    "list has no method {method} with {} argument(s)",
                    args.len()
                ),
            )),
        }
    }
}

fn to_mutable(value: Value) -> Value {
    if value.kind() == minijinja::value::ValueKind::Seq {
        if let Ok(iter) = value.try_iter() {
            return Value::from_object(MutableList(Mutex::new(iter.collect())));
        }
    }
    value
}

/// `namespace(...)`: the built-in namespace, with list attributes made mutable.
fn namespace_with_lists(defaults: Option<Value>) -> Result<Value, Error> {
    let defaults = match defaults {
        Some(d) if d.kind() == minijinja::value::ValueKind::Map => {
            let mut pairs = Vec::new();
            for key in d.try_iter()? {
                let value = d.get_item(&key)?;
                pairs.push((key, to_mutable(value)));
            }
            Some(Value::from_iter(pairs))
        }
        other => other,
    };
    minijinja::functions::namespace(defaults)
}

/// Python methods on values (`.get`, `.items`, `.split`, `.strip`, `.startswith`, ...).
fn unknown_method(
    state: &State<'_, '_>,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if value.kind() == minijinja::value::ValueKind::Seq
        && matches!(method, "append" | "pop" | "extend" | "insert" | "remove")
    {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("list.{method}: only lists stored in a namespace(...) can be changed"),
        ));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Output of `{{ value }}` as Python's `str()` would print it.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(Error::from),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(Error::from),
        ValueKind::Number if value.as_i64().is_none() => {
            let f: f64 = value.clone().try_into().unwrap_or(f64::NAN);
            out.write_str(&python_float_repr(f)).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// The widest `tojson` indent a template may ask for (real templates use 2 or 4).
const TOJSON_MAX_INDENT: usize = 64;

/// Template instructions one render may run. The published K2 and DeepSeek V3.1
/// templates spend about 100 per message (400 messages and 25 tools: 27,000 to 39,000,
/// see the test), so this leaves room for conversations fifty times that long, and a loop
/// that runs away stops here in tens of milliseconds instead of holding a server thread
/// for minutes.
const TEMPLATE_FUEL: u64 = 2_000_000;

/// Bytes one render may write: far above any context the model takes (256K tokens are
/// about 1 MiB of text), far below what would strain the server.
const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// The render's output, refusing to grow past [`TEMPLATE_MAX_OUTPUT`].
#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("template output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson_filter(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // A template is checkpoint-supplied: an indent of 2^63 would ask for exabytes.
    if indent.is_some_and(|n| n > TOJSON_MAX_INDENT) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent must be at most {TOJSON_MAX_INDENT}"),
        ));
    }
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    python_json(&json, &style, 0, &mut out);
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Serialises like Python's `json.dumps` (defaults of transformers' `tojson`).
#[cfg(test)]
fn python_json_dumps(value: &Json) -> String {
    let style = JsonStyle {
        indent: None,
        item_sep: ", ".into(),
        key_sep: ": ".into(),
        sort_keys: false,
        ensure_ascii: false,
    };
    let mut out = String::new();
    python_json(value, &style, 0, &mut out);
    out
}

fn python_json(value: &Json, style: &JsonStyle, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&python_float_json(f)),
            _ => out.push_str(&n.to_string()),
        },
        Json::String(s) => python_json_string(s, style.ensure_ascii, out),
        Json::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                python_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                python_json_string(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                python_json(v, style, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn python_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents -4..16.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    format_shortest(f)
}

/// Floats inside `json.dumps` (NaN and infinities are spelled as JavaScript does).
fn python_float_json(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    format_shortest(f)
}

fn format_shortest(f: f64) -> String {
    // `{:e}` gives the shortest round-trip digits: "d.ddde±x".
    let sci = format!("{:e}", f);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { "-" } else { "+" },
            exp.abs()
        )
    }
}

/// `strftime_now(format)` for the directives chat templates use (UTC).
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
            None => out.push('%'),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456.789, "123456.789"),
            (-2.5e-7, "-2.5e-07"),
            (1e15, "1000000000000000.0"),
            (0.1, "0.1"),
        ] {
            assert_eq!(python_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn json_dumps_matches_python_style() {
        let v: Json = serde_json::from_str(
            r#"{"b": [1, 2.0, "é\n\"x\""], "a": {"t": true, "n": null}, "e": []}"#,
        )
        .unwrap();
        assert_eq!(
            python_json_dumps(&v),
            r#"{"b": [1, 2.0, "é\n\"x\""], "a": {"t": true, "n": null}, "e": []}"#
        );
    }

    #[test]
    fn tojson_refuses_an_indent_that_would_exhaust_memory() {
        let render = |source: &str| {
            let t = ChatTemplate::new(source.into(), "hostile", None, None).unwrap();
            t.render(
                &serde_json::json!([{"role": "user", "content": "hi"}]),
                None,
                false,
                &Map::new(),
            )
        };
        for indent in ["9223372036854775807", "18446744073709551615", "65"] {
            let e = render(&format!("{{{{ messages|tojson(indent={indent}) }}}}"))
                .expect_err("refused")
                .to_string();
            assert!(e.contains("hostile") && e.contains("indent"), "{e}");
        }
        let ok = render("{{ messages|tojson(indent=2) }}").unwrap();
        assert!(ok.contains("\n  {"), "{ok}");
    }

    #[test]
    fn namespace_lists_are_mutable_and_python_methods_work() {
        let t = ChatTemplate::new(
            "{%- set ns = namespace(ids=[]) -%}{%- set _ = ns.ids.append('a') -%}{%- set _ = ns.ids.append('b') -%}{{ ns.ids.pop(0) }}|{{ ns.ids | length }}|{{ 'x:y:z'.split(':', 1)[1] }}|{{ none }}|{{ true }}|{{ {'k': 1}.get('k') }}".into(),
            "test",
            None,
            None,
        )
        .unwrap();
        let out = t
            .render(&Json::Array(vec![]), None, false, &Map::new())
            .unwrap();
        assert_eq!(out, "a|1|y:z|None|True|1");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_reported() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}".into(),
            "test",
            None,
            None,
        )
        .unwrap();
        let e = t
            .render(&Json::Array(vec![]), None, false, &Map::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system role") && e.contains("test"), "{e}");
        let e = ChatTemplate::new("{% if %}".into(), "broken.jinja", None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("broken.jinja"), "{e}");
    }

    /// Runaway templates stop at the instruction or output limit with an error naming
    /// the template, quickly; the published templates render a large agent conversation
    /// (400 messages, 25 tools) within a small part of the instruction budget.
    #[test]
    fn template_limits_stop_runaways_and_leave_real_templates_room() {
        let hi = serde_json::json!([{"role": "user", "content": "hi"}]);
        for (source, what) in [
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                "instructions",
            ),
            (
                "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                "MiB",
            ),
        ] {
            let t = ChatTemplate::new(source.into(), "hostile", None, None).unwrap();
            let started = std::time::Instant::now();
            let e = t
                .render(&hi, None, false, &Map::new())
                .expect_err("refused")
                .to_string();
            assert!(e.contains("hostile") && e.contains(what), "{e}");
            println!("{what}: refused in {:?}", started.elapsed());
        }
        let tools: Vec<Json> = (0..25)
            .map(|i| {
                serde_json::json!({"type": "function", "function": {
                    "name": format!("tool_{i}"), "description": "d".repeat(2000),
                    "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}})
            })
            .collect();
        let messages: Vec<Json> = (0..400)
            .map(|i| match i % 4 {
                0 => serde_json::json!({"role": "user", "content": "u".repeat(400)}),
                1 => serde_json::json!({"role": "assistant", "content": "", "tool_calls": [
                    {"id": format!("c{i}"), "type": "function",
                     "function": {"name": "tool_1", "arguments": "{\"a\": \"b\"}"}}]}),
                2 => serde_json::json!({"role": "tool", "tool_call_id": format!("c{}", i - 1),
                    "content": "r".repeat(2000)}),
                _ => serde_json::json!({"role": "assistant", "content": "a".repeat(400)}),
            })
            .collect();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates");
        for name in [
            "Kimi-K2-Instruct.jinja",
            "Kimi-K2-Thinking.jinja",
            "deepseek-ai-DeepSeek-V3.1.jinja",
        ] {
            let source = std::fs::read_to_string(dir.join(name)).unwrap();
            let t = ChatTemplate::new(source, name, None, None).unwrap();
            let tmpl = t.env.get_template(TEMPLATE_NAME).unwrap();
            let ctx = serde_json::json!({
                "messages": messages, "tools": tools, "add_generation_prompt": true,
            });
            let captured = tmpl
                .render_captured(Value::from_serialize(&ctx))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let (used, _) = captured.state().fuel_levels().expect("fuel is on");
            println!("{name}: {used} instructions");
            assert!(used < TEMPLATE_FUEL / 20, "{name}: {used}");
        }
        let t = ChatTemplate::builtin(None, None).unwrap();
        t.render(
            &Json::Array(messages),
            Some(&Json::Array(tools)),
            true,
            &Map::new(),
        )
        .expect("the built-in template renders");
    }
}
