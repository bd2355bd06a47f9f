//! Management commands: each is one or a few API calls, printed as a table or as JSON.

use std::io::BufRead;

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Outcome, usage};
use crate::cli::{AccountCmd, AdviseCmd, AlertsCmd, EventsCmd, GrantCmd, KeyCmd, PoolCmd, TierCmd};
use crate::client::{Client, seg};
use crate::table;

#[allow(clippy::expect_used, reason = "a serde_json Value always prints: its map keys are strings")]
fn print_json(v: &Value) {
    outln!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
}

fn s(v: &Value, field: &str) -> String {
    match v.get(field) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn opt_insert(m: &mut Map<String, Value>, field: &str, v: Option<String>) {
    if let Some(v) = v {
        m.insert(field.into(), Value::String(v));
    }
}

fn accounts_table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> =
        list.iter().map(|a| vec![s(a, "id"), s(a, "tier"), s(a, "anchor"), s(a, "timezone")]).collect();
    table::render(&["account", "tier", "anchor", "timezone"], &rows)
}

pub async fn account(c: &Client, cmd: AccountCmd, json: bool) -> Outcome<()> {
    let v = match cmd {
        AccountCmd::Create { id, tier, anchor, timezone, interactive_grant_usd, programmatic_grant_usd } => {
            let mut body = Map::new();
            body.insert("id".into(), id.into());
            body.insert("tier".into(), tier.into());
            opt_insert(&mut body, "anchor", anchor);
            opt_insert(&mut body, "timezone", timezone);
            opt_insert(&mut body, "interactive_grant_usd", interactive_grant_usd);
            opt_insert(&mut body, "programmatic_grant_usd", programmatic_grant_usd);
            c.post("/api/v1/accounts", Value::Object(body)).await?
        }
        AccountCmd::List => {
            let v = c.get("/api/v1/accounts").await?;
            if !json {
                outln!("{}", accounts_table(v["accounts"].as_array().map(Vec::as_slice).unwrap_or_default()));
                return Ok(());
            }
            v
        }
        AccountCmd::Show { id } => c.get(&format!("/api/v1/accounts/{}", seg(&id))).await?,
        AccountCmd::Update { id, tier, anchor, timezone } => {
            let mut body = Map::new();
            opt_insert(&mut body, "tier", tier);
            opt_insert(&mut body, "anchor", anchor);
            opt_insert(&mut body, "timezone", timezone);
            c.call(Method::PATCH, &format!("/api/v1/accounts/{}", seg(&id)), Some(Value::Object(body))).await?
        }
    };
    if json {
        print_json(&v)
    } else {
        outln!("{}", accounts_table(std::slice::from_ref(&v)))
    }
    Ok(())
}

/// `none` clears a cap; anything else is sent as the amount.
fn cap_value(v: String) -> Value {
    if v == "none" { Value::Null } else { Value::String(v) }
}

pub async fn pool(c: &Client, cmd: PoolCmd, json: bool) -> Outcome<()> {
    let v = match cmd {
        PoolCmd::Set { account, pool, on_exhausted, overage_cap_usd, spend_cap_usd } => {
            let mut body = Map::new();
            opt_insert(&mut body, "on_exhausted", on_exhausted);
            if let Some(v) = overage_cap_usd {
                body.insert("overage_cap_usd".into(), cap_value(v));
            }
            if let Some(v) = spend_cap_usd {
                body.insert("spend_cap_usd".into(), cap_value(v));
            }
            let p = c
                .call(
                    Method::PUT,
                    &format!("/api/v1/accounts/{}/pools/{}", seg(&account), seg(&pool)),
                    Some(Value::Object(body)),
                )
                .await?;
            json!({ pool: p })
        }
        PoolCmd::Show { account } => c.get(&format!("/api/v1/accounts/{}/pools", seg(&account))).await?,
    };
    if json {
        print_json(&v);
    } else if let Value::Object(pools) = &v {
        let rows: Vec<Vec<String>> = pools
            .iter()
            .map(|(name, p)| vec![name.clone(), s(p, "on_exhausted"), s(p, "overage_cap_usd"), s(p, "spend_cap_usd")])
            .collect();
        outln!("{}", table::render(&["pool", "on_exhausted", "overage_cap_usd", "spend_cap_usd"], &rows));
    }
    Ok(())
}

