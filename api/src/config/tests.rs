//! Tests of the configuration: parsing, flags, validation.

use super::*;

fn parse(s: &str) -> Result<VmConfig, ConfigError> {
    VmConfig::from_json(s, Path::new("vm.json"))
}

#[test]
fn full_example_parses() {
    let c = parse(
        r#"{"machine": {"vcpus": 2, "memory_mib": 256},
            "boot": {"kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0"},
            "serial": {"mode": "stdio"}, "on_reboot": "exit"}"#,
    )
    .unwrap();
    assert_eq!(c.machine.vcpus, 2);
    assert_eq!(c.machine.memory_mib, 256);
    assert_eq!(c.boot.kernel.as_deref(), Some(Path::new("/k")));
    assert_eq!(c.boot.cmdline(), "console=ttyS0");
    assert_eq!(c.serial, SerialConfig::Stdio);
    assert_eq!(c.on_reboot, OnReboot::Exit);
}

#[test]
fn defaults_apply() {
    let c = parse("{}").unwrap();
    assert_eq!(c.machine, MachineConfig::default());
    assert_eq!(c.boot.cmdline(), DEFAULT_CMDLINE);
    assert!(c.boot.decompress_kernel);
    assert_eq!(c.on_reboot, OnReboot::Exit);
}

