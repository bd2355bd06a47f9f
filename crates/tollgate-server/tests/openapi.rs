//! The OpenAPI document says what the router and its handlers do: every route and method is an
//! operation and nothing else is; every operation documents a schema for each answer with a
//! body, a request-body schema exactly where its handler reads a body, its path parameters, and
//! the error statuses its handler's code can produce (read from the handler's source). That the
//! answers match the schemas is Schemathesis's job (`tests/api/schemathesis.sh`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn doc() -> Value {
    serde_json::from_str(include_str!("../openapi.json")).unwrap()
}

/// The API modules' source, by module name, to find each handler in.
fn sources() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("accounts", include_str!("../src/api/accounts.rs")),
        ("alerts", include_str!("../src/api/alerts.rs")),
        ("ledger", include_str!("../src/api/ledger.rs")),
        ("meta", include_str!("../src/api/meta.rs")),
        ("planning", include_str!("../src/api/planning.rs")),
        ("reports", include_str!("../src/api/reports.rs")),
        ("stream", include_str!("../src/api/stream.rs")),
    ])
}

/// `(path, method) → "module::handler"` from the router's `.route(…)` lines.
fn routes() -> BTreeMap<(String, String), String> {
    let mut routes = BTreeMap::new();
    for line in include_str!("../src/api/mod.rs").lines() {
        let Some(rest) = line.trim().strip_prefix(".route(\"") else { continue };
        let (path, mut rest) = rest.split_once('"').unwrap();
        let mut found = false;
        while let Some((method, handler, tail)) = next_method(rest) {
            routes.insert((path.to_string(), method.to_string()), handler.to_string());
            rest = tail;
            found = true;
        }
        assert!(found, "no method found on the route line {line:?}");
    }
    routes
}

/// The first `get(module::handler)` (or `axum::routing::delete(…)`, …) in `text`.
fn next_method(text: &str) -> Option<(&'static str, &str, &str)> {
    let (at, method) = METHODS
        .iter()
        .filter_map(|m| {
            let needle = format!("{m}(");
            text.match_indices(&needle)
                .find(|(i, _)| {
                    *i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric() && text.as_bytes()[i - 1] != b'_'
                })
                .map(|(i, _)| (i, *m))
        })
        .min()?;
    let after = &text[at + method.len() + 1..];
    let (handler, tail) = after.split_once(')').unwrap();
    Some((method, handler, tail))
}

/// A handler's signature and body, from `pub async fn name(` to its closing brace.
fn handler_source(handler: &str) -> (&'static str, &'static str) {
    let (module, name) = handler.split_once("::").unwrap_or_else(|| panic!("handler {handler:?} is not module::fn"));
    let src = sources()[module];
    let start =
        src.find(&format!("pub async fn {name}(")).unwrap_or_else(|| panic!("no `pub async fn {name}(` in {module}"));
    let rest = &src[start..];
    let end = rest.find("\n}\n").unwrap_or_else(|| panic!("{handler}: no closing brace at the line start")) + 2;
    let item = &rest[..end];
    let signature_end = item.find('{').unwrap();
    (&item[..signature_end], &item[signature_end..])
}

/// Whether `body` calls `call…)` and passes its error on with `?`.
fn propagates(body: &str, call: &str) -> bool {
    body.match_indices(call).any(|(i, _)| body[i..].split_once(')').is_some_and(|(_, after)| after.starts_with('?')))
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(METHODS.contains(&method.as_str()), "{path}: {method:?} is not an HTTP method we serve");
            ops.push((path.clone(), method.clone(), op));
        }
    }
    ops
}

#[test]
fn openapi_lists_every_route_and_method() {
    let doc = doc();
    let routed: BTreeSet<(String, String)> = routes().into_keys().collect();
    let documented: BTreeSet<(String, String)> =
        operations(&doc).into_iter().map(|(path, method, _)| (path, method)).collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from openapi.json: {undocumented:?}");
    assert!(unrouted.is_empty(), "operations in openapi.json that no route serves: {unrouted:?}");
}

/// Follows `$ref`s within the document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = doc.pointer(r.strip_prefix('#').unwrap()).unwrap_or_else(|| panic!("dangling $ref {r}"));
            resolve(doc, target)
        }
        None => v,
    }
}