fn grants_table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|g| vec![s(g, "id"), s(g, "pool"), s(g, "kind"), s(g, "amount_usd"), s(g, "expires_at"), s(g, "note")])
        .collect();
    table::render(&["grant", "pool", "kind", "amount_usd", "expires_at", "note"], &rows)
}

pub async fn grant(c: &Client, cmd: GrantCmd, json: bool) -> Outcome<()> {
    let (v, list) = match cmd {
        GrantCmd::Add { account, pool, amount_usd, note } => {
            let mut body = Map::new();
            body.insert("pool".into(), pool.into());
            body.insert("amount_usd".into(), amount_usd.into());
            opt_insert(&mut body, "note", note);
            let v = c.post(&format!("/api/v1/accounts/{}/grants", seg(&account)), Value::Object(body)).await?;
            (v.clone(), vec![v])
        }
        GrantCmd::List { account } => {
            let v = c.get(&format!("/api/v1/accounts/{}/grants", seg(&account))).await?;
            let list = v["grants"].as_array().cloned().unwrap_or_default();
            (v, list)
        }
    };
    if json {
        print_json(&v)
    } else {
        outln!("{}", grants_table(&list))
    }
    Ok(())
}

fn keys_table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|k| vec![s(k, "id"), s(k, "name"), s(k, "pool"), s(k, "cap_usd"), s(k, "created_at"), s(k, "revoked_at")])
        .collect();
    table::render(&["key", "name", "pool", "cap_usd", "created_at", "revoked_at"], &rows)
}

pub async fn key(c: &Client, cmd: KeyCmd, json: bool) -> Outcome<()> {
    match cmd {
        KeyCmd::Create { account, pool, name, labels, cap_usd } => {
            let mut label_map = Map::new();
            for l in labels {
                let (k, v) = l.split_once('=').ok_or_else(|| usage(format!("--label {l:?} must be k=v")))?;
                label_map.insert(k.to_string(), v.into());
            }
            let mut body = Map::new();
            opt_insert(&mut body, "pool", pool);
            opt_insert(&mut body, "name", name);
            opt_insert(&mut body, "cap_usd", cap_usd);
            body.insert("labels".into(), Value::Object(label_map));
            let v = c.post(&format!("/api/v1/accounts/{}/keys", seg(&account)), Value::Object(body)).await?;
            if json {
                print_json(&v);
            } else {
                // The secret alone on stdout, so `$(tollgate key create …)` captures it.
                outln!("{}", s(&v, "key"));
                eprintln!("key {} created; the secret above is shown only once", s(&v, "id"));
            }
        }
        KeyCmd::List { account } => {
            let v = c.get(&format!("/api/v1/accounts/{}/keys", seg(&account))).await?;
            if json {
                print_json(&v)
            } else {
                outln!("{}", keys_table(v["keys"].as_array().map(Vec::as_slice).unwrap_or_default()))
            }
        }
        KeyCmd::Revoke { account, key_id } => {
            let v = c
                .call(Method::DELETE, &format!("/api/v1/accounts/{}/keys/{}", seg(&account), seg(&key_id)), None)
                .await?;
            if json { print_json(&v) } else { outln!("{}", keys_table(std::slice::from_ref(&v))) }
        }
    }
    Ok(())
}

