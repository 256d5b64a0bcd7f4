//! Reasoning and `kimi_k2` tool-call parsing of generated text, streaming and not.
//!
//! Grammar (spec section 7): with thinking on, everything up to `</think>` (or up to a
//! tool-call section) is reasoning, and the output may start without `<think>`. Then
//! content, then optionally a section
//! `<|tool_calls_section_begin|>` (`<|tool_call_section_begin|>` accepted too) holding calls
//! `<|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>` and closed by
//! `<|tool_calls_section_end|>`. A call's name is `ID.split(':')[0].rsplit('.')[-1]`.
//!
//! The parser is one state machine fed by deltas, so a marker split across deltas or
//! several markers in one delta make no difference: concatenating what it emits gives the
//! same result as parsing the whole text at once (`parse`). Nothing is dropped: a section
//! or call that is malformed or cut off before its arguments begin comes out as plain
//! content; a call cut off inside its arguments keeps the arguments received.

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const SECTION_BEGIN: &str = "<|tool_calls_section_begin|>";
const SECTION_BEGIN_SINGULAR: &str = "<|tool_call_section_begin|>";
const SECTION_END: &str = "<|tool_calls_section_end|>";
const SECTION_END_SINGULAR: &str = "<|tool_call_section_end|>";
const CALL_BEGIN: &str = "<|tool_call_begin|>";
const ARG_BEGIN: &str = "<|tool_call_argument_begin|>";
const CALL_END: &str = "<|tool_call_end|>";

/// The markers of the output grammar (reasoning and tool calls); special tokens in
/// Kimi's vocabulary, kept in the text even when other special tokens are skipped.
pub const MARKERS: &[&str] = &[
    THINK_OPEN,
    THINK_CLOSE,
    SECTION_BEGIN,
    SECTION_BEGIN_SINGULAR,
    SECTION_END,
    SECTION_END_SINGULAR,
    CALL_BEGIN,
    ARG_BEGIN,
    CALL_END,
];

