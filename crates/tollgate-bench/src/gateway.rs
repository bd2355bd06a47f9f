//! The gateway against the testkit's mock upstream on loopback (zero delay), side by side with
//! direct calls to the mock, in one run: metering, holds and durable writes on (a fresh SQLite
//! store at the default durability, or with `--postgres URL` a fresh database on that server;
//! `--lease-usd X` sets the gateway's lease size, else its default).
//!
//! 1. Added latency at one connection, non-streaming: `--calls` calls straight to the mock, then
//!    as many through the gateway, alternating in blocks; p50 / p99 of each and of the difference.
//! 2. Throughput at `--connections` connections for `--seconds`, direct and through the gateway.
//! 3. When nginx and wrk are installed: the same throughput with nginx as the upstream (a fixed
//!    JSON answer with usage, one worker) and wrk as the load generator (one thread), both in
//!    processes of their own, as the issue's fair mock and as a bare proxy would be measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use chrono::{TimeZone, Utc};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_core::{Nanos, PriceTable};
use tollgate_gateway::{Auth, Gateway, Kind, Settings, Upstream};
use tollgate_sqlite::SqliteStore;
use tollgate_store::{KeyPool, NewAccount, NewGrant, NewKey, Store, hash_secret};

pub const SECRET: &str = "bench-secret";
const BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Say hello."}]}"#;

type HttpClient = Client<HttpConnector, Body>;

pub fn run(args: &[String]) -> Result<(), String> {
    let calls = crate::flag(args, "--calls", 5_000)?;
    let connections = crate::flag(args, "--connections", 64)?;
    let seconds = crate::flag(args, "--seconds", 10)?;
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let lease = match value("--lease-usd") {
        Some(usd) => Some(
            Nanos::parse_usd(&usd)
                .ok()
                .filter(|n| n.0 >= 0)
                .ok_or(format!("--lease-usd {usd:?} is not an amount of USD ≥ 0, such as 1 or 0"))?,
        ),
        None => None,
    };
    let ledger = Ledger { postgres: value("--postgres"), lease };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let db = match &ledger.postgres {
            Some(admin_url) => Some(crate::postgres_ledger::BenchDb::create(admin_url).await?),
            None => None,
        };
        let ledger = Ledger { postgres: db.as_ref().map(|d| d.url.clone()), ..ledger };
        let result = measure(calls, connections, seconds, &ledger).await;
        if let Some(db) = db {
            db.drop_database().await;
        }
        result
    })
}

/// Where the gateway keeps its ledger (`--postgres`: a fresh database on that server, else a
/// fresh SQLite file) and the size of its leases (`--lease-usd`; None: the gateway's default).
#[derive(Clone, Default)]
pub struct Ledger {
    pub postgres: Option<String>,
    pub lease: Option<Nanos>,
}

/// A fresh SQLite store with the account "bench" (a $1M programmatic grant, key `SECRET`), the
/// testkit's mock upstream, and the gateway in front of it on a socket of its own.
pub struct Setup {
    pub store: Arc<dyn Store>,
    pub now: chrono::DateTime<Utc>,
    pub mock: tollgate_testkit::MockUpstream,
    pub gateway_url: String,
    pub dir: tempfile::TempDir,
}

pub async fn setup(ledger: &Ledger) -> Result<Setup, String> {
    let mock = tollgate_testkit::MockUpstream::start().await;
    let (store, now, gateway_url, dir) = serve_gateway(&mock.base_url(), ledger).await?;
    Ok(Setup { store, now, mock, gateway_url, dir })
}

/// The store, account, key and gateway of [`Setup`] in front of the upstream at `upstream_url`.
pub async fn serve_gateway(
    upstream_url: &str,
    ledger: &Ledger,
) -> Result<(Arc<dyn Store>, chrono::DateTime<Utc>, String, tempfile::TempDir), String> {
    let dir = tempfile::Builder::new().prefix("tollgate-bench").tempdir_in(".").map_err(|e| e.to_string())?;
    let store: Arc<dyn Store> = match &ledger.postgres {
        Some(url) => Arc::new(tollgate_postgres::PgStore::open(url).await.map_err(|e| e.to_string())?),
        None => Arc::new(SqliteStore::open(&dir.path().join("bench.db")).map_err(|e| e.to_string())?),
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 10, 12, 0, 0).single().ok_or("bad date")?;
    let account = NewAccount {
        id: "bench".into(),
        tier: "team-standard".into(),
        anchor: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single(),
        timezone: chrono_tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    };
    store.create_account(account, now).await.map_err(|e| e.to_string())?;
    let grant = NewGrant {
        account: "bench".into(),
        pool: tollgate_core::PoolKind::Programmatic,
        amount: Nanos::from_usd(1_000_000),
        note: None,
    };
    store.add_grant(grant, now).await.map_err(|e| e.to_string())?;
    let key = NewKey {
        id: "k".into(),
        account: "bench".into(),
        secret_hash: hash_secret(SECRET),
        name: None,
        pool: KeyPool::Fixed(tollgate_core::PoolKind::Programmatic),
        labels: Default::default(),
        cap: None,
    };
    store.create_key(key, now).await.map_err(|e| e.to_string())?;
    let gateway_url = start_gateway(&store, now, upstream_url, ledger.lease).await?;
    Ok((store, now, gateway_url, dir))
}