pub async fn tier(c: &Client, cmd: TierCmd, json: bool) -> Outcome<()> {
    let list = match cmd {
        TierCmd::List => {
            let v = c.get("/api/v1/tiers").await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            v["tiers"].as_array().cloned().unwrap_or_default()
        }
        TierCmd::Set { id, interactive_usd, programmatic_usd, monthly_price_usd, payg_multiplier } => {
            let mut body = Map::new();
            body.insert("interactive_usd".into(), interactive_usd.into());
            body.insert("programmatic_usd".into(), programmatic_usd.into());
            opt_insert(&mut body, "monthly_price_usd", monthly_price_usd);
            opt_insert(&mut body, "payg_multiplier", payg_multiplier);
            let v = c.call(Method::PUT, &format!("/api/v1/tiers/{}", seg(&id)), Some(Value::Object(body))).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            vec![v]
        }
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                s(t, "id"),
                s(t, "interactive_usd"),
                s(t, "programmatic_usd"),
                s(t, "monthly_price_usd"),
                s(t, "payg_multiplier"),
            ]
        })
        .collect();
    outln!(
        "{}",
        table::render(&["tier", "interactive_usd", "programmatic_usd", "monthly_price_usd", "payg_multiplier"], &rows)
    );
    Ok(())
}

/// `tollgate status ID --json` prints exactly the balance document of the API.
pub async fn status(c: &Client, account: &str, json: bool) -> Outcome<()> {
    let v = c.get(&format!("/api/v1/accounts/{}/balance", seg(account))).await?;
    if json {
        print_json(&v);
        return Ok(());
    }
    outln!(
        "account {}  tier {}  cycle {} → {}",
        s(&v, "account"),
        s(&v, "tier"),
        v.pointer("/cycle/start").and_then(Value::as_str).unwrap_or("-"),
        v.pointer("/cycle/end").and_then(Value::as_str).unwrap_or("-"),
    );
    let rows: Vec<Vec<String>> = ["interactive", "programmatic"]
        .iter()
        .map(|name| {
            let p = &v["pools"][name];
            let mut row = vec![name.to_string()];
            row.extend(
                ["grant_usd", "used_usd", "overage_usd", "held_usd", "remaining_usd", "limit_usd", "on_exhausted"]
                    .iter()
                    .map(|f| s(p, f)),
            );
            row
        })
        .collect();
    outln!(
        "{}",
        table::render(&["pool", "grant", "used", "overage", "held", "remaining", "limit", "on_exhausted"], &rows)
    );
    Ok(())
}

pub async fn events(c: &Client, cmd: EventsCmd, json: bool) -> Outcome<()> {
    match cmd {
        EventsCmd::List { account, pool, model, since, until, limit } => {
            let mut query = vec![format!("limit={limit}")];
            for (k, v) in [("pool", pool), ("model", model), ("since", since), ("until", until)] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", seg(&v)));
                }
            }
            let v = c.get(&format!("/api/v1/accounts/{}/events?{}", seg(&account), query.join("&"))).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["events"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|e| {
                    vec![s(e, "timestamp"), s(e, "id"), s(e, "pool"), s(e, "model"), s(e, "cost_usd"), s(e, "source")]
                })
                .collect();
            outln!("{}", table::render(&["timestamp", "event", "pool", "model", "cost_usd", "source"], &rows));
        }
        EventsCmd::Post { file } => {
            let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&file).map_err(|e| usage(format!("cannot open {}: {e}", file.display())))?,
                ))
            };
            let (mut recorded, mut duplicate) = (0usize, 0usize);
            let mut batch = Vec::new();
            let mut flush = async |batch: &mut Vec<Value>| -> Outcome<()> {
                if batch.is_empty() {
                    return Ok(());
                }
                let v = c.post("/api/v1/events", json!({"events": std::mem::take(batch)})).await?;
                for r in v["results"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    if r["status"] == "duplicate" { duplicate += 1 } else { recorded += 1 }
                }
                Ok(())
            };
            for (n, line) in reader.lines().enumerate() {
                let line = line.map_err(|e| usage(format!("reading {}: {e}", file.display())))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value =
                    serde_json::from_str(&line).map_err(|e| usage(format!("line {}: not JSON: {e}", n + 1)))?;
                match v {
                    Value::Array(items) => batch.extend(items),
                    Value::Object(ref m) if m.contains_key("events") => {
                        batch.extend(m["events"].as_array().cloned().unwrap_or_default())
                    }
                    other => batch.push(other),
                }
                if batch.len() >= 500 {
                    flush(&mut batch).await?;
                }
            }
            flush(&mut batch).await?;
            if json {
                print_json(&json!({"recorded": recorded, "duplicate": duplicate}));
            } else {
                outln!("{recorded} events recorded, {duplicate} already present");
            }
        }
    }
    Ok(())
}

