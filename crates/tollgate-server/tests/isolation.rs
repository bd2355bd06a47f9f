//! The isolation sweep, generated from the OpenAPI document (issue 13): every operation it lists
//! is tried with no credential, an unknown one, an account key on an admin operation, and an
//! account key on another account's data. Each must be refused with the right status and error
//! code and leave both ledgers byte-identical. An operation without a rule below fails the test,
//! so a new route cannot ship without saying who may call it.
#![allow(dead_code, reason = "each test binary uses a part of this module")]

include!("common/api.rs");

/// Who may call an operation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Access {
    /// No credential needed (probes and the document itself).
    Public,
    /// The admin token only.
    Admin,
    /// The admin, or a key of the account in the path.
    Account,
    /// The admin or any key; what a key sees or writes is its own account's (checked by the
    /// handler from the body or query: `account` names the other account here).
    AnyCaller,
}

fn rule(method: &str, path: &str) -> Option<Access> {
    use Access::*;
    Some(match (method, path) {
        ("GET", "/healthz" | "/readyz" | "/api/v1/openapi.json") => Public,
        ("GET", "/api/v1/tiers" | "/api/v1/prices" | "/api/v1/prices/{model}" | "/api/v1/accounts") => AnyCaller,
        ("GET", "/api/v1/stream" | "/api/v1/alerts") | ("POST", "/api/v1/events") => AnyCaller,
        ("PUT", "/api/v1/tiers/{id}") | ("POST", "/api/v1/accounts") | ("PATCH", "/api/v1/accounts/{id}") => Admin,
        ("PUT", "/api/v1/accounts/{id}/pools/{pool}") | ("POST", "/api/v1/accounts/{id}/grants") => Admin,
        ("GET" | "POST", "/api/v1/accounts/{id}/keys") | ("DELETE", "/api/v1/accounts/{id}/keys/{key}") => Admin,
        ("POST", "/api/v1/alerts/test") | ("GET" | "POST", "/api/v1/alert-rules") => Admin,
        ("DELETE", "/api/v1/alert-rules/{id}") => Admin,
        ("GET", "/api/v1/accounts/{id}" | "/api/v1/accounts/{id}/balance" | "/api/v1/accounts/{id}/pools") => Account,
        ("GET", "/api/v1/accounts/{id}/grants" | "/api/v1/accounts/{id}/events") => Account,
        ("POST", "/api/v1/accounts/{id}/holds") | ("GET", "/api/v1/accounts/{id}/holds/{hold}") => Account,
        ("POST", "/api/v1/accounts/{id}/holds/{hold}/settle" | "/api/v1/accounts/{id}/holds/{hold}/void") => Account,
        ("GET", "/api/v1/accounts/{id}/report" | "/api/v1/accounts/{id}/forecast") => Account,
        ("POST", "/api/v1/accounts/{id}/plan") => Account,
        ("GET", "/api/v1/accounts/{id}/advice/tier" | "/api/v1/accounts/{id}/advice/model") => Account,
        _ => return None,
    })
}

/// The path with its parameters filled in for `account`.
fn concrete(path: &str, account: &str) -> String {
    let hold = if account == A { "hold-a1" } else { "hold-b1" };
    let id = if path.starts_with("/api/v1/tiers/") {
        "pro"
    } else if path.starts_with("/api/v1/alert-rules/") {
        "rule-1"
    } else {
        account
    };
    path.replace("{id}", id)
        .replace("{hold}", hold)
        .replace("{key}", "key-1")
        .replace("{pool}", "programmatic")
        .replace("{model}", "claude-sonnet-4-5")
}

/// A body or query naming `account`, for the operations that take the account from it.
fn naming(method: &str, path: &str, account: &str) -> (String, Value) {
    match (method, path) {
        ("POST", "/api/v1/events") => (path.to_string(), event("evt-iso", account)),
        ("GET", "/api/v1/alerts") => (format!("{path}?account={account}"), Value::Null),
        _ => (concrete(path, account), valid_body(method, path)),
    }
}