fn every_ref(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|v| every_ref(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| every_ref(v, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves_and_every_component_schema_is_used() {
    let doc = doc();
    let mut refs = Vec::new();
    every_ref(&doc, &mut refs);
    for r in &refs {
        assert!(r.starts_with("#/"), "{r}: only references within the document");
        assert!(doc.pointer(&r[1..]).is_some(), "dangling $ref {r}");
    }
    for name in doc["components"]["schemas"].as_object().unwrap().keys() {
        let r = format!("#/components/schemas/{name}");
        assert!(refs.contains(&r), "component schema {name} is never used");
    }
}

#[test]
fn every_operation_documents_its_bodies_parameters_and_statuses() {
    let doc = doc();
    let routes = routes();
    let mut problems = Vec::new();
    for (path, method, op) in operations(&doc) {
        let name = format!("{} {path}", method.to_uppercase());
        let mut problem = |p: String| problems.push(format!("{name}: {p}"));
        let handler = &routes[&(path.clone(), method.clone())];
        let (signature, body) = handler_source(handler);
        let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{name}: no responses"));
        let statuses: BTreeSet<&str> = responses.keys().map(String::as_str).collect();
        let has = |s: &str| statuses.contains(s);

        // Statuses: exact codes only (no `4XX`, no `default`), each with a description; each
        // answer with a body has a schema; errors share the one error schema.
        for (status, response) in responses {
            let response = resolve(&doc, response);
            if status.parse::<u16>().is_err() {
                problem(format!("status {status:?} is not an exact code"));
                continue;
            }
            if response["description"].as_str().is_none_or(str::is_empty) {
                problem(format!("{status} has no description"));
            }
            if status == "204" {
                if response.get("content").is_some() {
                    problem("204 has no body, so no content".into());
                }
                continue;
            }
            let content = response["content"].as_object();
            let Some(content) = content.filter(|c| !c.is_empty()) else {
                problem(format!("{status} has no content type and schema"));
                continue;
            };
            for (media, c) in content {
                if c.get("schema").is_none() {
                    problem(format!("{status} {media} has no schema"));
                }
            }
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &content.get("application/json").map(|c| &c["schema"]);
                let error_schema = schema.and_then(|s| s["$ref"].as_str());
                if !matches!(error_schema, Some("#/components/schemas/Error" | "#/components/schemas/Refusal")) {
                    problem(format!("{status} does not use the shared error schema"));
                }
            }
        }
        if !statuses.iter().any(|s| s.starts_with('2')) {
            problem("no 2xx answer".into());
        }

        // Statuses the handler's code can answer.
        let authenticated = signature.contains("Caller");
        if authenticated != op.get("security").is_some() {
            problem(format!(
                "security is documented {}, the handler takes a Caller: {authenticated}",
                op.get("security").is_some()
            ));
        }
        let reads_body = signature.contains("Json(");
        let needs = [
            (authenticated, "401", "takes a credential"),
            (signature.contains("Path("), "400", "reads a path segment (not UTF-8 once decoded)"),
            (signature.contains("Query("), "400", "reads a query string"),
            (reads_body, "400", "reads a JSON body"),
            (reads_body, "413", "reads a body the size limit applies to"),
            (body.contains("require_admin"), "403", "needs the admin"),
            (propagates(body, "require_account(") || body.contains("account(&s, &caller"), "404", "checks the account"),
            (body.contains("StatusCode::CREATED"), "201", "answers 201 Created"),
            (body.contains("StatusCode::NO_CONTENT"), "204", "answers 204 No Content"),
            (body.contains("ApiError::Refused") || body.contains("HoldOutcome::Refused"), "429", "refuses with 429"),
            (body.contains("ApiError::Conflict") || body.contains("denied"), "409", "answers 409"),
        ];
        for (applies, status, why) in needs {
            if applies && !has(status) {
                problem(format!("the handler {why}, but {status} is not documented"));
            }
        }
        if has("201") && !body.contains("StatusCode::CREATED") {
            problem("201 is documented, but the handler never answers it".into());
        }
        if has("200") && (body.contains("StatusCode::CREATED") || body.contains("StatusCode::NO_CONTENT")) {
            let replays = body.contains("StatusCode::OK");
            if !replays {
                problem("200 is documented, but the handler answers 201/204".into());
            }
        }

        // A request body exactly where the handler reads one, with a schema and required.
        match (reads_body, op.get("requestBody")) {
            (true, Some(rb)) => {
                if rb["required"] != Value::Bool(true) {
                    problem("requestBody is not required".into());
                }
                if rb["content"]["application/json"]["schema"].is_null() {
                    problem("requestBody has no application/json schema".into());
                }
            }
            (true, None) => problem("the handler reads a JSON body, but no requestBody is documented".into()),
            (false, Some(_)) => problem("a requestBody is documented, but the handler reads none".into()),
            (false, None) => {}
        }

        // Every path template parameter is documented, required, in the path.
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        for segment in path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))) {
            let documented = params.iter().any(|p| p["name"] == segment && p["in"] == "path" && p["required"] == true);
            if !documented {
                problem(format!("path parameter {segment} is not documented as required in the path"));
            }
        }
        for p in &params {
            if p["schema"].is_null() {
                problem(format!("parameter {} has no schema", p["name"]));
            }
        }
        if op["operationId"].as_str().is_none() {
            problem("no operationId".into());
        }
    }
    assert!(problems.is_empty(), "openapi.json disagrees with the handlers:\n{}", problems.join("\n"));
}

/// Request-body schemas of handlers that refuse unknown fields say so, and name every field
/// with its type: a body schema is an object (or a choice of objects) whose properties all
/// have a type or a reference.
#[test]
fn request_bodies_are_closed_objects_with_typed_fields() {
    let doc = doc();
    let mut problems = Vec::new();
    for (path, method, op) in operations(&doc) {
        let Some(schema) = op.get("requestBody").map(|rb| &rb["content"]["application/json"]["schema"]) else {
            continue;
        };
        let choices: Vec<&Value> = match schema.get("oneOf").and_then(Value::as_array) {
            Some(choices) => choices.iter().collect(),
            None => vec![schema],
        };
        for choice in choices {
            let s = resolve(&doc, choice);
            let name = format!("{} {path}", method.to_uppercase());
            if s["type"] != "object" || s["additionalProperties"] != Value::Bool(false) {
                problems.push(format!("{name}: the body is not an object refusing unknown fields"));
            }
            for (field, f) in s["properties"].as_object().into_iter().flatten() {
                let typed = f.get("type").is_some() || f.get("$ref").is_some() || f.get("anyOf").is_some();
                if !typed {
                    problems.push(format!("{name}: field {field} has no type"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
