//! Bad input through the real router (SPEC section 5: "Every input is validated … with a message
//! that says what to fix"; an account's keys reach only their own account).
//!
//! Every case asserts a clear 4xx status, an error body `{"error":{"code","message"}}` whose
//! message names what to fix, and that neither account's ledger moved: both balances and both
//! event lists are byte-identical before and after. A positive control shows that a valid event
//! does move the balance, so the "unchanged" assertions can fail.

include!("common/api.rs");

#[tokio::test]
async fn positive_control_valid_event_and_hold_change_the_balance() {
    let api = Api::new().await;
    let before = api.snapshot().await;
    assert_eq!(used_usd(&before.balance_a, "programmatic"), "0.006");
    let key_a = api.key_a.clone();
    let r = api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key_a), event("evt-a2", A)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let after = api.snapshot().await;
    assert_ne!(before.balance_a, after.balance_a, "a valid event must change A's balance");
    assert_ne!(before.events_a, after.events_a);
    assert_eq!(used_usd(&after.balance_a, "programmatic"), "0.012");
    assert_eq!(before.balance_b, after.balance_b, "A's event must not touch B");
    assert_eq!(before.events_b, after.events_b);

    // The same event again is a duplicate: 200, and nothing moves.
    let r = api.call(Method::POST, "/api/v1/events", Auth::ApiKey(&key_a), event("evt-a2", A)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["status"], "duplicate");
    assert_eq!(api.snapshot().await, after);

    // A valid hold moves held_usd.
    let r = api
        .call(
            Method::POST,
            &format!("/api/v1/accounts/{A}/holds"),
            Auth::Bearer(&key_a),
            json!({"pool": "programmatic", "amount_usd": "1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let held = api.snapshot().await;
    let v: Value = serde_json::from_slice(&held.balance_a).unwrap();
    assert_eq!(v["pools"]["programmatic"]["held_usd"], "1.25");
}

#[tokio::test]
async fn negative_token_counts_are_refused() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    for field in ["input_tokens", "output_tokens", "cache_read_input_tokens", "web_search_requests"] {
        let body = with(event("evt-neg", A), &format!("/usage/{field}"), json!(-5));
        let path = format!("usage.{field}");
        api.refused(
            &format!("event with negative {field}"),
            async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
            want(BAD, INVALID, &[&path]),
        )
        .await;
    }
    // In a batch, the bad event names its index and nothing of the batch is recorded.
    let batch = json!({"events": [
        event("evt-ok-1", A),
        with(event("evt-neg-2", A), "/usage/output_tokens", json!(-1)),
    ]});
    api.refused(
        "batch with one negative count",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), batch).await,
        want(BAD, INVALID, &["events at [1].usage.output_tokens"]),
    )
    .await;
    // A hold priced from an estimate, and a settle with usage.
    api.refused(
        "hold estimate with negative tokens",
        async |api| {
            let body = json!({"pool": "programmatic",
                "estimate": {"model": "claude-sonnet-4-5", "usage": {"input_tokens": -100}}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["estimate.usage.input_tokens"]),
    )
    .await;
    api.refused(
        "settle with negative tokens",
        async |api| {
            let body = json!({"usage": {"input_tokens": 10, "output_tokens": -3}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds/hold-a1/settle"), Auth::Bearer(&key), body)
                .await
        },
        want(BAD, INVALID, &["usage.output_tokens"]),
    )
    .await;
}

/// Issue 13, finding 3: the cost-only settle stored what it was given (NUL, escapes, line breaks,
/// a 1 MB model name), which then broke tables and reports; every stored string is checked.
#[tokio::test]
async fn a_settle_stores_no_hostile_string() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let settle = format!("/api/v1/accounts/{A}/holds/hold-a1/settle");
    // Longer than a model may be, within this server's body limit (a 1 MB one is a 413 here).
    let huge = "m".repeat(10_000);
    for (name, field, value) in [
        ("a model with NUL", "model", "claude\u{0}x"),
        ("a model with an escape", "model", "\u{1b}[31mred"),
        ("a model with a line break", "model", "a\r\nb"),
        ("a 10,000-character model", "model", huge.as_str()),
        ("a source with an escape", "source", "\u{1b}]8;;http://x\u{7}"),
    ] {
        let body = json!({"cost_usd": "0.01", field: value});
        api.refused(
            &format!("cost-only settle with {name}"),
            async |api| api.call(Method::POST, &settle, Auth::Bearer(&key), body).await,
            want(BAD, INVALID, &[field, "control characters"]),
        )
        .await;
    }
    let body = json!({"cost_usd": "0.01", "labels": {"team": "=HYPERLINK(\"x\")\u{0}"}});
    api.refused(
        "cost-only settle with a control character in a label",
        async |api| api.call(Method::POST, &settle, Auth::Bearer(&key), body).await,
        want(BAD, INVALID, &["label \"team\"", "control characters"]),
    )
    .await;
}

#[tokio::test]
async fn absurd_token_counts_are_refused() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    for field in ["input_tokens", "output_tokens", "cache_creation_1h_input_tokens"] {
        let body = with(event("evt-huge", A), &format!("/usage/{field}"), json!(100_000_001u64));
        let path = format!("usage.{field}");
        api.refused(
            &format!("event with {field} above the per-call bound"),
            async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
            want(BAD, INVALID, &[&path, "100000001", "at most 100000000"]),
        )
        .await;
    }
    // Beyond u64 and beyond i64: refused by the parser, naming the field.
    for raw in ["18446744073709551616", "99999999999999999999999999999"] {
        let text = format!(
            r#"{{"id":"evt-huge","account":"{A}","pool":"programmatic","model":"claude-sonnet-4-5","usage":{{"input_tokens":{raw}}}}}"#
        );
        api.refused(
            &format!("event with input_tokens {raw}"),
            async |api| api.raw(Method::POST, "/api/v1/events", Auth::Bearer(&key), text).await,
            want(BAD, INVALID, &["usage.input_tokens"]),
        )
        .await;
    }
    // Fractional counts are not counts.
    let body = with(event("evt-frac", A), "/usage/input_tokens", json!(1.5));
    api.refused(
        "event with fractional tokens",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
        want(BAD, INVALID, &["usage.input_tokens"]),
    )
    .await;
    api.refused(
        "hold estimate with absurd tokens",
        async |api| {
            let body = json!({"pool": "programmatic",
                "estimate": {"model": "claude-sonnet-4-5", "usage": {"output_tokens": 500_000_000u64}}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["usage.output_tokens", "at most 100000000"]),
    )
    .await;
    api.refused(
        "web search requests above their bound",
        async |api| {
            let body = with(event("evt-ws", A), "/usage/web_search_requests", json!(100_001));
            api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["usage.web_search_requests", "at most 100000"]),
    )
    .await;
}

#[tokio::test]
async fn unknown_models_are_refused_with_how_to_price_them() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let body = with(event("evt-model", A), "/model", json!("claude-imaginary-9"));
    api.refused(
        "event with unknown model",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
        want(BAD, INVALID, &["\"claude-imaginary-9\"", "[[price]]", "unknown_model", "cost_usd"]),
    )
    .await;
    api.refused(
        "hold estimate with unknown model",
        async |api| {
            let body = json!({"pool": "programmatic",
                "estimate": {"model": "gpt-imaginary", "usage": {"input_tokens": 10}}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["\"gpt-imaginary\"", "[[price]]"]),
    )
    .await;
    api.refused(
        "settle naming an unknown model",
        async |api| {
            let body = json!({"model": "claude-imaginary-9", "usage": {"input_tokens": 10}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds/hold-a1/settle"), Auth::Bearer(&key), body)
                .await
        },
        want(BAD, INVALID, &["\"claude-imaginary-9\""]),
    )
    .await;
    api.refused(
        "empty model",
        async |api| {
            let body = with(event("evt-model", A), "/model", json!(""));
            api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["model"]),
    )
    .await;
    // cost_usd for a model tollgate prices itself would let a caller pick its own price.
    api.refused(
        "cost_usd on a priced model",
        async |api| {
            let body = plus(event("evt-cost", A), "cost_usd", json!("0.000001"));
            api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["cost_usd", "claude-sonnet-4-5"]),
    )
    .await;
}

#[tokio::test]
async fn unknown_pools_are_refused() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let body = with(event("evt-pool", A), "/pool", json!("batch"));
    api.refused(
        "event with unknown pool",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
        want(BAD, INVALID, &["\"batch\"", "interactive or programmatic"]),
    )
    .await;
    api.refused(
        "hold with unknown pool",
        async |api| {
            let body = json!({"pool": "Programmatic", "amount_usd": "1"});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["\"Programmatic\"", "interactive or programmatic"]),
    )
    .await;
    api.refused(
        "pool policy for an unknown pool",
        async |api| {
            api.call(
                Method::PUT,
                &format!("/api/v1/accounts/{A}/pools/overflow"),
                Auth::Bearer(ADMIN),
                json!({"on_exhausted": "alert"}),
            )
            .await
        },
        want(BAD, INVALID, &["\"overflow\"", "interactive or programmatic"]),
    )
    .await;
    api.refused(
        "grant for an unknown pool",
        async |api| {
            api.call(
                Method::POST,
                &format!("/api/v1/accounts/{A}/grants"),
                Auth::Bearer(ADMIN),
                json!({"pool": "both", "amount_usd": "5"}),
            )
            .await
        },
        want(BAD, INVALID, &["\"both\"", "interactive or programmatic"]),
    )
    .await;
}

#[tokio::test]
async fn malformed_json_is_refused() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let holds = format!("/api/v1/accounts/{A}/holds");
    let settle = format!("/api/v1/accounts/{A}/holds/hold-a1/settle");
    let cases: [(&str, &str, &[u8]); 6] = [
        ("truncated event", "/api/v1/events", br#"{"id":"evt-x","account":"acme","#),
        ("trailing garbage", "/api/v1/events", br#"{"id":"evt-x"} xyz"#),
        ("empty body", "/api/v1/events", b""),
        ("not UTF-8", "/api/v1/events", b"{\"id\":\"\xff\xfe\"}"),
        ("truncated hold", &holds, br#"{"pool":"programmatic","amount_usd":"#),
        ("single quotes in settle", &settle, b"{'cost_usd': '1'}"),
    ];
    for (case, path, body) in cases {
        api.refused(
            case,
            async |api| api.raw(Method::POST, path, Auth::Bearer(&key), body.to_vec()).await,
            want(BAD, INVALID, &["invalid JSON body"]),
        )
        .await;
    }
    // JSON sent as something else.
    api.refused(
        "text/plain body",
        async |api| {
            let body = Body::from(event("evt-x", A).to_string());
            api.send(Method::POST, "/api/v1/events", Auth::Bearer(&key), Some("text/plain"), body).await
        },
        want(BAD, INVALID, &["Content-Type: application/json"]),
    )
    .await;
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_refused() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let holds = format!("/api/v1/accounts/{A}/holds");
    let cases: Vec<(&str, &str, Value, Vec<&str>)> = vec![
        ("event missing model", "/api/v1/events", without(event("e1", A), "model"), vec!["missing field `model`"]),
        ("event missing usage", "/api/v1/events", without(event("e1", A), "usage"), vec!["missing field `usage`"]),
        ("event missing id", "/api/v1/events", without(event("e1", A), "id"), vec!["missing field `id`"]),
        ("usage as a string", "/api/v1/events", with(event("e1", A), "/usage", json!("lots")), vec!["usage"]),
        (
            "token count as a string",
            "/api/v1/events",
            with(event("e1", A), "/usage/input_tokens", json!("1000")),
            vec!["usage.input_tokens"],
        ),
        ("account as a number", "/api/v1/events", with(event("e1", A), "/account", json!(7)), vec!["account"]),
        ("labels as a list", "/api/v1/events", with(event("e1", A), "/labels", json!(["x"])), vec!["labels"]),
        ("unknown field", "/api/v1/events", plus(event("e1", A), "colour", json!("red")), vec!["colour"]),
        ("an array", "/api/v1/events", json!([event("e1", A)]), vec!["one event object or {\"events\": [...]}"]),
        ("a string", "/api/v1/events", json!("evt"), vec!["one event object"]),
        ("empty batch", "/api/v1/events", json!({"events": []}), vec!["1 to 1000 events"]),
        (
            "batch with extra fields",
            "/api/v1/events",
            json!({"events": [event("e1", A)], "x": 1}),
            vec!["no other fields"],
        ),
        ("batch not a list", "/api/v1/events", json!({"events": event("e1", A)}), vec!["events"]),
        ("hold missing pool", &holds, json!({"amount_usd": "1"}), vec!["missing field `pool`"]),
        ("hold pool as a number", &holds, json!({"pool": 1, "amount_usd": "1"}), vec!["pool"]),
        (
            "hold amount as an object",
            &holds,
            json!({"pool": "programmatic", "amount_usd": {"usd": 1}}),
            vec!["amount_usd"],
        ),
        ("hold amount not a number", &holds, json!({"pool": "programmatic", "amount_usd": "ten"}), vec!["amount_usd"]),
        (
            "hold with neither amount nor estimate",
            &holds,
            json!({"pool": "programmatic"}),
            vec!["amount_usd", "estimate"],
        ),
        (
            "hold with both amount and estimate",
            &holds,
            json!({"pool": "programmatic", "amount_usd": "1",
                   "estimate": {"model": "claude-sonnet-4-5", "usage": {"input_tokens": 1}}}),
            vec!["exactly one of amount_usd or estimate"],
        ),
        ("hold ttl zero", &holds, json!({"pool": "programmatic", "amount_usd": "1", "ttl_s": 0}), vec!["ttl_s"]),
        (
            "hold ttl too long",
            &holds,
            json!({"pool": "programmatic", "amount_usd": "1", "ttl_s": 86400}),
            vec!["ttl_s", "3600"],
        ),
        (
            "hold unknown field",
            &holds,
            json!({"pool": "programmatic", "amount_usd": "1", "colour": "red"}),
            vec!["colour"],
        ),
        (
            "event with a bad timestamp",
            "/api/v1/events",
            plus(event("e1", A), "timestamp", json!("yesterday")),
            vec!["timestamp", "\"yesterday\"", "RFC 3339"],
        ),
        (
            "event from the future",
            "/api/v1/events",
            plus(event("e1", A), "timestamp", json!("2026-11-25T11:00:00Z")),
            vec!["timestamp", "in the future"],
        ),
        ("event with a bad id", "/api/v1/events", with(event("e1", A), "/id", json!("evt one")), vec!["event id"]),
    ];
    for (case, path, body, needles) in cases {
        api.refused(
            case,
            async |api| api.call(Method::POST, path, Auth::Bearer(&key), body).await,
            want(BAD, INVALID, &needles),
        )
        .await;
    }
}

#[tokio::test]
async fn reused_ids_with_different_content_conflict() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    // evt-a1 exists with 1000 input tokens; the same id with other content is a conflict.
    let body = with(event("evt-a1", A), "/usage/input_tokens", json!(1));
    api.refused(
        "event id reused with different content",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
        want(StatusCode::CONFLICT, "conflict", &["evt-a1"]),
    )
    .await;
    api.refused(
        "hold id reused with a different amount",
        async |api| {
            let body =
                json!({"id": "hold-a1", "pool": "programmatic", "amount_usd": "5", "model": "claude-sonnet-4-5"});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(StatusCode::CONFLICT, "conflict", &["hold-a1"]),
    )
    .await;
}

#[tokio::test]
async fn unknown_credentials_are_401() {
    let api = Api::new().await;
    let bad_bearer = Auth::Bearer("tg_0000000000000000000000000000000000000000000000");
    let bad_api_key = Auth::ApiKey("tg_ffffffffffffffffffffffffffffffffffffffffffffffff");
    let unauthorized = StatusCode::UNAUTHORIZED;
    for (name, auth) in [("unknown bearer token", bad_bearer), ("unknown x-api-key", bad_api_key)] {
        api.refused(
            &format!("{name}: post event"),
            async |api| api.call(Method::POST, "/api/v1/events", auth, event("evt-401", A)).await,
            want(unauthorized, "unauthorized", &["unknown credential"]),
        )
        .await;
        api.refused(
            &format!("{name}: read balance"),
            async |api| api.get(&format!("/api/v1/accounts/{A}/balance"), auth).await,
            want(unauthorized, "unauthorized", &["unknown credential"]),
        )
        .await;
        api.refused(
            &format!("{name}: create hold"),
            async |api| {
                let body = json!({"pool": "programmatic", "amount_usd": "1"});
                api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), auth, body).await
            },
            want(unauthorized, "unauthorized", &["unknown credential"]),
        )
        .await;
    }
    api.refused(
        "no credential",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::None, event("evt-401", A)).await,
        want(unauthorized, "unauthorized", &["missing credential", "Authorization: Bearer"]),
    )
    .await;
    // The admin token with a typo, and the key of one account with its last character changed.
    let typo = format!("{ADMIN}x");
    let mut near = api.key_a.clone();
    near.pop();
    near.push('z');
    for (name, secret) in [("admin token with a typo", typo.as_str()), ("near-miss account key", near.as_str())] {
        api.refused(
            name,
            async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(secret), event("evt-401", A)).await,
            want(unauthorized, "unauthorized", &["unknown credential"]),
        )
        .await;
    }
}

/// Another account's key gets exactly what it would get for an account that does not exist.
#[tokio::test]
async fn an_account_key_cannot_reach_another_account() {
    let api = Api::new().await;
    let key_a = api.key_a.clone();
    let auth = Auth::Bearer(&key_a);
    let not_found = StatusCode::NOT_FOUND;
    let secrets_of_b = ["evt-b1", "hold-b1", "\"pro\"", "0.006", "0.25", "bot"];
    for path in [
        format!("/api/v1/accounts/{B}"),
        format!("/api/v1/accounts/{B}/balance"),
        format!("/api/v1/accounts/{B}/events"),
        format!("/api/v1/accounts/{B}/pools"),
        format!("/api/v1/accounts/{B}/grants"),
        format!("/api/v1/accounts/{B}/holds/hold-b1"),
    ] {
        let error = api
            .refused(&format!("GET {path}"), async |api| api.get(&path, auth).await, want(not_found, "not_found", &[B]))
            .await;
        let message = error["message"].as_str().unwrap();
        for secret in secrets_of_b {
            assert!(!message.contains(secret), "GET {path} leaks {secret}: {message}");
        }
        // Same answer as for an account that does not exist.
        let ghost = api.get(&path.replace(B, "nobody"), auth).await;
        assert_eq!(ghost.status, not_found, "GET {path} for a missing account: {}", ghost.text());
        assert_eq!(
            ghost.text().replace("nobody", B),
            String::from_utf8_lossy(&serde_json::to_vec(&json!({"error": error})).unwrap())
        );
    }
    api.refused(
        "post an event for another account",
        async |api| api.call(Method::POST, "/api/v1/events", auth, event("evt-x", B)).await,
        want(not_found, "not_found", &[B]),
    )
    .await;
    api.refused(
        "batch with one event of another account",
        async |api| {
            let body = json!({"events": [event("evt-x1", A), event("evt-x2", B)]});
            api.call(Method::POST, "/api/v1/events", auth, body).await
        },
        want(not_found, "not_found", &[B]),
    )
    .await;
    api.refused(
        "hold on another account",
        async |api| {
            let body = json!({"pool": "programmatic", "amount_usd": "1"});
            api.call(Method::POST, &format!("/api/v1/accounts/{B}/holds"), auth, body).await
        },
        want(not_found, "not_found", &[B]),
    )
    .await;
    // The account list shows only the caller's own account.
    let r = api.get("/api/v1/accounts", auth).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let accounts = r.json();
    let ids: Vec<&str> = accounts["accounts"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![A], "an account key lists only its own account");
    // Admin-only actions on its own account are 403, and name what is needed.
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/accounts/{A}/keys"), Value::Null),
        (Method::POST, format!("/api/v1/accounts/{A}/keys"), json!({})),
        (Method::PUT, format!("/api/v1/accounts/{A}/pools/programmatic"), json!({"on_exhausted": "alert"})),
        (Method::POST, format!("/api/v1/accounts/{A}/grants"), json!({"pool": "programmatic", "amount_usd": "100"})),
        (Method::PATCH, format!("/api/v1/accounts/{A}"), json!({"tier": "max-20x"})),
    ] {
        api.refused(
            &format!("{method} {path} with an account key"),
            async |api| {
                if body.is_null() {
                    api.get(&path, auth).await
                } else {
                    api.call(method.clone(), &path, auth, body).await
                }
            },
            want(StatusCode::FORBIDDEN, "forbidden", &["admin token"]),
        )
        .await;
    }
}

#[tokio::test]
async fn another_accounts_hold_cannot_be_settled_or_voided() {
    let api = Api::new().await;
    let key_a = api.key_a.clone();
    let auth = Auth::Bearer(&key_a);
    let settle = json!({"cost_usd": "0.01", "model": "claude-sonnet-4-5"});
    // Through B's path, and through A's own path naming B's hold id.
    for (case, path) in [
        ("settle B's hold under B", format!("/api/v1/accounts/{B}/holds/hold-b1/settle")),
        ("settle B's hold under A", format!("/api/v1/accounts/{A}/holds/hold-b1/settle")),
    ] {
        let error = api
            .refused(
                case,
                async |api| api.call(Method::POST, &path, auth, settle.clone()).await,
                want(StatusCode::NOT_FOUND, "not_found", &[]),
            )
            .await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("not found"), "{case}: {message}");
        assert!(!message.contains("0.25"), "{case} leaks the hold amount: {message}");
    }
    for (case, path) in [
        ("void B's hold under B", format!("/api/v1/accounts/{B}/holds/hold-b1/void")),
        ("void B's hold under A", format!("/api/v1/accounts/{A}/holds/hold-b1/void")),
    ] {
        api.refused(
            case,
            async |api| api.raw(Method::POST, &path, auth, "").await,
            want(StatusCode::NOT_FOUND, "not_found", &["not found"]),
        )
        .await;
    }
    // B's hold is still open, untouched.
    let r = api.get(&format!("/api/v1/accounts/{B}/holds/hold-b1"), Auth::Bearer(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["state"], "open");
    assert_eq!(r.json()["amount_usd"], "0.25");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let mut big = event("evt-big", A);
    big["source"] = json!("x".repeat(BODY_MAX + 1));
    let limit = BODY_MAX.to_string();
    api.refused(
        "event body over api_body_size_bytes_max",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), big).await,
        want(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &[&limit, "bytes"]),
    )
    .await;
    let batch = json!({"events": (0..400).map(|i| event(&format!("evt-batch-{i}"), A)).collect::<Vec<_>>()});
    assert!(batch.to_string().len() > BODY_MAX);
    api.refused(
        "batch over api_body_size_bytes_max",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), batch).await,
        want(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &[&limit, "smaller batches"]),
    )
    .await;
    api.refused(
        "hold body over api_body_size_bytes_max",
        async |api| {
            let body = json!({"pool": "programmatic", "amount_usd": "1", "source": "y".repeat(BODY_MAX * 4)});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &[&limit]),
    )
    .await;
    // Just under the limit is not refused for its size (it is for its too-long source).
    let mut under = event("evt-under", A);
    let overhead = under.to_string().len() + r#","source":"""#.len();
    under["source"] = json!("x".repeat(BODY_MAX - overhead));
    api.refused(
        "body just under the limit",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), under).await,
        want(BAD, INVALID, &["source", "at most 128"]),
    )
    .await;
}

