//! virtio-console configuration: `console` (port 0, the guest's `hvc0`, with the serial port's
//! backends) and `channels` (named ports, each a unix socket we listen on, as libvirt's
//! `<channel type='unix'><source mode='bind'/><target type='virtio' name='...'/>`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, SerialConfig, VmConfig};

/// The name of the QEMU guest agent's port.
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Most channels a VM may have.
pub const MAX_CHANNELS: usize = 30;
/// Longest channel name (Linux keeps port names in a page, QEMU has no limit; names are
/// reverse-DNS strings like `org.qemu.guest_agent.0`).
pub const CHANNEL_NAME_MAX: usize = 128;

/// A named virtio-console port on a host unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// The id the VMM knows it by (QMP's VSERPORT_CHANGE); defaults to `channel<N>`.
    #[serde(default)]
    pub id: Option<String>,
    /// The name the guest sees: /dev/virtio-ports/NAME.
    pub name: String,
    /// The unix socket we listen on (mode 0600, one client at a time).
    pub socket: PathBuf,
}

impl std::str::FromStr for ChannelConfig {
    type Err = ConfigError;

    /// `name=NAME,socket=PATH[,id=ID]` (the `--channel` flag).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            field: "channel",
            reason,
        };
        let (mut id, mut name, mut socket) = (None, None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not KEY=VALUE")))?;
            match k {
                "id" => id = Some(v.to_string()),
                "name" => name = Some(v.to_string()),
                "socket" | "path" => socket = Some(PathBuf::from(v)),
                _ => return Err(bad(format!("unknown key `{k}` (name, socket, id)"))),
            }
        }
        Ok(ChannelConfig {
            id,
            name: name.ok_or_else(|| bad("`name=NAME` is missing".into()))?,
            socket: socket.ok_or_else(|| bad("`socket=PATH` is missing".into()))?,
        })
    }
}

impl VmConfig {
    /// The id of channel `i`: its own, or `channel<i>`.
    pub fn channel_id(&self, i: usize) -> String {
        self.channels[i]
            .id
            .clone()
            .unwrap_or_else(|| format!("channel{i}"))
    }

    /// Whether the VM has a virtio-console device (a console port or any channel).
    pub fn has_virtio_console(&self) -> bool {
        !matches!(self.console, None | Some(SerialConfig::Off))
            || !self.channels.is_empty()
            || self.agent
    }

