//! The parameter table, QMP's and HMP's checks, and QEMU's number parsers, against QEMU's texts.

use super::*;
use serde_json::json;

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn the_table_follows_qemu() {
    assert_eq!(QEMU_PARAMETERS.len(), 29);
    assert_eq!(QEMU_PARAMETERS[0].name, "announce-initial");
    assert_eq!(QEMU_PARAMETERS[28].name, "direct-io");
    for (name, _) in HMP_LINES {
        assert!(find(name).is_some(), "{name}");
    }
    let mut names: Vec<&str> = QEMU_PARAMETERS.iter().map(|p| p.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), QEMU_PARAMETERS.len());
}

#[test]
fn member_types_in_qemus_words() {
    let check = |name: &str, v: Value| check_member(name, &v).map_err(|e| e.desc);
    assert_eq!(check("downtime-limit", json!(300)), Ok(()));
    // A negative uint64 is its two's complement to QEMU (the range check follows).
    assert_eq!(check("downtime-limit", json!(-1)), Ok(()));
    let cases = [
        (
            "downtime-limit",
            json!("300"),
            "Parameter 'downtime-limit' expects uint64",
        ),
        (
            "max-bandwidth",
            json!(1.5),
            "Parameter 'max-bandwidth' expects uint64",
        ),
        (
            "multifd-channels",
            json!(256),
            "Parameter 'multifd-channels' expects uint8",
        ),
        (
            "multifd-channels",
            json!(true),
            "Parameter 'multifd-channels' expects uint64",
        ),
        (
            "x-checkpoint-delay",
            json!(1u64 << 32),
            "Parameter 'x-checkpoint-delay' expects uint32",
        ),
        (
            "direct-io",
            json!(0),
            "Invalid parameter type for 'direct-io', expected: boolean",
        ),
        (
            "tls-creds",
            json!(1),
            "Invalid parameter type for 'tls-creds', expected: StrOrNull",
        ),
        (
            "mode",
            json!(1),
            "Invalid parameter type for 'mode', expected: string",
        ),
        (
            "mode",
            json!("fast"),
            "Parameter 'mode' does not accept value 'fast'",
        ),
        (
            "block-bitmap-mapping",
            json!({}),
            "Invalid parameter type for 'block-bitmap-mapping', expected: array",
        ),
        (
            "block-bitmap-mapping",
            json!([1]),
            "Invalid parameter type for 'block-bitmap-mapping[0]', expected: object",
        ),
    ];
    for (name, v, want) in cases {
        assert_eq!(check(name, v.clone()), Err(want.to_string()), "{name} {v}");
    }
    assert_eq!(check("tls-creds", Value::Null), Ok(()));
    assert_eq!(check("multifd-compression", json!("zstd")), Ok(()));
}

#[test]
fn ours_are_set_the_others_keep_their_value() {
    let set = |v: Value| set_action(&args(v)).map_err(|e| e.desc);
    assert_eq!(
        set(json!({"downtime-limit": 500, "max-bandwidth": 0})),
        Ok(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: Some(500),
                max_bandwidth: Some(0),
            }
        ))
    );
    assert_eq!(
        set(json!({})),
        Ok(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate::default()
        ))
    );
    // What libvirt sends to a QEMU that knows TLS but migrates without it.
    assert_eq!(
        set(
            json!({"tls-creds": "", "tls-hostname": null, "multifd-channels": 2,
                   "mode": "normal", "direct-io": false, "max-bandwidth": -1})
        ),
        Ok(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: None,
                max_bandwidth: Some(u64::MAX),
            }
        ))
    );
    for (v, name) in [
        (json!({"multifd-channels": 4}), "multifd-channels"),
        (json!({"tls-creds": "tls0"}), "tls-creds"),
        (json!({"mode": "cpr-reboot"}), "mode"),
        (json!({"block-bitmap-mapping": []}), "block-bitmap-mapping"),
        (
            json!({"cpu-throttle-tailslow": true}),
            "cpu-throttle-tailslow",
        ),
    ] {
        assert_eq!(
            set(v),
            Err(format!(
                "migration parameter '{name}' is not supported by this VMM (it implements \
                 downtime-limit and max-bandwidth)"
            ))
        );
    }
    assert_eq!(
        set(json!({"downtime-limit": 2_000_001})),
        Err(
            "Parameter 'downtime_limit' expects an integer in the range of 0 to \
             (2000 * 1000) ms"
                .into()
        )
    );
    assert!(set(json!({"downtime-limit": -1})).is_err());
    assert!(set(json!({"downtime-limit": 2_000_000})).is_ok());
}

