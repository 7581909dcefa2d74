//! `api/openapi.json` stays true: its (method, path) pairs are exactly the router's, and every
//! operation documents its success status.

use std::collections::BTreeSet;

use serde_json::Value;

#[test]
fn openapi_matches_the_router() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("api/openapi.json");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let m = method.to_ascii_uppercase();
            // GETs answer 200; PUTs 204, or 200 when they return something (an agent answer).
            let ok = op["responses"]["200"].is_object();
            let done = op["responses"]["204"].is_object();
            assert!(
                if m == "GET" { ok } else { ok ^ done },
                "{m} {path} documents its success status (200 for GET; 204 or 200 for PUT)"
            );
            documented.insert((m, path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = api::http::ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed);
    assert_eq!(
        doc["info"]["version"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "the document's version follows the crate's"
    );
}
