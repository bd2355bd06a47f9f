//! Which pool a gateway call belongs to, from what the caller's client says about itself
//! (SPEC section 4). The first rule that matches decides, and the event records which one.
//!
//! The User-Agent is client-asserted: a hint, not proof. A key with a fixed pool always wins.

use crate::policy::PoolKind;

/// What decided a call's pool; recorded on the event as `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decider {
    /// The key's own fixed pool.
    Key,
    /// The `x-tollgate-pool` header (keys whose pool is `auto`).
    Header,
    /// A configured rule, by name.
    Rule(String),
    /// A built-in User-Agent rule, by what it recognised (`sdk-cli`, `cli`, `anthropic-sdk`…).
    UserAgent(String),
    /// Nothing matched: the configured default.
    Default,
}

impl Decider {
    /// The `source` recorded on the event.
    pub fn source(&self) -> String {
        match self {
            Decider::Key => "key".to_string(),
            Decider::Header => "header".to_string(),
            Decider::Rule(name) => format!("rule:{name}"),
            Decider::UserAgent(what) => format!("ua:{what}"),
            Decider::Default => "default".to_string(),
        }
    }
}

/// The built-in rules on the Claude Code / SDK User-Agent. None when none applies.
///
/// Claude Code sends `claude-cli/<version> (external, <entrypoint>[, agent-sdk/…][, client-app/…])`;
/// the SDKs send `Anthropic/Python 0.x`, `AsyncAnthropic/Python 0.x`, `Anthropic/JS 0.x`,
/// `OpenAI/Python 1.x`.
pub fn by_user_agent(user_agent: &str) -> Option<(PoolKind, String)> {
    let ua = user_agent.trim();
    for (prefix, what) in
        [("Anthropic/", "anthropic-sdk"), ("AsyncAnthropic/", "anthropic-sdk"), ("OpenAI/", "openai-sdk")]
    {
        if ua.starts_with(prefix) {
            return Some((PoolKind::Programmatic, what.to_string()));
        }
    }
    let rest = ua.strip_prefix("claude-cli/")?;
    let inside = rest.split_once('(')?.1.split(')').next()?;
    let tokens: Vec<&str> = inside.split(',').map(str::trim).collect();
    if tokens.iter().any(|t| t.starts_with("client-app/")) {
        return Some((PoolKind::Programmatic, "client-app".to_string()));
    }
    // The entrypoint follows "external" (or is first when a client leaves that out).
    let entrypoint = match tokens.as_slice() {
        ["external", e, ..] => *e,
        [e, ..] => *e,
        [] => return None,
    };
    let pool = match entrypoint {
        "cli" | "claude-vscode" => PoolKind::Interactive,
        e if e.starts_with("claude-desktop") => PoolKind::Interactive,
        "sdk-cli" | "sdk-py" | "sdk-ts" | "claude-code-github-action" => PoolKind::Programmatic,
        _ => return None,
    };
    Some((pool, entrypoint.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use PoolKind::{Interactive as I, Programmatic as P};

    #[test]
    fn user_agents_of_real_clients() {
        let rows: &[(&str, Option<(PoolKind, &str)>)] = &[
            ("claude-cli/2.1.332 (external, sdk-cli)", Some((P, "sdk-cli"))),
            ("claude-cli/2.1.332 (external, cli)", Some((I, "cli"))),
            ("claude-cli/2.1.114 (external, claude-vscode)", Some((I, "claude-vscode"))),
            ("claude-cli/2.1.114 (external, claude-desktop-3p)", Some((I, "claude-desktop-3p"))),
            ("claude-cli/2.1.332 (external, sdk-py, agent-sdk/0.2.189)", Some((P, "sdk-py"))),
            ("claude-cli/2.1.332 (external, sdk-ts, agent-sdk/0.3.1)", Some((P, "sdk-ts"))),
            ("claude-cli/2.1.332 (external, claude-code-github-action)", Some((P, "claude-code-github-action"))),
            ("claude-cli/2.1.332 (external, cli, client-app/my-app/1.0.0)", Some((P, "client-app"))),
            ("Anthropic/Python 0.121.0", Some((P, "anthropic-sdk"))),
            ("AsyncAnthropic/Python 0.121.0", Some((P, "anthropic-sdk"))),
            ("Anthropic/JS 0.60.0", Some((P, "anthropic-sdk"))),
            ("OpenAI/Python 1.99.0", Some((P, "openai-sdk"))),
            ("claude-cli/2.1.332 (external, mcp)", None),
            ("curl/8.5.0", None),
            ("claude-cli/2.1.332", None),
            ("", None),
        ];
        for (ua, want) in rows {
            let got = by_user_agent(ua);
            assert_eq!(got.as_ref().map(|(p, s)| (*p, s.as_str())), *want, "{ua}");
        }
    }

    #[test]
    fn sources_are_stable() {
        assert_eq!(Decider::Key.source(), "key");
        assert_eq!(Decider::Header.source(), "header");
        assert_eq!(Decider::Rule("ci".into()).source(), "rule:ci");
        assert_eq!(Decider::UserAgent("sdk-cli".into()).source(), "ua:sdk-cli");
        assert_eq!(Decider::Default.source(), "default");
    }
}