/// A body the operation would take from its rightful caller, so that only who calls decides
/// the answer (a malformed body could be refused first).
fn valid_body(method: &str, path: &str) -> Value {
    match (method, path) {
        ("PUT", "/api/v1/tiers/{id}") => json!({"interactive_usd": "1", "programmatic_usd": "1"}),
        ("POST", "/api/v1/accounts") => json!({"id": "intruder", "tier": "pro"}),
        ("PATCH", "/api/v1/accounts/{id}") => json!({"tier": "max-20x"}),
        ("PUT", "/api/v1/accounts/{id}/pools/{pool}") => json!({"on_exhausted": "alert"}),
        ("POST", "/api/v1/accounts/{id}/grants") => json!({"pool": "programmatic", "amount_usd": "100"}),
        ("POST", "/api/v1/accounts/{id}/keys") => json!({"name": "intruder"}),
        ("POST", "/api/v1/alerts/test") => json!({"channel": "log"}),
        ("POST", "/api/v1/alert-rules") => json!({"id": "rule-1", "kind": "cap_hit"}),
        ("POST", "/api/v1/accounts/{id}/holds") => json!({"pool": "programmatic", "amount_usd": "0.01"}),
        ("POST", "/api/v1/accounts/{id}/holds/{hold}/settle") => json!({"cost_usd": "0"}),
        ("POST", "/api/v1/accounts/{id}/plan") => json!({"pool": "programmatic", "cost_usd": "1"}),
        _ => json!({}),
    }
}

async fn send(api: &Api, method: &Method, path: &str, auth: Auth<'_>, body: &Value) -> Reply {
    if *method == Method::GET || *method == Method::DELETE {
        api.send(method.clone(), path, auth, None, Body::empty()).await
    } else {
        api.call(method.clone(), path, auth, body.clone()).await
    }
}

#[tokio::test]
async fn every_operation_refuses_who_may_not_call_it_and_changes_nothing() {
    let api = Api::new().await;
    let doc: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let key_a = api.key_a.clone();
    let (mut cases, mut missing) = (0, Vec::new());
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            let Some(access) = rule(&m, path) else {
                missing.push(format!("{m} {path}"));
                continue;
            };
            if access == Access::Public {
                continue;
            }
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            let (own, own_body) = naming(&m, path, A);
            let op = format!("{m} {path}");
            for (who, auth, want_status, code) in [
                ("no credential", Auth::None, StatusCode::UNAUTHORIZED, "unauthorized"),
                ("an unknown bearer token", Auth::Bearer("tg_not-a-key"), StatusCode::UNAUTHORIZED, "unauthorized"),
                ("an unknown x-api-key", Auth::ApiKey("tg_not-a-key"), StatusCode::UNAUTHORIZED, "unauthorized"),
            ] {
                api.refused(
                    &format!("{op} with {who}"),
                    async |api| send(api, &method, &own, auth, &own_body).await,
                    want(want_status, code, &[]),
                )
                .await;
                cases += 1;
            }
            if path == "/api/v1/stream" {
                continue; // A key's stream is its own account's (tests/stream.rs).
            }
            match access {
                Access::Admin => {
                    api.refused(
                        &format!("{op} with an account key"),
                        async |api| send(api, &method, &own, Auth::Bearer(&key_a), &own_body).await,
                        want(StatusCode::FORBIDDEN, "forbidden", &["admin token"]),
                    )
                    .await;
                    cases += 1;
                }
                Access::Account | Access::AnyCaller if path.contains("{id}") || own != *path || m == "POST" => {
                    let (other, other_body) = naming(&m, path, B);
                    if other == own && other_body == own_body {
                        continue; // Nothing names an account (tiers, prices, the account list).
                    }
                    api.refused(
                        &format!("{op} on another account with an account key"),
                        async |api| send(api, &method, &other, Auth::Bearer(&key_a), &other_body).await,
                        want(StatusCode::NOT_FOUND, "not_found", &[]),
                    )
                    .await;
                    cases += 1;
                }
                _ => {}
            }
        }
    }
    assert!(missing.is_empty(), "operations without an isolation rule (add one to `rule`): {missing:?}");
    assert!(cases > 100, "the sweep tried {cases} cases");
    eprintln!("isolation sweep: {cases} refused requests, each leaving both ledgers unchanged");
}