#[test]
fn query_reports_qemus_members() {
    let v = query_json(&MigrationParameters::default());
    let m = v.as_object().unwrap();
    assert_eq!(m.len(), 28, "all but block-bitmap-mapping");
    assert_eq!(v["downtime-limit"], 300);
    assert_eq!(v["max-bandwidth"], 134_217_728);
    assert_eq!(v["announce-initial"], 50);
    assert_eq!(v["announce-max"], 550);
    assert_eq!(v["announce-rounds"], 5);
    assert_eq!(v["announce-step"], 100);
    assert_eq!(v["throttle-trigger-threshold"], 50);
    assert_eq!(v["cpu-throttle-initial"], 20);
    assert_eq!(v["cpu-throttle-increment"], 10);
    assert_eq!(v["cpu-throttle-tailslow"], false);
    assert_eq!(v["max-cpu-throttle"], 99);
    assert_eq!(v["tls-creds"], "");
    assert_eq!(v["x-checkpoint-delay"], 20_000);
    assert_eq!(v["multifd-channels"], 2);
    assert_eq!(v["xbzrle-cache-size"], 67_108_864);
    assert_eq!(v["max-postcopy-bandwidth"], 0);
    assert_eq!(v["avail-switchover-bandwidth"], 0);
    assert_eq!(v["multifd-compression"], "none");
    assert_eq!(v["mode"], "normal");
    assert_eq!(v["zero-page-detection"], "multifd");
    assert_eq!(v["direct-io"], false);
    assert!(m.get("block-bitmap-mapping").is_none());
    // Everything reported can be set back as it is.
    assert!(set_action(m).is_ok());
}

#[test]
fn info_migrate_parameters_text() {
    let text = info_text(&MigrationParameters {
        downtime_limit_ms: 500,
        max_bandwidth: 1 << 30,
    });
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 25);
    assert_eq!(lines[0], "announce-initial: 50 ms");
    assert_eq!(lines[2], "announce-rounds: 5");
    assert_eq!(lines[7], "cpu-throttle-tailslow: off");
    assert_eq!(lines[9], "tls-creds: ''");
    assert_eq!(lines[11], "max-bandwidth: 1073741824 bytes/second");
    assert_eq!(lines[12], "avail-switchover-bandwidth: 0 bytes/second");
    assert_eq!(lines[13], "downtime-limit: 500 ms");
    assert_eq!(lines[14], "x-checkpoint-delay: 20000 ms");
    assert_eq!(lines[16], "multifd-compression: none");
    assert_eq!(lines[18], "xbzrle-cache-size: 67108864 bytes");
    assert_eq!(lines[19], "max-postcopy-bandwidth: 0");
    assert_eq!(lines[22], "vcpu-dirty-limit: 1 MB/s");
    assert_eq!(lines[24], "direct-io: off");
    assert!(text.ends_with('\n'));
}

