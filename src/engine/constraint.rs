//! Rules a request puts on its own output, applied token by token where the engine
//! samples: a rule can force the next token (a reasoning budget closing `</think>`) or
//! forbid tokens (a grammar). Rules see every token the sequence emits, forced or
//! sampled, so their state follows the output exactly.

/// One rule over a sequence's output tokens.
pub trait OutputConstraint: Send {
    /// The token the rule requires next, if it requires one.
    fn force(&mut self) -> Option<u32> {
        None
    }

    /// Whether [`mask`](Self::mask) forbids anything at this step; the engine copies the
    /// logits only for rules that do.
    fn masks(&self) -> bool {
        false
    }

    /// Sets the logits of the tokens the rule forbids next to negative infinity.
    fn mask(&mut self, _logits: &mut [f32]) {}

    /// The token the sequence emitted.
    fn observe(&mut self, token: u32);
}

/// Anthropic's `thinking.budget_tokens`: once the output has spent this many tokens in
/// reasoning, the next token is the reasoning block's end marker. Reasoning ends by
/// itself at `</think>` or at a tool-call section, which the model may open straight
/// from reasoning.
pub struct ReasoningBudget {
    budget: usize,
    spent: usize,
    close: u32,
    ends_reasoning: Vec<u32>,
    open: bool,
}

impl ReasoningBudget {
    /// `close`: the `</think>` token; `also_ends`: other tokens after which the output is
    /// no longer reasoning (the tool-call section's opening).
    pub fn new(budget: usize, close: u32, also_ends: &[u32]) -> Self {
        let mut ends_reasoning = vec![close];
        ends_reasoning.extend_from_slice(also_ends);
        ReasoningBudget {
            budget,
            spent: 0,
            close,
            ends_reasoning,
            open: true,
        }
    }
}

impl OutputConstraint for ReasoningBudget {
    fn force(&mut self) -> Option<u32> {
        (self.open && self.spent >= self.budget).then_some(self.close)
    }

    fn observe(&mut self, token: u32) {
        if !self.open {
            return;
        }
        if self.ends_reasoning.contains(&token) {
            self.open = false;
        } else {
            self.spent += 1;
        }
    }
}

/// At most one tool call (Anthropic's `disable_parallel_tool_use`, OpenAI's
/// `parallel_tool_calls: false`): the first call's end closes the tool-call section.
pub struct SingleToolCall {
    call_end: u32,
    section_end: u32,
    state: SingleCallState,
}

#[derive(Clone, Copy, PartialEq)]
enum SingleCallState {
    NoCallYet,
    CloseNext,
    Done,
}

impl SingleToolCall {
    pub fn new(call_end: u32, section_end: u32) -> Self {
        SingleToolCall {
            call_end,
            section_end,
            state: SingleCallState::NoCallYet,
        }
    }
}

impl OutputConstraint for SingleToolCall {
    fn force(&mut self) -> Option<u32> {
        (self.state == SingleCallState::CloseNext).then_some(self.section_end)
    }

    fn observe(&mut self, token: u32) {
        self.state = match self.state {
            SingleCallState::NoCallYet if token == self.call_end => SingleCallState::CloseNext,
            SingleCallState::CloseNext => SingleCallState::Done,
            s => s,
        };
    }
}

/// The next token of a sequence under `rules`: the first rule that forces one decides;
/// otherwise `sample` draws from the logits with every forbidden token masked out.
pub fn next_token(
    rules: &mut [Box<dyn OutputConstraint>],
    logits: &[f32],
    sample: impl FnOnce(&[f32]) -> u32,
) -> u32 {
    if let Some(token) = rules.iter_mut().find_map(|r| r.force()) {
        return token;
    }
    if !rules.iter().any(|r| r.masks()) {
        return sample(logits);
    }
    let mut masked = logits.to_vec();
    for rule in rules.iter_mut().filter(|r| r.masks()) {
        rule.mask(&mut masked);
    }
    sample(&masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSE: u32 = 7;
    const SECTION: u32 = 9;

    fn run(rules: &mut [Box<dyn OutputConstraint>], wanted: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        for &w in wanted {
            let t = next_token(rules, &[0.0; 16], |_| w);
            for r in rules.iter_mut() {
                r.observe(t);
            }
            out.push(t);
        }
        out
    }

    #[test]
    fn a_spent_budget_closes_reasoning_once() {
        let mut rules: Vec<Box<dyn OutputConstraint>> =
            vec![Box::new(ReasoningBudget::new(3, CLOSE, &[SECTION]))];
        // Three reasoning tokens, then the close is forced; content follows freely.
        assert_eq!(run(&mut rules, &[1, 2, 3, 4, 5, 6]), [1, 2, 3, CLOSE, 5, 6]);
    }

    #[test]
    fn reasoning_that_ends_early_is_left_alone() {
        let mut rules: Vec<Box<dyn OutputConstraint>> =
            vec![Box::new(ReasoningBudget::new(3, CLOSE, &[SECTION]))];
        assert_eq!(
            run(&mut rules, &[1, CLOSE, 2, 3, 4, 5]),
            [1, CLOSE, 2, 3, 4, 5]
        );
        let mut rules: Vec<Box<dyn OutputConstraint>> =
            vec![Box::new(ReasoningBudget::new(2, CLOSE, &[SECTION]))];
        assert_eq!(run(&mut rules, &[SECTION, 1, 2, 3]), [SECTION, 1, 2, 3]);
    }

    #[test]
    fn one_tool_call_closes_the_section() {
        const CALL_END: u32 = 3;
        const SECTION_END: u32 = 4;
        let mut rules: Vec<Box<dyn OutputConstraint>> =
            vec![Box::new(SingleToolCall::new(CALL_END, SECTION_END))];
        // The model wants a second call (1 = call begin); the section is closed instead.
        assert_eq!(
            run(&mut rules, &[1, 2, CALL_END, 1, 2, CALL_END]),
            [1, 2, CALL_END, SECTION_END, 2, CALL_END]
        );
    }

    struct OnlyEven;
    impl OutputConstraint for OnlyEven {
        fn masks(&self) -> bool {
            true
        }
        fn mask(&mut self, logits: &mut [f32]) {
            for (i, l) in logits.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        fn observe(&mut self, _: u32) {}
    }

    #[test]
    fn masks_reach_the_sampler_and_forcing_wins() {
        let mut rules: Vec<Box<dyn OutputConstraint>> = vec![Box::new(OnlyEven)];
        let t = next_token(&mut rules, &[1.0; 4], |l| {
            assert_eq!(l[1], f32::NEG_INFINITY);
            assert_eq!(l[2], 1.0);
            2
        });
        assert_eq!(t, 2);
        let mut rules: Vec<Box<dyn OutputConstraint>> = vec![
            Box::new(OnlyEven),
            Box::new(ReasoningBudget::new(0, CLOSE, &[])),
        ];
        assert_eq!(next_token(&mut rules, &[1.0; 8], |_| 0), CLOSE);
    }
}
