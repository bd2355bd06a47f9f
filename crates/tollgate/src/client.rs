//! The management API client the commands use.

use reqwest::Method;
use serde_json::Value;

use crate::commands::{Failure, Outcome};

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// The token comes from `--token`, else `TOLLGATE_ADMIN_TOKEN`, else `./.tollgate-admin-token`.
    pub fn new(server: &str, token: Option<String>) -> Client {
        let token =
            token.or_else(|| std::env::var("TOLLGATE_ADMIN_TOKEN").ok().filter(|t| !t.is_empty())).or_else(|| {
                std::fs::read_to_string(tollgate_server::ADMIN_TOKEN_FILE)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        Client { http: reqwest::Client::new(), base: server.trim_end_matches('/').to_string(), token }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Outcome<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| (Failure::Unreachable, format!("cannot reach the tollgate server at {}: {e}", self.base)))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| (Failure::Unreachable, format!("reading the response: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let hint = if status.as_u16() == 401 && self.token.is_none() {
            " (no admin token: pass --token, set TOLLGATE_ADMIN_TOKEN, or run in the server's directory)"
        } else {
            ""
        };
        Err((failure_of(status), format!("{message}{hint} [HTTP {}]", status.as_u16())))
    }

    /// Follows a server-sent event stream, calling `on_event(name, data)` for each event until
    /// the server ends it or `on_event` returns false.
    pub async fn follow(&self, path: &str, mut on_event: impl FnMut(&str, Value) -> bool) -> Outcome<()> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| (Failure::Unreachable, format!("cannot reach the tollgate server at {}: {e}", self.base)))?;
        if !resp.status().is_success() {
            let resp_status = resp.status();
            let status = resp_status.as_u16();
            let text = resp.text().await.unwrap_or_default();
            return Err((failure_of(resp_status), format!("{text} [HTTP {status}]")));
        }
        let mut buffer = String::new();
        while let Some(chunk) =
            resp.chunk().await.map_err(|e| (Failure::Unreachable, format!("the stream broke: {e}")))?
        {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("message");
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let value = serde_json::from_str(data).unwrap_or(Value::String(data.to_string()));
                    if !on_event(name, value) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn get(&self, path: &str) -> Outcome<Value> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Outcome<Value> {
        self.call(Method::POST, path, Some(body)).await
    }
}

/// Escapes one path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The exit code of an error answer (docs/cli.md): input the server could not take (400, an
/// unknown account or route 404, 405, 413) is a usage error; a refusal by the ledger or the
/// credential (401, 403, 409, 429) is a refusal; a server error is internal.
fn failure_of(status: reqwest::StatusCode) -> Failure {
    match status.as_u16() {
        400 | 404 | 405 | 413 | 422 => Failure::Usage,
        500.. => Failure::Internal,
        _ => Failure::Refused,
    }
}