#[test]
fn decompress_kernel_can_be_turned_off() {
    let c = parse(r#"{"boot": {"kernel": "/k"}}"#).unwrap();
    assert!(c.boot.decompress_kernel);
    let c = parse(r#"{"boot": {"kernel": "/k", "decompress_kernel": false}}"#).unwrap();
    assert!(!c.boot.decompress_kernel);
    assert!(parse(r#"{"boot": {"decompress": false}}"#).is_err());
}

#[test]
fn serial_modes_parse() {
    let c = parse(r#"{"serial": {"mode": "file", "path": "/tmp/x"}}"#).unwrap();
    assert_eq!(
        c.serial,
        SerialConfig::File {
            path: "/tmp/x".into()
        }
    );
    let c = parse(r#"{"serial": {"mode": "socket", "path": "/tmp/s"}}"#).unwrap();
    assert_eq!(
        c.serial,
        SerialConfig::Socket {
            path: "/tmp/s".into()
        }
    );
    let c = parse(r#"{"serial": {"mode": "off"}}"#).unwrap();
    assert_eq!(c.serial, SerialConfig::Off);
    assert!(parse(r#"{"serial": {"mode": "file"}}"#).is_err());
    assert!(parse(r#"{"serial": {"mode": "tty"}}"#).is_err());
}

#[test]
fn unknown_field_names_its_path() {
    let e = parse(r#"{"machine": {"vcpus": 2, "memroy_mib": 256}}"#).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("machine"), "{msg}");
    assert!(msg.contains("unknown field `memroy_mib`"), "{msg}");
    let e = parse(r#"{"bogus": 1}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
    let e = parse(r#"{"serial": {"mode": "stdio", "path": "/x"}}"#).unwrap_err();
    assert!(e.to_string().contains("`path` is only allowed"), "{e}");
    assert!(e.to_string().contains("serial"), "{e}");
    let e = parse(r#"{"serial": {"mode": "off", "speed": 9600}}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `speed`"), "{e}");
}

#[test]
fn wrong_type_names_its_path() {
    let e = parse(r#"{"machine": {"vcpus": "two"}}"#).unwrap_err();
    assert!(e.to_string().contains("machine.vcpus"), "{e}");
    let e = parse(r#"{"machine": {"vcpus": 300}}"#).unwrap_err();
    assert!(e.to_string().contains("machine.vcpus"), "{e}");
    let e = parse(r#"{"on_reboot": "halt"}"#).unwrap_err();
    assert!(e.to_string().contains("on_reboot"), "{e}");
}

#[test]
fn malformed_json_is_an_error() {
    let e = parse(r#"{"machine": {"vcpus": 2,}"#).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    assert!(e.to_string().contains("line 1"), "{e}");
}

fn valid_with_kernel() -> (VmConfig, tempfile_path::TempPath) {
    let k = tempfile_path::TempPath::new("kernel");
    let mut c = VmConfig::default();
    c.boot.kernel = Some(k.path().to_path_buf());
    (c, k)
}

#[test]
fn validation_ranges() {
    let (mut c, _k) = valid_with_kernel();
    c.validate(Some(4096)).unwrap();
    c.machine.vcpus = 0;
    assert!(c
        .validate(None)
        .unwrap_err()
        .to_string()
        .starts_with("machine.vcpus"));
    c.machine.vcpus = 255;
    assert!(c.validate(None).is_err());
    c.machine.vcpus = 2;
    c.machine.memory_mib = 8;
    let e = c.validate(None).unwrap_err().to_string();
    assert!(
        e.starts_with("machine.memory_mib") && e.contains("too small"),
        "{e}"
    );
    c.machine.memory_mib = 8192;
    let e = c.validate(Some(4096)).unwrap_err().to_string();
    assert!(e.contains("larger than the host"), "{e}");
}

#[test]
fn validation_files() {
    let mut c = VmConfig::default();
    let e = c.validate(None).unwrap_err().to_string();
    assert!(e.starts_with("boot.kernel: no kernel"), "{e}");
    c.boot.kernel = Some("/nonexistent/kernel".into());
    let e = c.validate(None).unwrap_err().to_string();
    assert!(
        e.starts_with("boot.kernel: cannot read /nonexistent/kernel"),
        "{e}"
    );
    c.boot.kernel = Some("/".into());
    let e = c.validate(None).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let (mut c, _k) = valid_with_kernel();
    c.boot.initrd = Some("/nonexistent/initrd".into());
    assert!(c
        .validate(None)
        .unwrap_err()
        .to_string()
        .starts_with("boot.initrd"));
}

#[test]
fn control_sockets_parse() {
    let c = parse(
        r#"{"api_socket": "/run/vmm.sock",
            "qmp": [{"unix": "/run/qmp.sock"}, {"tcp": "127.0.0.1:4444"}]}"#,
    )
    .unwrap();
    assert_eq!(c.api_socket.as_deref(), Some(Path::new("/run/vmm.sock")));
    assert_eq!(
        c.qmp,
        vec![
            QmpEndpoint::Unix("/run/qmp.sock".into()),
            QmpEndpoint::Tcp("127.0.0.1:4444".into())
        ]
    );
    assert!(parse(r#"{"qmp": [{"udp": "x"}]}"#).is_err());
    assert_eq!(
        "tcp:0.0.0.0:4444".parse::<QmpEndpoint>().unwrap(),
        QmpEndpoint::Tcp("0.0.0.0:4444".into())
    );
    assert!("tcp:nohost".parse::<QmpEndpoint>().is_err());
    assert!("tcp::99999".parse::<QmpEndpoint>().is_err());
    assert!("unix:".parse::<QmpEndpoint>().is_err());
}

#[test]
fn disks_parse_from_json_and_flags() {
    let c = parse(
        r#"{"disks": [{"id": "root", "path": "/img", "format": "qcow2", "read_only": true,
                       "cache": "none", "serial": "SN1"}]}"#,
    )
    .unwrap();
    let d = &c.disks[0];
    assert_eq!(d.id.as_deref(), Some("root"));
    assert_eq!(d.format, DiskFormat::Qcow2);
    assert!(d.read_only);
    assert_eq!(d.cache, CacheMode::None);
    assert!(parse(r#"{"disks": [{"path": "/img", "cache": "directsync"}]}"#).is_err());
    assert!(parse(r#"{"disks": [{"path": "/img", "size": 1}]}"#).is_err());

    let d: DiskConfig = "path=/a,format=raw,readonly=on,cache=unsafe,serial=X"
        .parse()
        .unwrap();
    assert_eq!(d.path, Path::new("/a"));
    assert!(d.read_only);
    assert_eq!(d.cache, CacheMode::Unsafe);
    assert_eq!(d.serial.as_deref(), Some("X"));
    assert!("format=raw".parse::<DiskConfig>().is_err());
    assert!("path=/a,bogus=1".parse::<DiskConfig>().is_err());
    assert!("path=/a,readonly=maybe".parse::<DiskConfig>().is_err());
}

#[test]
fn disk_validation() {
    let (mut c, k) = valid_with_kernel();
    let disk = |path: &Path| DiskConfig {
        id: None,
        path: path.to_path_buf(),
        format: DiskFormat::Raw,
        read_only: false,
        cache: CacheMode::Writeback,
        serial: None,
    };
    c.disks.push(disk(k.path()));
    c.validate(None).unwrap();
    c.disks.push(disk(Path::new("/nonexistent/disk.img")));
    let e = c.validate(None).unwrap_err().to_string();
    assert!(
        e.starts_with("disks.path: disk `disk1`: cannot open"),
        "{e}"
    );
    c.disks[1] = disk(k.path());
    c.disks[1].id = Some("disk0".into());
    assert!(c
        .validate(None)
        .unwrap_err()
        .to_string()
        .contains("used twice"));
    c.disks[1].id = None;
    c.disks[1].serial = Some("x".repeat(21));
    assert!(c
        .validate(None)
        .unwrap_err()
        .to_string()
        .contains("longer than 20"));
}

#[test]
fn serial_flag_parses() {
    assert_eq!(
        "stdio".parse::<SerialConfig>().unwrap(),
        SerialConfig::Stdio
    );
    assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
    assert_eq!(
        "file:/a/b".parse::<SerialConfig>().unwrap(),
        SerialConfig::File {
            path: "/a/b".into()
        }
    );
    assert_eq!(
        "socket:/s".parse::<SerialConfig>().unwrap(),
        SerialConfig::Socket { path: "/s".into() }
    );
    assert!("file:".parse::<SerialConfig>().is_err());
    assert!("pty".parse::<SerialConfig>().is_err());
}

/// A scratch file removed on drop (std only, no tempfile crate).
mod tempfile_path {
    use std::path::{Path, PathBuf};

    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "api-test-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&p, b"x").unwrap();
            TempPath(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