#[tokio::test]
async fn negative_amounts_are_refused() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let holds = format!("/api/v1/accounts/{A}/holds");
    for amount in [json!("-5"), json!(-5), json!("-0.000000001")] {
        api.refused(
            &format!("hold with amount {amount}"),
            async |api| {
                api.call(
                    Method::POST,
                    &holds,
                    Auth::Bearer(&key),
                    json!({"pool": "programmatic", "amount_usd": amount}),
                )
                .await
            },
            want(BAD, INVALID, &["amount_usd must not be negative"]),
        )
        .await;
    }
    api.refused(
        "settle with a negative cost",
        async |api| {
            api.call(
                Method::POST,
                &format!("/api/v1/accounts/{A}/holds/hold-a1/settle"),
                Auth::Bearer(&key),
                json!({"cost_usd": "-1"}),
            )
            .await
        },
        want(BAD, INVALID, &["cost_usd must not be negative"]),
    )
    .await;
    api.refused(
        "negative grant",
        async |api| {
            api.call(
                Method::POST,
                &format!("/api/v1/accounts/{A}/grants"),
                Auth::Bearer(ADMIN),
                json!({"pool": "programmatic", "amount_usd": "-100"}),
            )
            .await
        },
        want(BAD, INVALID, &["amount_usd must not be negative"]),
    )
    .await;
    api.refused(
        "negative spend cap",
        async |api| {
            api.call(
                Method::PUT,
                &format!("/api/v1/accounts/{A}/pools/programmatic"),
                Auth::Bearer(ADMIN),
                json!({"spend_cap_usd": "-1"}),
            )
            .await
        },
        want(BAD, INVALID, &["spend_cap_usd must not be negative"]),
    )
    .await;
}

