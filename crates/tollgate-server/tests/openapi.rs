//! Every route the router serves is in the OpenAPI document, and nothing else is.

#[test]
fn openapi_lists_every_route() {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let router_src = include_str!("../src/api/mod.rs");
    let routed: std::collections::BTreeSet<&str> = router_src
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\""))
        .map(|r| r.split('"').next().unwrap())
        .collect();
    let documented: std::collections::BTreeSet<&str> =
        doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(routed, documented);
}