/// A gateway on `store` in front of the Anthropic-kind upstream at `upstream_url`, on a socket
/// of its own, at the fixed time `now`; returns its URL.
async fn start_gateway(
    store: &Arc<dyn Store>,
    now: chrono::DateTime<Utc>,
    upstream_url: &str,
    lease: Option<Nanos>,
) -> Result<String, String> {
    let settings = Settings {
        upstreams: vec![Upstream {
            name: "upstream".into(),
            kind: Kind::Anthropic,
            base_url: upstream_url.to_string(),
            api_key: Some("upstream".into()),
            models: vec!["claude-*".into()],
            auth: Auth::Gateway,
        }],
        ..Settings::default()
    };
    let settings = Settings { lease: lease.unwrap_or(settings.lease), ..settings };
    let clock: tollgate_gateway::Clock = Arc::new(move || now);
    let gateway = Arc::new(Gateway::new(store.clone(), Arc::new(PriceTable::builtin()), clock, settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let gateway_url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(async move { axum::serve(listener, tollgate_gateway::routes(gateway)).await });
    Ok(gateway_url)
}

async fn measure(calls: u64, connections: u64, seconds: u64, ledger: &Ledger) -> Result<(), String> {
    let Setup { store, now, mock, gateway_url, dir: _dir } = setup(ledger).await?;
    let direct_url = mock.base_url();

    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(http);
    // Warm up both paths (connections, caches, the pool's cycle row).
    for _ in 0..200 {
        call(&client, &direct_url).await?;
        call(&client, &gateway_url).await?;
    }

    // 1. Latency at one connection, alternating blocks of 100 so drift hits both alike.
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    while (direct.len() as u64) < calls {
        for _ in 0..100 {
            direct.push(call(&client, &direct_url).await?);
        }
        for _ in 0..100 {
            through.push(call(&client, &gateway_url).await?);
        }
    }
    direct.sort();
    through.sort();
    let p = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "gateway latency, 1 connection, {} calls each: direct p50 {:.3} ms p99 {:.3} ms; through tollgate p50 {:.3} ms p99 {:.3} ms; added p50 {:.3} ms p99 {:.3} ms",
        direct.len(),
        p(&direct, 0.5),
        p(&direct, 0.99),
        p(&through, 0.5),
        p(&through, 0.99),
        p(&through, 0.5) - p(&direct, 0.5),
        p(&through, 0.99) - p(&direct, 0.99)
    );

    // 2. Throughput at many connections.
    for (name, url) in [("direct", &direct_url), ("through tollgate", &gateway_url)] {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (client, url, done) = (client.clone(), url.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    if call(&client, &url).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())?;
        }
        let n = done.load(Ordering::Relaxed);
        println!(
            "gateway throughput, {connections} connections, {seconds} s, {name}: {n} calls, {:.0} calls/s",
            n as f64 / seconds as f64
        );
    }
    nginx_throughput(&store, now, connections, seconds, ledger.lease).await?;
    let audit = store.audit().await.map_err(|e| e.to_string())?;
    println!("gateway: {} events recorded, ledger breaches: {}", audit.events_checked, audit.breaches.len());
    Ok(())
}

/// The answer nginx gives every call: a Messages API response with usage.
const NGINX_ANSWER: &str = r#"{"id":"msg_static","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":6}}"#;

/// Kills the child process when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn nginx_throughput(
    store: &Arc<dyn Store>,
    now: chrono::DateTime<Utc>,
    connections: u64,
    seconds: u64,
    lease: Option<Nanos>,
) -> Result<(), String> {
    let installed = |program: &str| std::process::Command::new(program).arg("-v").output().is_ok();
    if !installed("nginx") || !installed("wrk") {
        println!("gateway throughput with nginx and wrk: not run (install the Debian packages nginx-light and wrk)");
        return Ok(());
    }
    let dir = tempfile::Builder::new().prefix("tollgate-nginx").tempdir().map_err(|e| e.to_string())?;
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1; master_process off; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;
         events {{ worker_connections 4096; }}
         http {{
           access_log off; keepalive_requests 10000000;
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
           uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
           server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; return 200 '{NGINX_ANSWER}'; }} }}
         }}"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).map_err(|e| e.to_string())?;
    let _nginx = Child(
        std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?,
    );
    let nginx_url = format!("http://127.0.0.1:{port}");
    let gateway_url = start_gateway(store, now, &nginx_url, lease).await?;
    let script = dir.path().join("post.lua");
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.body = [[{BODY}]]\nwrk.headers[\"content-type\"] = \"application/json\"\n\
         wrk.headers[\"x-api-key\"] = \"{SECRET}\"\nwrk.headers[\"anthropic-version\"] = \"2023-06-01\"\n"
    );
    std::fs::write(&script, lua).map_err(|e| e.to_string())?;
    // nginx needs a moment to listen.
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, url) in [("direct to nginx", &nginx_url), ("through tollgate to nginx", &gateway_url)] {
        let (script, url) = (script.clone(), format!("{url}/v1/messages"));
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("wrk")
                .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
                .arg(&script)
                .arg(&url)
                .output()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot run wrk: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(bad) = text.lines().find(|l| l.contains("Non-2xx") || l.contains("Socket errors")) {
            return Err(format!("wrk {name}: {}", bad.trim()));
        }
        let rate =
            text.lines().find(|l| l.starts_with("Requests/sec:")).ok_or(format!("wrk printed no rate: {text}"))?;
        let p50 = text.lines().find(|l| l.trim_start().starts_with("50%")).map(str::trim).unwrap_or("50% ?");
        let p99 = text.lines().find(|l| l.trim_start().starts_with("99%")).map(str::trim).unwrap_or("99% ?");
        println!(
            "gateway throughput, wrk -t1 -c{connections} -d{seconds}s, nginx upstream, {name}: {} calls/s (latency {p50}, {p99})",
            rate.trim_start_matches("Requests/sec:").trim()
        );
    }
    Ok(())
}

async fn call(client: &HttpClient, base: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let request = axum::http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", SECRET)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Body::from(BODY))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !status.is_success() {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(started.elapsed())
}
