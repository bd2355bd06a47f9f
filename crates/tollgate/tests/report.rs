//! `tollgate report` against a real `tollgate serve`: figures worked out by hand from the events
//! posted, JSON, table and CSV (parsed back), groupings, an empty previous cycle, bad arguments.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use chrono::{Datelike, Duration, TimeZone, Utc};
use serde_json::{Value, json};

const TOKEN: &str = "tga_report-test-admin-token";

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(base: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("TOLLGATE_SERVER", base)
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn report_figures_groupings_formats_and_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let _server = Kill(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .current_dir(dir.path())
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOLLGATE_DB", dir.path().join("t.db"))
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..400 {
        if run(&base, &["tier", "list"]).0 == Some(0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The current cycle starts on the 1st of this month (UTC).
    let now = Utc::now();
    let anchor = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).unwrap();
    let (code, _, err) =
        run(&base, &["account", "create", "acme", "--tier", "team-standard", "--anchor", &anchor.to_rfc3339()]);
    assert_eq!(code, Some(0), "{err}");
    let at = (now - Duration::minutes(5)).to_rfc3339();
    let events = [
        // Sonnet 4.5 ($3 / $15): 1000 in + 200 out = $0.003 + $0.003.
        json!({"id": "e1", "account": "acme", "pool": "programmatic", "model": "claude-sonnet-4-5", "source": "ci",
               "labels": {"job": "nightly"}, "timestamp": at, "usage": {"input_tokens": 1000, "output_tokens": 200}}),
        // 2000 in = $0.006.
        json!({"id": "e2", "account": "acme", "pool": "programmatic", "model": "claude-sonnet-4-5", "source": "ci",
               "labels": {"job": "weekly"}, "timestamp": at, "usage": {"input_tokens": 2000, "output_tokens": 0}}),
        // Opus 4.1 ($15 / $75): 1000 in + 100 out = $0.015 + $0.0075.
        json!({"id": "e3", "account": "acme", "pool": "interactive", "model": "claude-opus-4-1", "source": "chat",
               "timestamp": at, "usage": {"input_tokens": 1000, "output_tokens": 100}}),
    ];
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(run(&base, &["events", "post", file.to_str().unwrap()]).0, Some(0));

    let (code, out, err) = run(&base, &["report", "acme", "--by", "model", "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["account"], "acme");
    assert_eq!(r["cycle"]["start"], anchor.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    assert_eq!(r["pools"]["programmatic"]["total_usd"], "0.012");
    assert_eq!(r["pools"]["programmatic"]["calls"], 2);
    assert_eq!(r["pools"]["programmatic"]["grant_usd"], "50");
    assert_eq!(r["pools"]["programmatic"]["tokens"]["input_tokens"], 3000);
    assert_eq!(r["pools"]["interactive"]["total_usd"], "0.0225");
    assert_eq!(r["total_usd"], "0.0345");
    assert_eq!(
        r["groups"],
        json!([
            {"key": "claude-opus-4-1", "total_usd": "0.0225", "calls": 1, "list_cost_usd": "0.0225",
             "tokens": {"input_tokens": 1000, "output_tokens": 100, "cache_creation_5m_input_tokens": 0,
                        "cache_creation_1h_input_tokens": 0, "cache_read_input_tokens": 0, "web_search_requests": 0}},
            {"key": "claude-sonnet-4-5", "total_usd": "0.012", "calls": 2, "list_cost_usd": "0.012",
             "tokens": {"input_tokens": 3000, "output_tokens": 200, "cache_creation_5m_input_tokens": 0,
                        "cache_creation_1h_input_tokens": 0, "cache_read_input_tokens": 0, "web_search_requests": 0}}
        ])
    );
    let groups = |by: &str| -> Vec<(String, String)> {
        let (_, out, _) = run(&base, &["report", "acme", "--by", by, "--json"]);
        let r: Value = serde_json::from_str(&out).unwrap();
        r["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["key"].as_str().unwrap().into(), g["total_usd"].as_str().unwrap().into()))
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
    assert_eq!(groups("label:job"), pairs(&[("(none)", "0.0225"), ("nightly", "0.006"), ("weekly", "0.006")]));
    assert_eq!(groups("source"), pairs(&[("chat", "0.0225"), ("ci", "0.012")]));
    assert_eq!(groups("pool"), pairs(&[("interactive", "0.0225"), ("programmatic", "0.012")]));
    let today = (now - Duration::minutes(5)).date_naive().to_string();
    assert_eq!(groups("day"), pairs(&[(today.as_str(), "0.0345")]));

    // CSV, parsed back.
    let (code, out, _) = run(&base, &["report", "acme", "--by", "model", "--format", "csv"]);
    assert_eq!(code, Some(0));
    let mut csv = csv::Reader::from_reader(out.as_bytes());
    let header: Vec<String> = csv.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(&header[..7], ["account", "cycle_start", "cycle_end", "row", "key", "calls", "total_usd"]);
    let rows: Vec<Vec<String>> = csv.records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect();
    assert_eq!(rows.len(), 4, "two pools and two models");
    assert_eq!((rows[1][4].as_str(), rows[1][5].as_str(), rows[1][6].as_str()), ("programmatic", "2", "0.012"));
    assert_eq!(
        (rows[3][4].as_str(), rows[3][6].as_str(), rows[3][10].as_str()),
        ("claude-sonnet-4-5", "0.012", "3000")
    );

    // The table has the summary rows users know.
    let (_, out, _) = run(&base, &["report", "acme"]);
    for row in ["interactive use", "programmatic calls", "overages", "total", "$0.0345"] {
        assert!(out.contains(row), "{row:?} missing from\n{out}");
    }
    // The previous cycle: no usage, the tier's grants, real dates.
    let (_, out, _) = run(&base, &["report", "acme", "--cycle", "previous", "--json"]);
    let prev: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(prev["total_usd"], "0");
    assert_eq!(prev["pools"]["programmatic"]["calls"], 0);
    assert_eq!(prev["cycle"]["end"], r["cycle"]["start"]);
    // The month a cycle starts in names it.
    let month = format!("{}-{:02}", now.year(), now.month());
    let (_, out, _) = run(&base, &["report", "acme", "--cycle", &month, "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["total_usd"], "0.0345");

    // Plans, by hand: $50 programmatic limit, $0.012 charged.
    let plan = |args: &[&str]| -> Value {
        let mut all = vec!["plan", "acme", "--pool", "programmatic", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = run(&base, &all);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let p = plan(&["--cost-usd", "10"]);
    assert_eq!(
        (p["fits"].as_str(), p["remaining_after_usd"].as_str(), p["overage_usd"].as_str()),
        (Some("now"), Some("39.988"), Some("0"))
    );
    let p = plan(&["--cost-usd", "49.99"]);
    assert_eq!(p["fits"], "after_reset");
    assert_eq!(p["earliest"], r["cycle"]["end"]);
    assert!(p["advice"].as_str().unwrap().contains("early in a cycle"));
    let p = plan(&["--cost-usd", "80"]);
    assert_eq!((p["fits"].as_str(), p["limit_usd"].as_str()), (Some("never"), Some("50")));
    // 100 Sonnet calls of 1000 in / 200 out: 100 × $0.006 = $0.60.
    let p =
        plan(&["--model", "claude-sonnet-4-5", "--input-tokens", "1000", "--output-tokens", "200", "--calls", "100"]);
    assert_eq!((p["cost_usd"].as_str(), p["remaining_after_usd"].as_str()), (Some("0.6"), Some("49.388")));

    // Forecast: two calls in a young cycle are not extrapolated with confidence.
    let (code, out, _) = run(&base, &["forecast", "acme", "--json"]);
    assert_eq!(code, Some(0));
    let f: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(f["pools"]["programmatic"]["charged_usd"], "0.012");
    assert_eq!(f["pools"]["programmatic"]["confident"], false);
    assert!(f["pools"]["programmatic"]["note"].as_str().unwrap().contains("uncertain"));

    // Model advice: the 3000 in / 200 out on Sonnet would cost $0.0004 on Haiku 5.5 ($0.10 / $0.50).
    let (code, out, _) = run(&base, &["advise", "model", "acme", "--pool", "programmatic", "--json"]);
    assert_eq!(code, Some(0));
    let m: Value = serde_json::from_str(&out).unwrap();
    let sonnet = &m["models"][0];
    assert_eq!((sonnet["model"].as_str(), sonnet["cost_usd"].as_str()), (Some("claude-sonnet-4-5"), Some("0.012")));
    let haiku =
        sonnet["on_other_models"].as_array().unwrap().iter().find(|o| o["model"] == "claude-haiku-5-5").unwrap();
    assert_eq!(haiku["cost_usd"], "0.0004");
    // Tier advice over the last cycle (empty): no overage on any tier.
    let (code, out, _) = run(&base, &["advise", "tier", "acme", "--cycles", "1", "--json"]);
    assert_eq!(code, Some(0));
    let t: Value = serde_json::from_str(&out).unwrap();
    assert!(t["tiers"].as_array().unwrap().iter().all(|x| x["overage_usd"] == "0"), "{t}");

    // Bad arguments: a clear message and a non-zero exit.
    for (args, want) in [
        (vec!["report", "nobody"], "not found"),
        (vec!["report", "acme", "--cycle", "2026-13"], "YYYY-MM"),
        (vec!["report", "acme", "--cycle", "last"], "current, previous"),
        (vec!["report", "acme", "--by", "color"], "label:NAME"),
        (vec!["report", "acme", "--format", "xml"], "table, json or csv"),
        (vec!["plan", "acme", "--pool", "batch", "--cost-usd", "1"], "interactive or programmatic"),
        (vec!["plan", "acme", "--pool", "programmatic", "--cost-usd=-1"], "must not be negative"),
        (
            vec![
                "plan",
                "acme",
                "--pool",
                "programmatic",
                "--model",
                "gpt-9000",
                "--input-tokens",
                "1",
                "--output-tokens",
                "1",
            ],
            "gpt-9000",
        ),
        (vec!["plan", "acme", "--pool", "programmatic", "--input-tokens=-5"], "-5"),
        (vec!["plan", "acme", "--pool", "programmatic"], "cost_usd"),
        (vec!["forecast", "nobody"], "not found"),
        (vec!["advise", "tier", "acme", "--cycles", "99"], "between 1 and 24"),
    ] {
        let (code, _, err) = run(&base, &args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err:?} should say {want:?}");
    }
}
