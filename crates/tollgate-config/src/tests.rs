use std::collections::HashMap;

use super::*;

struct MapEnv(HashMap<&'static str, &'static str>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| v.to_string())
    }
}

fn no_env() -> MapEnv {
    MapEnv(HashMap::new())
}

const SPEC_EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8787"
admin_token_env = "TOLLGATE_ADMIN_TOKEN"

[store]
url = "sqlite://tollgate.db"

[[upstream]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
models = ["claude-*"]
auth = "gateway"

[[tier]]
id = "team-standard"
interactive_usd = "100"
programmatic_usd = "50"

[[channel]]
name = "ops"
kind = "webhook"
url = "https://hooks.example.com/tollgate"
secret_env = "TOLLGATE_WEBHOOK_SECRET"

[[alert]]
kind = "threshold"
account = "*"
pool = "programmatic"
percent = [50, 80, 100]
channels = ["ops"]
"#;

#[test]
fn the_spec_example_loads() {
    let s = Settings::from_file(parse_file(SPEC_EXAMPLE).unwrap(), None, &no_env()).unwrap();
    assert_eq!(s.listen, "127.0.0.1:8787");
    assert_eq!(s.store, StoreUrl::Sqlite("tollgate.db".into()));
    assert_eq!(s.tiers[0].programmatic, Nanos::from_usd(50));
    assert_eq!(s.unknown_model, UnknownModel::Reject);
}

#[test]
fn environment_overrides_the_file() {
    let env = MapEnv(HashMap::from([("TOLLGATE_LISTEN", "127.0.0.1:9999"), ("TOLLGATE_DB", "postgres://u@h/db")]));
    let s = Settings::from_file(parse_file(SPEC_EXAMPLE).unwrap(), None, &env).unwrap();
    assert_eq!(s.listen, "127.0.0.1:9999");
    assert_eq!(s.store, StoreUrl::Postgres("postgres://u@h/db".into()));
}

#[test]
fn bad_settings_say_what_to_fix() {
    let cases = [
        ("[server]\nlisten = \"nowhere\"", "not an address"),
        ("[server]\nlistn = \"x\"", "unknown field"),
        ("[server]\nconnections_max = 0", "would refuse every client"),
        ("[server]\nheader_read_timeout_s = 0", "between 1 and 3600"),
        ("[server]\nbody_read_timeout_s = 86400", "between 1 and 3600"),
        ("[server]\nresponse_stall_timeout_s = 0", "between 1 and 3600"),
        ("[[tier]]\nid = \"gold\"\ninteractive_usd = \"10\"", "needs programmatic_usd"),
        ("[[tier]]\nid = \"pro\"\ninteractive_usd = 10.5", "write amounts as strings"),
        ("[[tier]]\nid = \"pro\"\ninteractive_usd = \"-1\"", "must not be negative"),
        ("[[alert]]\nkind = \"threshold\"\npercent = [120]", "between 1 and 100"),
        ("[[alert]]\nkind = \"threshold\"\npool = \"batch\"", "must be interactive, programmatic"),
        ("[[alert]]\nkind = \"spike\"\nwindow_s = 0", "window_s must be positive"),
        ("[[alert]]\nkind = \"cap_hit\"\nchannels = [\"nope\"]", "not defined"),
        ("[[alert]]\nkind = \"sometimes\"", "kind must be"),
        ("[pricing]\nunknown_model = \"as:nothing\"", "has no price"),
        ("[store]\nurl = \"mysql://x\"", "use sqlite://"),
        ("[[upstream]]\nname = \"a\"\nkind = \"gemini\"\nbase_url = \"http://x\"", "anthropic or openai"),
        ("[gateway]\ndefault_pool = \"batch\"", "use interactive or programmatic"),
        ("[gateway]\nupstream_timeout_s = 0", "at least 1"),
        ("[gateway]\nbody_size_bytes_max = 0", "at least 1"),
        ("[gateway]\nwarnings = true", "unknown field"),
        ("[gateway]\nserver_tool_max_uses = 0", "at least 1"),
        ("[gateway]\nunbounded_tool_allowance_usd = \"-2\"", "not an amount of USD"),
        ("[gateway]\nunbounded_tool_allowance_usd = \"lots\"", "unbounded_tool_allowance_usd"),
        ("[[pool_rule]]\nname = \"ci\"\nheader = \"x-ci\"\npool = \"bots\"", "must be interactive or programmatic"),
        ("[[pool_rule]]\nname = \"ci\"\nheader = \"x ci\"\npool = \"programmatic\"", "not a header name"),
        (
            "[[pool_rule]]\nname = \"ci\"\nheader = \"x-ci\"\npool = \"programmatic\"\n[[pool_rule]]\nname = \"ci\"\nheader = \"x-b\"\npool = \"interactive\"",
            "defined twice",
        ),
    ];
    for (text, want) in cases {
        let got = parse_file(text).and_then(|f| Settings::from_file(f, None, &no_env()));
        let msg = got.err().unwrap_or_else(|| panic!("{text:?} should be refused")).0;
        assert!(msg.contains(want), "{text:?}: {msg:?} should say {want:?}");
    }
}

#[test]
fn toml_prices_add_and_override() {
    let text = r#"
[pricing]
unknown_model = "as:house-model"

[[price]]
model = "house-model"
input_usd_per_mtok = "2"
output_usd_per_mtok = "8"
aliases = ["house"]

[[price]]
model = "claude-sonnet-4-5"
input_usd_per_mtok = "1"
output_usd_per_mtok = "5"
"#;
    let s = Settings::from_file(parse_file(text).unwrap(), None, &no_env()).unwrap();
    let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
    let house = s.prices.price_at("house", day).unwrap();
    // Defaults: 5m write 1.25 × input = $2.50, 1h write 2 × = $4, read 0.1 × = $0.20 per MTok.
    assert_eq!(house.rates.cache_write_5m, 2_500_000_000);
    assert_eq!(house.rates.cache_write_1h, 4_000_000_000);
    assert_eq!(house.rates.cache_read, 200_000_000);
    assert_eq!(s.prices.price_at("claude-sonnet-4-5-20250929", day).unwrap().rates.output, 5_000_000_000);
    assert_eq!(s.unknown_model, UnknownModel::PriceAs("house-model".into()));
}

#[test]
fn litellm_entries_are_read_exactly() {
    let text = r#"{
      "sample_spec": {"litellm_provider": "openai", "mode": "chat"},
      "claude-sonnet-4-5": {"litellm_provider": "anthropic", "mode": "chat",
         "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
         "cache_creation_input_token_cost": 3.75e-06, "cache_creation_input_token_cost_above_1hr": 6e-06,
         "cache_read_input_token_cost": 3e-07,
         "input_cost_per_token_above_200k_tokens": 6e-06, "output_cost_per_token_above_200k_tokens": 2.25e-05},
      "gpt-4.1-mini": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 4e-07,
         "output_cost_per_token": 1.6e-06, "cache_read_input_token_cost": 1e-07},
      "text-embedding-3-small": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 2e-08,
         "output_cost_per_token": 0},
      "gemini-2.5-pro": {"litellm_provider": "vertex_ai", "mode": "chat", "input_cost_per_token": 1.25e-06,
         "output_cost_per_token": 1e-05}
    }"#;
    let entries = read_litellm(text, NaiveDate::MIN).unwrap();
    let names: Vec<_> = entries.iter().map(|e| e.model.as_str()).collect();
    assert_eq!(names, ["claude-sonnet-4-5", "gpt-4.1-mini"]);
    let sonnet = &entries[0];
    assert_eq!(sonnet.rates.input, 3_000_000_000);
    assert_eq!(sonnet.rates.output, 15_000_000_000);
    assert_eq!(sonnet.rates.cache_write_5m, 3_750_000_000);
    assert_eq!(sonnet.rates.cache_write_1h, 6_000_000_000);
    assert_eq!(sonnet.rates.cache_read, 300_000_000);
    assert_eq!(sonnet.long_context.unwrap().rates.output, 22_500_000_000);
    let mini = &entries[1];
    assert_eq!((mini.rates.input, mini.rates.cache_read, mini.rates.output), (400_000_000, 100_000_000, 1_600_000_000));
    assert_eq!(mini.provider, Provider::OpenAi);
    assert!(read_litellm("{not json", NaiveDate::MIN).unwrap_err().0.contains("not valid JSON"));
}

