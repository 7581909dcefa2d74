//! Enforces the workspace's dependency rules (../shared/ARCHITECTURE.md): which workspace crates
//! may depend on which, and that only `vmm` talks to KVM.

use std::collections::BTreeMap;
use std::path::Path;

/// Directory of each workspace crate and its package name.
const CRATES: &[(&str, &str)] = &[
    ("api", "api"),
    ("boot", "boot"),
    ("devices", "devices"),
    ("virtio", "virtio"),
    ("vmm", "vmm"),
    ("tests", "integration-tests"),
];

/// The allowed edges between workspace crates (by package name).
fn allowed(from: &str) -> &'static [&'static str] {
    match from {
        "api" | "boot" | "devices" => &[],
        "virtio" => &["devices"],
        "vmm" => &["api", "boot", "devices", "virtio"],
        "integration-tests" => &["vmm", "api"],
        _ => &[],
    }
}

fn deps_of(dir: &str) -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let mut out = BTreeMap::new();
    for section in ["dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(section).and_then(|v| v.as_table()) {
            for k in t.keys() {
                out.insert(k.clone(), section.to_string());
            }
        }
    }
    out
}

#[test]
fn workspace_crates_depend_only_along_allowed_edges() {
    let names: Vec<&str> = CRATES.iter().map(|(_, n)| *n).collect();
    for (dir, name) in CRATES {
        for dep in deps_of(dir).keys() {
            if names.contains(&dep.as_str()) {
                assert!(
                    allowed(name).contains(&dep.as_str()),
                    "{name} must not depend on {dep} (allowed: {:?})",
                    allowed(name)
                );
            }
        }
    }
}

#[test]
fn only_vmm_uses_kvm_ioctls() {
    for (dir, name) in CRATES {
        if *name == "vmm" {
            continue;
        }
        assert!(
            !deps_of(dir).contains_key("kvm-ioctls"),
            "{name} depends on kvm-ioctls: devices get interrupt objects and EventFds, never a VmFd"
        );
    }
}

#[test]
fn every_member_is_covered_by_the_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let members = doc["workspace"]["members"].as_array().unwrap();
    for m in members {
        let m = m.as_str().unwrap();
        assert!(
            CRATES.iter().any(|(d, _)| *d == m),
            "workspace member {m} has no rule"
        );
    }
}
