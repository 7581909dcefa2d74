//! The example configurations shipped in resources/examples/ stay valid against the schema.

use std::path::Path;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let cfg = api::VmConfig::from_file(&path)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        assert!(
            cfg.boot.kernel.is_some(),
            "{} names no kernel",
            path.display()
        );
        seen += 1;
    }
    assert!(
        seen >= 2,
        "expected the example configs in {}",
        dir.display()
    );
}