#[test]
fn hmp_values_parse_like_qemu() {
    let update = |d: Option<u64>, b: Option<u64>| {
        Ok(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: d,
                max_bandwidth: b,
            },
        ))
    };
    let desc = |r: Result<VmmAction, HmpError>| r.unwrap_err().desc;
    assert_eq!(
        hmp_set_action("downtime-limit", "500"),
        update(Some(500), None)
    );
    // `downtime-limit` is a QEMU `size`: a suffix scales it (bytes by default).
    assert_eq!(
        hmp_set_action("downtime-limit", "1k"),
        update(Some(1024), None)
    );
    // `max-bandwidth` counts MiB without a suffix.
    assert_eq!(
        hmp_set_action("max-bandwidth", "32"),
        update(None, Some(32 << 20))
    );
    assert_eq!(
        hmp_set_action("max-bandwidth", "1.5G"),
        update(None, Some(3 << 29))
    );
    assert_eq!(
        hmp_set_action("max-bandwidth", "100B"),
        update(None, Some(100))
    );
    assert_eq!(
        desc(hmp_set_action("max-bandwidth", "lots")),
        "Invalid size lots"
    );
    assert_eq!(
        desc(hmp_set_action("max-bandwidth", "8E")),
        "Invalid size 8E"
    );
    let e = hmp_set_action("downtime-limit", "soon").unwrap_err();
    assert_eq!(
        e.desc,
        "Parameter 'downtime-limit' expects a non-negative number below 2^64"
    );
    assert_eq!(e.hint, Some(SIZE_HINT));
    assert_eq!(
        desc(hmp_set_action("downtime-limit", "16E")),
        "Value '16E' is out of range for parameter 'downtime-limit'"
    );
    assert_eq!(
        desc(hmp_set_action("downtime-limit", "2000001")),
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
    );
    assert_eq!(
        desc(hmp_set_action("frobs", "1")),
        "invalid parameter value: frobs"
    );
    assert_eq!(
        desc(hmp_set_action("multifd-channels", "x")),
        "Parameter 'multifd-channels' expects uint64"
    );
    assert_eq!(
        desc(hmp_set_action("multifd-channels", "0x100")),
        "Parameter 'multifd-channels' expects uint8"
    );
    assert_eq!(hmp_set_action("multifd-channels", "2"), update(None, None));
    assert_eq!(
        hmp_set_action("multifd-channels", "0x2"),
        update(None, None)
    );
    assert!(desc(hmp_set_action("multifd-channels", "8")).contains("not supported"));
    assert_eq!(hmp_set_action("direct-io", "off"), update(None, None));
    assert_eq!(
        desc(hmp_set_action("direct-io", "maybe")),
        "Parameter 'direct-io' expects 'on' or 'off'"
    );
    assert_eq!(
        desc(hmp_set_action("mode", "fast")),
        "Parameter 'mode' does not accept value 'fast'"
    );
    // Quotes are not parsed: this is a name of two characters.
    assert!(hmp_set_action("tls-creds", "''").is_err());
    assert_eq!(
        desc(hmp_set_action("block-bitmap-mapping", "x")),
        "The block-bitmap-mapping parameter can only be set through QMP"
    );
    assert_eq!(
        hmp_set_action("xbzrle-cache-size", "64M"),
        update(None, None)
    );
    assert_eq!(
        desc(hmp_set_action("xbzrle-cache-size", "9E")),
        "Invalid size 9E"
    );
}

#[test]
fn sizes_parse_like_qemu_strtosz() {
    let b = |s: &str| strtosz(s, 'B');
    assert_eq!(b("0"), Ok(0));
    assert_eq!(b("4096"), Ok(4096));
    assert_eq!(b(" 12"), Ok(12));
    assert_eq!(b("0x1000"), Ok(4096));
    assert_eq!(b("4k"), Ok(4096));
    assert_eq!(b("4K"), Ok(4096));
    assert_eq!(b("1M"), Ok(1 << 20));
    assert_eq!(b("1.5k"), Ok(1536));
    assert_eq!(b("1.k"), Ok(1024));
    assert_eq!(b(".5k"), Ok(512));
    assert_eq!(b("12.345M"), Ok((12.345 * 1048576.0 + 0.5) as u64));
    assert_eq!(b("15E"), Ok(15 << 60));
    assert_eq!(b("16E"), Err(SizeError::Range));
    assert_eq!(b("99999999999999999999"), Err(SizeError::Range));
    for bad in [
        "", "k", "0x", "1q", "-1", "1.5", ".", "0x1k", "0x1.8", "12 ", "1e3",
    ] {
        assert_eq!(b(bad), Err(SizeError::Invalid), "{bad:?}");
    }
    let m = |s: &str| strtosz(s, 'M');
    assert_eq!(m("1"), Ok(1 << 20));
    assert_eq!(m("0x10"), Ok(16 << 20));
    assert_eq!(m("1.5"), Ok(3 << 19));
    assert_eq!(m("1b"), Ok(1));
}

#[test]
fn integers_parse_like_qemu_strtou64() {
    assert_eq!(strtou64("10"), Some(10));
    assert_eq!(strtou64("0x10"), Some(16));
    assert_eq!(strtou64("010"), Some(8));
    assert_eq!(strtou64("0"), Some(0));
    assert_eq!(strtou64("-1"), Some(u64::MAX));
    for bad in ["", "x", "0x", "08", "1k", "18446744073709551616"] {
        assert_eq!(strtou64(bad), None, "{bad:?}");
    }
}