#[test]
fn gateway_settings_and_pool_rules_load() {
    let text = "[gateway]\ndefault_pool = \"interactive\"\nmin_output_tokens = 2048\nclaude_code_warnings = true\n\
                lease_usd = \"0.25\"\n[[pool_rule]]\nname = \"ci\"\nheader = \"X-CI-Job\"\npool = \"programmatic\"\n";
    let s = Settings::from_file(parse_file(text).unwrap(), None, &no_env()).unwrap();
    assert_eq!(s.file.gateway.default_pool, "interactive");
    assert_eq!(s.file.gateway.min_output_tokens, 2048);
    assert!(s.file.gateway.claude_code_warnings);
    assert_eq!(s.file.gateway.lease_usd.as_ref().map(|u| u.nanos()), Some(Ok(tollgate_core::Nanos(250_000_000))));
    assert_eq!(s.file.gateway.body_size_bytes_max, 32 * 1024 * 1024);
    assert_eq!(s.file.pool_rule[0].value, "*");
    // The worst-case allowances: defaults, then set.
    let g = &s.file.gateway;
    assert_eq!(
        (g.server_tool_max_uses, g.input_tokens_per_tool_use, g.input_tokens_per_unbounded_input),
        (5, 20_000, 100_000)
    );
    assert!(g.unbounded_tool_allowance_usd.is_none());
    let text = "[gateway]\nserver_tool_max_uses = 2\ninput_tokens_per_tool_use = 50000\n\
                input_tokens_per_unbounded_input = 7\nunbounded_tool_allowance_usd = \"0.5\"\n";
    let s = Settings::from_file(parse_file(text).unwrap(), None, &no_env()).unwrap();
    let g = &s.file.gateway;
    assert_eq!(
        (g.server_tool_max_uses, g.input_tokens_per_tool_use, g.input_tokens_per_unbounded_input),
        (2, 50_000, 7)
    );
    assert_eq!(g.unbounded_tool_allowance_usd.as_ref().map(|u| u.nanos()), Some(Ok(tollgate_core::Nanos(500_000_000))));
}