/// Query-string and path errors are errors of the API too: same JSON shape.
#[tokio::test]
async fn bad_query_strings_get_the_json_error_shape() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    api.refused(
        "events limit out of range",
        async |api| api.get(&format!("/api/v1/accounts/{A}/events?limit=0"), Auth::Bearer(&key)).await,
        want(BAD, INVALID, &["limit", "between 1 and 1000"]),
    )
    .await;
    api.refused(
        "events since not a time",
        async |api| api.get(&format!("/api/v1/accounts/{A}/events?since=monday"), Auth::Bearer(&key)).await,
        want(BAD, INVALID, &["since", "RFC 3339"]),
    )
    .await;
    api.refused(
        "events with an unknown pool filter",
        async |api| api.get(&format!("/api/v1/accounts/{A}/events?pool=batch"), Auth::Bearer(&key)).await,
        want(BAD, INVALID, &["\"batch\""]),
    )
    .await;
}

/// What axum's own extractors refuse (query string, path segment) is refused in the API's shape
/// too, naming the parameter.
#[tokio::test]
async fn unparsable_query_and_path_get_the_json_error_shape() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    for (query, expected) in [
        ("limit=abc", "whole number"),
        ("after=x", "whole number"),
        ("limit=1.5", "whole number"),
        ("limit=99999999999999999999", "out of range"),
        ("limit=-1", "between 1 and 1000"),
        ("colour=red", "expected one of `pool`, `model`, `since`, `until`, `after`, `limit`"),
    ] {
        let field = query.split('=').next().unwrap();
        api.refused(
            &format!("events?{query}"),
            async |api| api.get(&format!("/api/v1/accounts/{A}/events?{query}"), Auth::Bearer(&key)).await,
            want(BAD, INVALID, &[field, expected]),
        )
        .await;
    }
    api.refused(
        "price on an unknown query parameter",
        async |api| api.get("/api/v1/prices/claude-sonnet-4-5?day=2026-01-01", Auth::Bearer(&key)).await,
        want(BAD, INVALID, &["day", "`date`"]),
    )
    .await;
    api.refused(
        "path segment not UTF-8",
        async |api| api.get("/api/v1/accounts/%FF/balance", Auth::Bearer(&key)).await,
        want(BAD, INVALID, &["UTF-8"]),
    )
    .await;
}