/// What the parser emits, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseEvent {
    Reasoning(String),
    Content(String),
    /// A tool call starts: its id (as the model wrote it) and function name.
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the call's JSON arguments.
    ToolCallArgs {
        index: usize,
        delta: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// The whole parsed output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedOutput {
    pub fn apply(&mut self, event: ParseEvent) {
        match event {
            ParseEvent::Reasoning(s) => self.reasoning.push_str(&s),
            ParseEvent::Content(s) => self.content.push_str(&s),
            ParseEvent::ToolCallStart { id, name, .. } => self.tool_calls.push(ToolCall {
                id,
                name,
                arguments: String::new(),
            }),
            ParseEvent::ToolCallArgs { index, delta } => {
                if let Some(call) = self.tool_calls.get_mut(index) {
                    call.arguments.push_str(&delta);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reasoning,
    Content,
    /// Inside a section, between calls.
    Section,
    /// After `<|tool_call_begin|>`, reading the id.
    CallId,
    /// Streaming a call's arguments.
    CallArgs,
}

/// Streaming parser for one generated output.
#[derive(Debug, Clone)]
pub struct OutputParser {
    state: State,
    tools: bool,
    /// Unprocessed input (may end in a partial marker).
    buf: String,
    /// Section text not yet committed to a call; becomes content if the section breaks.
    raw: String,
    /// The id being read in `CallId`.
    id: String,
    /// Non-marker text between calls inside a section.
    stray: String,
    calls: usize,
    /// Calls committed in the current section.
    section_calls: usize,
}

/// Function name of a call id: `functions.get_weather:0` -> `get_weather`.
pub fn function_name(id: &str) -> &str {
    let head = id.split(':').next().unwrap_or("");
    head.rsplit('.').next().unwrap_or("")
}

impl OutputParser {
    /// `thinking`: the output starts in reasoning. `tools`: tool-call sections are parsed
    /// (otherwise their markers are ordinary content).
    pub fn new(thinking: bool, tools: bool) -> Self {
        OutputParser {
            state: if thinking {
                State::Reasoning
            } else {
                State::Content
            },
            tools,
            buf: String::new(),
            raw: String::new(),
            id: String::new(),
            stray: String::new(),
            calls: 0,
            section_calls: 0,
        }
    }

    /// Parses a complete output.
    /// Whether the next text pushed continues a reasoning block (for counting
    /// reasoning tokens).
    pub fn in_reasoning(&self) -> bool {
        self.state == State::Reasoning
    }

    pub fn parse(text: &str, thinking: bool, tools: bool) -> ParsedOutput {
        let mut p = OutputParser::new(thinking, tools);
        let mut out = ParsedOutput::default();
        for e in p.push(text).into_iter().chain(p.finish()) {
            out.apply(e);
        }
        out
    }

    /// Feeds a delta; returns the events it completes.
    pub fn push(&mut self, delta: &str) -> Vec<ParseEvent> {
        self.buf.push_str(delta);
        let mut events = Vec::new();
        loop {
            match find_marker(&self.buf) {
                Some((at, marker)) => {
                    let text: String = self.buf[..at].to_string();
                    self.buf.drain(..at + marker.len());
                    self.text(&text, &mut events);
                    self.marker(marker, &mut events);
                }
                None => {
                    // Keep a tail that may be the start of a marker.
                    let keep = partial_marker_len(&self.buf);
                    let text: String = self.buf[..self.buf.len() - keep].to_string();
                    self.buf.drain(..self.buf.len() - keep);
                    self.text(&text, &mut events);
                    break;
                }
            }
        }
        merge(events)
    }

    /// Ends the output: flushes held text; an unfinished section becomes content.
    pub fn finish(&mut self) -> Vec<ParseEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        self.text(&rest, &mut events);
        match self.state {
            State::Section | State::CallId => self.degrade(&mut events),
            _ => {}
        }
        merge(events)
    }

    fn text(&mut self, text: &str, events: &mut Vec<ParseEvent>) {
        if text.is_empty() {
            return;
        }
        match self.state {
            State::Reasoning => events.push(ParseEvent::Reasoning(text.to_string())),
            State::Content => events.push(ParseEvent::Content(text.to_string())),
            State::Section => {
                self.raw.push_str(text);
                self.stray.push_str(text);
            }
            State::CallId => {
                self.raw.push_str(text);
                self.id.push_str(text);
            }
            State::CallArgs => events.push(ParseEvent::ToolCallArgs {
                index: self.calls - 1,
                delta: text.to_string(),
            }),
        }
    }

    fn marker(&mut self, marker: &'static str, events: &mut Vec<ParseEvent>) {
        let is_section_begin = marker == SECTION_BEGIN || marker == SECTION_BEGIN_SINGULAR;
        let is_section_end = marker == SECTION_END || marker == SECTION_END_SINGULAR;
        match self.state {
            State::Reasoning => match marker {
                // A leading or repeated <think> is not reasoning text.
                THINK_OPEN => {}
                THINK_CLOSE => self.state = State::Content,
                _ if is_section_begin && self.tools => self.open_section(marker),
                _ => events.push(ParseEvent::Reasoning(marker.to_string())),
            },
            State::Content => {
                if is_section_begin && self.tools {
                    self.open_section(marker);
                } else {
                    events.push(ParseEvent::Content(marker.to_string()));
                }
            }
            State::Section => {
                self.raw.push_str(marker);
                match marker {
                    CALL_BEGIN => {
                        self.flush_stray(events);
                        self.id.clear();
                        self.state = State::CallId;
                    }
                    // A section that held no call is not a tool-call section at all.
                    _ if is_section_end && self.section_calls == 0 => self.degrade(events),
                    _ if is_section_end => {
                        self.flush_stray(events);
                        self.raw.clear();
                        self.state = State::Content;
                    }
                    // Anything else is out of place here: the section is malformed.
                    _ => self.degrade(events),
                }
            }
            State::CallId => {
                self.raw.push_str(marker);
                let name = function_name(self.id.trim()).to_string();
                if marker == ARG_BEGIN && !name.is_empty() {
                    events.push(ParseEvent::ToolCallStart {
                        index: self.calls,
                        id: self.id.trim().to_string(),
                        name,
                    });
                    self.calls += 1;
                    self.section_calls += 1;
                    self.raw.clear();
                    self.state = State::CallArgs;
                } else {
                    self.degrade(events);
                }
            }
            State::CallArgs => match marker {
                CALL_END => self.state = State::Section,
                _ if is_section_end => {
                    // The model skipped <|tool_call_end|>: the section end closes the call.
                    self.state = State::Content;
                }
                CALL_BEGIN => {
                    // A new call without closing the previous one.
                    self.raw.clear();
                    self.raw.push_str(CALL_BEGIN);
                    self.id.clear();
                    self.state = State::CallId;
                }
                _ => events.push(ParseEvent::ToolCallArgs {
                    index: self.calls - 1,
                    delta: marker.to_string(),
                }),
            },
        }
    }

    fn open_section(&mut self, marker: &str) {
        self.raw.clear();
        self.raw.push_str(marker);
        self.stray.clear();
        self.section_calls = 0;
        self.state = State::Section;
    }

    /// Text between calls: dropped when it is only whitespace, content otherwise.
    fn flush_stray(&mut self, events: &mut Vec<ParseEvent>) {
        let stray = std::mem::take(&mut self.stray);
        if !stray.trim().is_empty() {
            events.push(ParseEvent::Content(stray));
        }
    }

    /// The uncommitted part of a section is not a tool call: it becomes content, and
    /// parsing continues as content.
    fn degrade(&mut self, events: &mut Vec<ParseEvent>) {
        let raw = std::mem::take(&mut self.raw);
        if !raw.is_empty() {
            events.push(ParseEvent::Content(raw));
        }
        self.stray.clear();
        self.id.clear();
        self.state = State::Content;
    }
}

/// The earliest marker in `s` (longest on a tie of position).
fn find_marker(s: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    let mut from = 0;
    while let Some(rel) = s[from..].find('<') {
        let at = from + rel;
        for m in MARKERS {
            if s[at..].starts_with(m) && best.is_none_or(|(_, b)| m.len() > b.len()) {
                best = Some((at, m));
            }
        }
        if best.is_some() {
            return best;
        }
        from = at + 1;
    }
    None
}

/// Length of the longest suffix of `s` that is a proper prefix of some marker.
fn partial_marker_len(s: &str) -> usize {
    let start = s
        .len()
        .saturating_sub(MARKERS.iter().map(|m| m.len()).max().unwrap_or(0));
    for (i, _) in s.char_indices().filter(|(i, _)| *i >= start) {
        let tail = &s[i..];
        if MARKERS
            .iter()
            .any(|m| m.len() > tail.len() && m.starts_with(tail))
        {
            return tail.len();
        }
    }
    0
}

/// Joins adjacent text events of the same kind.
fn merge(events: Vec<ParseEvent>) -> Vec<ParseEvent> {
    let mut out: Vec<ParseEvent> = Vec::with_capacity(events.len());
    for e in events {
        match (out.last_mut(), e) {
            (Some(ParseEvent::Reasoning(a)), ParseEvent::Reasoning(b)) => a.push_str(&b),
            (Some(ParseEvent::Content(a)), ParseEvent::Content(b)) => a.push_str(&b),
            (
                Some(ParseEvent::ToolCallArgs { index: i, delta: a }),
                ParseEvent::ToolCallArgs { index: j, delta: b },
            ) if *i == j => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out.retain(|e| !matches!(e, ParseEvent::Reasoning(s) | ParseEvent::Content(s) if s.is_empty()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: &str, args: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: function_name(id).into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn reasoning_then_content() {
        let p = OutputParser::parse("<think>let me see</think>The answer is 4.", true, true);
        assert_eq!(p.reasoning, "let me see");
        assert_eq!(p.content, "The answer is 4.");
        // Output that starts without <think> (the template already opened it).
        let p = OutputParser::parse("hmm</think>ok", true, true);
        assert_eq!((p.reasoning.as_str(), p.content.as_str()), ("hmm", "ok"));
        // Cut off while thinking: all reasoning.
        let p = OutputParser::parse("still thinking", true, true);
        assert_eq!(
            (p.reasoning.as_str(), p.content.as_str()),
            ("still thinking", "")
        );
    }

    #[test]
    fn thinking_off_is_all_content() {
        let p = OutputParser::parse("plain </think> text", false, true);
        assert_eq!(p.content, "plain </think> text");
        assert!(p.reasoning.is_empty());
    }

    #[test]
    fn tool_calls_end_reasoning() {
        let text = "<think>need weather<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>";
        let p = OutputParser::parse(text, true, true);
        assert_eq!(p.reasoning, "need weather");
        assert_eq!(p.content, "");
        assert_eq!(
            p.tool_calls,
            vec![call("functions.get_weather:0", "{\"city\": \"Paris\"}")]
        );
    }

    #[test]
    fn several_calls_singular_marker_and_tricky_arguments() {
        let args1 = "{\"expr\": \"a < b: ok\\nnext\", \"note\": \"naïve ✓ 你好\"}";
        let text = format!(
            "Checking.<|tool_call_section_begin|>\n<|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>{args1}<|tool_call_end|>\n<|tool_call_begin|> functions.search:1 <|tool_call_argument_begin|>{{}}<|tool_call_end|><|tool_call_section_end|>"
        );
        let p = OutputParser::parse(&text, false, true);
        assert_eq!(p.content, "Checking.");
        assert_eq!(
            p.tool_calls,
            vec![
                call("functions.calc:0", args1),
                call("functions.search:1", "{}")
            ]
        );
    }

    #[test]
    fn malformed_and_truncated_sections_become_content() {
        // Cut off before the arguments begin.
        let text = "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get";
        let p = OutputParser::parse(text, false, true);
        assert_eq!(p.content, text);
        assert!(p.tool_calls.is_empty());
        // A section that never contains a call.
        let text = "x<|tool_calls_section_begin|>oops<|tool_calls_section_end|>y";
        let p = OutputParser::parse(text, false, true);
        assert_eq!(p.content, text);
        // An id without a name.
        let text = "<|tool_calls_section_begin|><|tool_call_begin|><|tool_call_argument_begin|>{}<|tool_call_end|>";
        let p = OutputParser::parse(text, false, true);
        assert!(p.tool_calls.is_empty());
        assert!(p.content.contains("{}"), "{p:?}");
        // Cut off inside the arguments: the call keeps what arrived.
        let text = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": 1";
        let p = OutputParser::parse(text, false, true);
        assert_eq!(p.tool_calls, vec![call("functions.f:0", "{\"a\": 1")]);
    }

    #[test]
    fn without_tools_markers_are_content() {
        let text = "a<|tool_calls_section_begin|>b";
        assert_eq!(OutputParser::parse(text, false, false).content, text);
    }

    #[test]
    fn function_names() {
        assert_eq!(function_name("functions.get_weather:0"), "get_weather");
        assert_eq!(function_name("get_weather:3"), "get_weather");
        assert_eq!(function_name("a.b.c"), "c");
    }
}