    /// Checks the console and the channels: names usable as guest file names and unique,
    /// sockets distinct, stdio used by one console only.
    pub(super) fn validate_console(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        if let Some(c) = &self.console {
            if let SerialConfig::File { path } | SerialConfig::Socket { path } = c {
                if path.as_os_str().is_empty() {
                    return Err(invalid("console.path", "is empty".into()));
                }
            }
            if *c == SerialConfig::Stdio && self.serial == SerialConfig::Stdio {
                return Err(invalid(
                    "console",
                    "stdio is already the serial port's: give the serial port another mode \
                     (\"serial\": {\"mode\": \"off\"}, or --serial off) to have the console there"
                        .into(),
                ));
            }
        }
        if self.channels.len() > MAX_CHANNELS {
            return Err(invalid(
                "channels",
                format!("{} channels; at most {MAX_CHANNELS}", self.channels.len()),
            ));
        }
        let mut sockets: Vec<&PathBuf> = Vec::new();
        if let Some(SerialConfig::Socket { path }) = &self.console {
            sockets.push(path);
        }
        if let SerialConfig::Socket { path } = &self.serial {
            sockets.push(path);
        }
        let mut ids = Vec::new();
        for (i, c) in self.channels.iter().enumerate() {
            let id = self.channel_id(i);
            let name = &c.name;
            if name.is_empty()
                || name.len() > CHANNEL_NAME_MAX
                || name.contains('/')
                || name == "."
                || name == ".."
                || name.chars().any(|ch| ch.is_control() || ch.is_whitespace())
            {
                return Err(invalid(
                    "channels.name",
                    format!(
                        "channel `{id}`: `{name}` is not a usable port name (1-{CHANNEL_NAME_MAX} \
                         printable characters, no `/` or spaces)"
                    ),
                ));
            }
            if self.agent && name == AGENT_PORT_NAME {
                return Err(invalid(
                    "channels.name",
                    format!(
                        "channel `{id}`: `{name}` is the built-in agent's port (\"agent\": true); \
                         use one or the other"
                    ),
                ));
            }
            if self.channels[..i].iter().any(|o| o.name == *name) {
                return Err(invalid(
                    "channels.name",
                    format!("two channels are named `{name}`"),
                ));
            }
            if ids.contains(&id) {
                return Err(invalid(
                    "channels.id",
                    format!("two channels have the id `{id}`"),
                ));
            }
            ids.push(id.clone());
            if c.socket.as_os_str().is_empty() {
                return Err(invalid(
                    "channels.socket",
                    format!("channel `{id}`: the socket path is empty"),
                ));
            }
            if sockets.contains(&&c.socket) {
                return Err(invalid(
                    "channels.socket",
                    format!(
                        "channel `{id}`: {} is already another console's or channel's socket",
                        c.socket.display()
                    ),
                ));
            }
            sockets.push(&c.socket);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(console: Option<SerialConfig>, channels: Vec<ChannelConfig>) -> VmConfig {
        VmConfig {
            console,
            channels,
            serial: SerialConfig::Off,
            ..Default::default()
        }
    }

    fn ch(name: &str, socket: &str) -> ChannelConfig {
        ChannelConfig {
            id: None,
            name: name.into(),
            socket: socket.into(),
        }
    }

    #[test]
    fn flag_parses_and_names_its_mistakes() {
        let c: ChannelConfig = "name=org.qemu.guest_agent.0,socket=/run/qga.sock,id=qga"
            .parse()
            .unwrap();
        assert_eq!(c.name, "org.qemu.guest_agent.0");
        assert_eq!(c.socket, PathBuf::from("/run/qga.sock"));
        assert_eq!(c.id.as_deref(), Some("qga"));
        for bad in ["name=a", "socket=/x", "name=a,socket=/x,speed=9", "name"] {
            assert!(bad.parse::<ChannelConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn json_shape() {
        let c: VmConfig = serde_json::from_str(
            r#"{"console": {"mode": "socket", "path": "/tmp/hvc.sock"},
                "channels": [{"name": "org.test.a", "socket": "/tmp/a.sock"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.console,
            Some(SerialConfig::Socket {
                path: "/tmp/hvc.sock".into()
            })
        );
        assert_eq!(c.channel_id(0), "channel0");
        assert!(c.has_virtio_console());
        assert!(!VmConfig::default().has_virtio_console());
        assert!(serde_json::from_str::<VmConfig>(r#"{"channels": [{"name": "a"}]}"#).is_err());
    }

    #[test]
    fn validation() {
        assert!(cfg(Some(SerialConfig::Stdio), vec![ch("a", "/s1")])
            .validate_console()
            .is_ok());
        let mut both_stdio = cfg(Some(SerialConfig::Stdio), vec![]);
        both_stdio.serial = SerialConfig::Stdio;
        let e = both_stdio.validate_console().unwrap_err().to_string();
        assert!(e.contains("serial"), "{e}");
        for bad in [
            vec![ch("a", "/s1"), ch("a", "/s2")],
            vec![ch("a", "/s1"), ch("b", "/s1")],
            vec![ch("a/b", "/s1")],
            vec![ch("", "/s1")],
            vec![ch("with space", "/s1")],
            vec![ch("a", "")],
        ] {
            assert!(
                cfg(None, bad.clone()).validate_console().is_err(),
                "{bad:?}"
            );
        }
        let mut both = cfg(None, vec![ch(AGENT_PORT_NAME, "/s1")]);
        assert!(both.validate_console().is_ok());
        both.agent = true;
        assert!(both.validate_console().is_err());
        let clash = cfg(
            Some(SerialConfig::Socket { path: "/s1".into() }),
            vec![ch("a", "/s1")],
        );
        assert!(clash.validate_console().is_err());
    }
}