pub async fn prices(c: &Client, model: Option<String>, date: Option<String>, json: bool) -> Outcome<()> {
    let list = match model {
        Some(m) => {
            let q = date.map(|d| format!("?date={}", seg(&d))).unwrap_or_default();
            let v = c.get(&format!("/api/v1/prices/{}{q}", seg(&m))).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            vec![v]
        }
        None => {
            let v = c.get("/api/v1/prices").await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            v["prices"].as_array().cloned().unwrap_or_default()
        }
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            [
                "model",
                "effective_from",
                "input_usd_per_mtok",
                "cache_write_5m_usd_per_mtok",
                "cache_write_1h_usd_per_mtok",
                "cache_read_usd_per_mtok",
                "output_usd_per_mtok",
            ]
            .iter()
            .map(|f| s(p, f))
            .collect()
        })
        .collect();
    outln!("USD per million tokens");
    outln!("{}", table::render(&["model", "from", "input", "write 5m", "write 1h", "read", "output"], &rows));
    Ok(())
}

pub async fn alerts(c: &Client, cmd: AlertsCmd, json: bool) -> Outcome<()> {
    match cmd {
        AlertsCmd::List { account, pool, kind, since, limit } => {
            let mut query = vec![format!("limit={limit}")];
            for (k, v) in [("account", account), ("pool", pool), ("kind", kind), ("since", since)] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", seg(&v)));
                }
            }
            let v = c.get(&format!("/api/v1/alerts?{}", query.join("&"))).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["alerts"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|a| vec![s(a, "fired_at"), s(a, "kind"), s(a, "account"), s(a, "pool"), s(a, "message")])
                .collect();
            outln!("{}", table::render(&["fired_at", "kind", "account", "pool", "message"], &rows));
        }
        AlertsCmd::Rules => {
            let v = c.get("/api/v1/alert-rules").await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["rules"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    let channels = r["channels"]
                        .as_array()
                        .map(|c| c.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(","));
                    vec![
                        s(r, "id"),
                        s(r, "kind"),
                        s(r, "account"),
                        s(r, "pool"),
                        channels.unwrap_or_default(),
                        s(r, "from_config"),
                    ]
                })
                .collect();
            outln!("{}", table::render(&["rule", "kind", "account", "pool", "channels", "from_config"], &rows));
        }
        AlertsCmd::Test { channel } => {
            let v = c.post("/api/v1/alerts/test", json!({ "channel": channel })).await?;
            if json {
                print_json(&v);
            } else {
                outln!("test alert delivered through {channel}");
            }
        }
    }
    Ok(())
}

/// `tollgate report`: one account, or every account, in the chosen format.
pub async fn report(c: &Client, account: Option<String>, cycle: &str, by: Option<&str>, format: &str) -> Outcome<()> {
    if !matches!(format, "table" | "json" | "csv") {
        return Err(usage(format!("--format {format:?}: use table, json or csv")));
    }
    let accounts = account_or_all(c, account).await?;
    let mut reports = Vec::new();
    for a in &accounts {
        let mut query = vec![format!("cycle={}", seg(cycle))];
        if let Some(by) = by {
            query.push(format!("by={}", seg(by)));
        }
        reports.push(c.get(&format!("/api/v1/accounts/{}/report?{}", seg(a), query.join("&"))).await?);
    }
    match format {
        "json" => {
            if reports.len() == 1 {
                print_json(&reports[0]);
            } else {
                print_json(&json!({ "reports": reports }));
            }
        }
        "csv" => report_csv(&reports)?,
        _ => report_table(&reports, by),
    }
    Ok(())
}