/// A known route with a method it does not serve: 405 in the API's shape, naming what is allowed.
#[tokio::test]
async fn wrong_method_gets_the_json_error_shape() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    let balance = format!("/api/v1/accounts/{A}/balance");
    let account = format!("/api/v1/accounts/{A}");
    let cases: [(Method, &str, &[&str]); 4] = [
        (Method::DELETE, "/api/v1/events", &["DELETE", "/api/v1/events", "allowed: POST"]),
        (Method::GET, "/api/v1/events", &["GET", "allowed: POST"]),
        (Method::POST, &balance, &["POST", "allowed: GET, HEAD"]),
        (Method::DELETE, &account, &["DELETE", "GET", "PATCH"]),
    ];
    for (method, path, needles) in cases {
        api.refused(
            &format!("{method} {path}"),
            async |api| api.send(method.clone(), path, Auth::Bearer(&key), None, Body::empty()).await,
            want(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", needles),
        )
        .await;
    }
    // Without a credential too: the route and method are public facts, the ledger is not touched.
    api.refused(
        "wrong method, no credential",
        async |api| api.send(Method::PUT, "/api/v1/events", Auth::None, None, Body::empty()).await,
        want(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &["PUT", "POST"]),
    )
    .await;
}

/// A count that is not a whole number from 0 to the per-call bound says what a count is, the
/// same for events (parsed through `serde_json::Value` with `arbitrary_precision`), holds and settles.
#[tokio::test]
async fn event_token_count_errors_say_what_a_count_is() {
    let api = Api::new().await;
    let key = api.key_a.clone();
    const COUNT: &str = "whole number from 0 to 100000000";
    for (value, shown) in [(json!(-5), "-5"), (json!(1.5), "1.5"), (json!("12"), "\"12\"")] {
        let body = with(event("evt-neg", A), "/usage/input_tokens", value);
        api.refused(
            &format!("event with input_tokens {shown}"),
            async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await,
            want(BAD, INVALID, &["usage.input_tokens", shown, COUNT]),
        )
        .await;
    }
    let raw = "18446744073709551616";
    let text = format!(
        r#"{{"id":"evt-big","account":"{A}","pool":"programmatic","model":"claude-sonnet-4-5","usage":{{"input_tokens":{raw}}}}}"#
    );
    api.refused(
        "event with input_tokens beyond u64",
        async |api| api.raw(Method::POST, "/api/v1/events", Auth::Bearer(&key), text).await,
        want(BAD, INVALID, &["usage.input_tokens", raw, COUNT]),
    )
    .await;
    let batch = json!({"events": [event("evt-ok", A), with(event("evt-bad", A), "/usage/output_tokens", json!(-1))]});
    api.refused(
        "batch with a negative count",
        async |api| api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), batch).await,
        want(BAD, INVALID, &["events at [1].usage.output_tokens", "-1", COUNT]),
    )
    .await;
    api.refused(
        "event with negative web search requests",
        async |api| {
            let body = with(event("evt-ws", A), "/usage/web_search_requests", json!(-1));
            api.call(Method::POST, "/api/v1/events", Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["usage.web_search_requests", "whole number from 0 to 100000"]),
    )
    .await;
    api.refused(
        "hold estimate with a negative count",
        async |api| {
            let body = json!({"pool": "programmatic",
                "estimate": {"model": "claude-sonnet-4-5", "usage": {"input_tokens": -100}}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds"), Auth::Bearer(&key), body).await
        },
        want(BAD, INVALID, &["estimate.usage.input_tokens", "-100", COUNT]),
    )
    .await;
    api.refused(
        "settle with a fractional count",
        async |api| {
            let body = json!({"usage": {"output_tokens": 2.5}});
            api.call(Method::POST, &format!("/api/v1/accounts/{A}/holds/hold-a1/settle"), Auth::Bearer(&key), body)
                .await
        },
        want(BAD, INVALID, &["usage.output_tokens", "2.5", COUNT]),
    )
    .await;
}