/// The reports as CSV rows: each pool, then each group, of each account.
fn report_csv(reports: &[Value]) -> Outcome<()> {
    let mut out = csv::Writer::from_writer(Vec::new());
    let header = [
        "account",
        "cycle_start",
        "cycle_end",
        "row",
        "key",
        "calls",
        "total_usd",
        "grant_usd",
        "used_usd",
        "overage_usd",
        "input_tokens",
        "cache_creation_5m_input_tokens",
        "cache_creation_1h_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    ];
    out.write_record(header).map_err(|e| usage(e.to_string()))?;
    for r in reports {
        let base = [s(r, "account"), s(&r["cycle"], "start"), s(&r["cycle"], "end")];
        let mut rows: Vec<(String, String, &Value)> = Vec::new();
        for pool in ["interactive", "programmatic"] {
            rows.push(("pool".into(), pool.into(), &r["pools"][pool]));
        }
        for g in r["groups"].as_array().map(Vec::as_slice).unwrap_or_default() {
            rows.push(("group".into(), s(g, "key"), g));
        }
        for (kind, key, v) in rows {
            let t = &v["tokens"];
            let record = [
                base[0].clone(),
                base[1].clone(),
                base[2].clone(),
                kind,
                key,
                s(v, "calls"),
                s(v, "total_usd"),
                s(v, "grant_usd"),
                s(v, "used_usd"),
                s(v, "overage_usd"),
                s(t, "input_tokens"),
                s(t, "cache_creation_5m_input_tokens"),
                s(t, "cache_creation_1h_input_tokens"),
                s(t, "cache_read_input_tokens"),
                s(t, "output_tokens"),
            ];
            out.write_record(record.iter().map(|c| crate::table::csv_cell(c))).map_err(|e| usage(e.to_string()))?;
        }
    }
    let bytes = out.into_inner().map_err(|e| (crate::commands::Failure::Internal, e.to_string()))?;
    crate::commands::write_out(format_args!("{}", String::from_utf8_lossy(&bytes)));
    Ok(())
}

/// The reports as tables: the breakdown of SPEC section 7, then the groups when asked for.
fn report_table(reports: &[Value], by: Option<&str>) {
    for r in reports {
        let i = &r["pools"]["interactive"];
        let p = &r["pools"]["programmatic"];
        outln!("{}  cycle {} → {}", s(r, "account"), s(&r["cycle"], "start"), s(&r["cycle"], "end"));
        let overage = |v: &Value| v["overage_usd"].as_str().unwrap_or("0").to_string();
        let rows = vec![
            vec![
                "interactive use".into(),
                format!("${}", s(i, "total_usd")),
                s(i, "calls"),
                format!("${} of ${}", s(i, "used_usd"), s(i, "grant_usd")),
            ],
            vec![
                "programmatic calls".into(),
                format!("${}", s(p, "total_usd")),
                s(p, "calls"),
                format!("${} of ${}", s(p, "used_usd"), s(p, "grant_usd")),
            ],
            vec!["overages".into(), format!("${} + ${}", overage(i), overage(p)), "".into(), "".into()],
            vec!["total".into(), format!("${}", s(r, "total_usd")), "".into(), "".into()],
        ];
        outln!("{}", table::render(&["", "charged", "calls", "grant used"], &rows));
        if let Some(groups) = r["groups"].as_array() {
            let rows: Vec<Vec<String>> = groups
                .iter()
                .map(|g| {
                    vec![
                        s(g, "key"),
                        format!("${}", s(g, "total_usd")),
                        s(g, "calls"),
                        s(&g["tokens"], "input_tokens"),
                        s(&g["tokens"], "output_tokens"),
                    ]
                })
                .collect();
            outln!("{}", table::render(&[by.unwrap_or("group"), "charged", "calls", "input", "output"], &rows));
        }
    }
}

pub async fn forecast(c: &Client, account: Option<String>, json: bool) -> Outcome<()> {
    let accounts = account_or_all(c, account).await?;
    for a in accounts {
        let v = c.get(&format!("/api/v1/accounts/{}/forecast", seg(&a))).await?;
        if json {
            print_json(&v);
            continue;
        }
        outln!("{}  cycle {} → {}", a, s(&v["cycle"], "start"), s(&v["cycle"], "end"));
        let rows: Vec<Vec<String>> = ["interactive", "programmatic"]
            .iter()
            .map(|p| {
                let f = &v["pools"][*p];
                let out = f["exhaustion"].as_str().map(str::to_string).unwrap_or_else(|| "not before the reset".into());
                vec![
                    p.to_string(),
                    format!("${} of ${}", s(f, "charged_usd"), s(f, "limit_usd")),
                    format!(
                        "${}/day (24 h), ${}/day (cycle)",
                        s(f, "burn_per_day_recent_usd"),
                        s(f, "burn_per_day_cycle_usd")
                    ),
                    format!("${}", s(f, "projected_cycle_end_usd")),
                    out,
                    format!("${}", s(f, "expiring_unused_usd")),
                    if f["confident"].as_bool() == Some(true) { "".into() } else { "uncertain: little data".into() },
                ]
            })
            .collect();
        outln!("{}", table::render(&["pool", "charged", "burn", "projected", "runs out", "expires unused", ""], &rows));
        outln!("{} days to the reset", s(&v["pools"]["programmatic"], "days_to_reset"));
    }
    Ok(())
}

pub async fn plan(c: &Client, account: &str, body: Value, json: bool) -> Outcome<()> {
    let v = c.post(&format!("/api/v1/accounts/{}/plan", seg(account)), body).await?;
    if json {
        print_json(&v);
        return Ok(());
    }
    match v["fits"].as_str() {
        Some("now") => outln!(
            "fits now: ${} leaves ${} ({} overage)",
            s(&v, "cost_usd"),
            s(&v, "remaining_after_usd"),
            s(&v, "overage_usd")
        ),
        Some("after_reset") => outln!(
            "does not fit now (${} left); fits after the reset at {}",
            s(&v, "remaining_now_usd"),
            s(&v, "earliest")
        ),
        _ => outln!("never fits: ${} against a limit of ${}", s(&v, "charge_usd"), s(&v, "limit_usd")),
    }
    outln!("advice: {}", s(&v, "advice"));
    Ok(())
}

pub async fn advise(c: &Client, cmd: AdviseCmd, json: bool) -> Outcome<()> {
    match cmd {
        AdviseCmd::Tier { account, cycles } => {
            let v = c.get(&format!("/api/v1/accounts/{}/advice/tier?cycles={cycles}", seg(&account))).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["tiers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    vec![
                        s(t, "tier"),
                        format!("${}", s(t, "overage_usd")),
                        t["total_usd"]
                            .as_str()
                            .map(|x| format!("${x}"))
                            .unwrap_or_else(|| "price not configured".into()),
                    ]
                })
                .collect();
            outln!("{}", table::render(&["tier", "overage", "total"], &rows));
            outln!("recommended: {} (now on {})", s(&v, "recommended"), s(&v, "current_tier"));
        }
        AdviseCmd::Model { account, pool } => {
            let path = match &pool {
                Some(p) => format!("/api/v1/accounts/{}/advice/model?pool={}", seg(&account), seg(p)),
                None => format!("/api/v1/accounts/{}/advice/model", seg(&account)),
            };
            let v = c.get(&path).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            for m in v["models"].as_array().map(Vec::as_slice).unwrap_or_default() {
                outln!(
                    "{}: ${} this cycle, median latency {} ms",
                    s(m, "model"),
                    s(m, "cost_usd"),
                    s(m, "median_latency_ms")
                );
                let rows: Vec<Vec<String>> = m["on_other_models"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|o| vec![s(o, "model"), format!("${}", s(o, "cost_usd"))])
                    .collect();
                outln!("{}", table::render(&["on model", "would cost"], &rows));
            }
        }
    }
    Ok(())
}

/// The one account named, or every account the caller can see.
async fn account_or_all(c: &Client, account: Option<String>) -> Outcome<Vec<String>> {
    Ok(match account {
        Some(a) => vec![a],
        None => c.get("/api/v1/accounts").await?["accounts"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["id"].as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
    })
}
