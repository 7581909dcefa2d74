//! Network card configuration: the `net` entries of the config file and the `--net` flag, with
//! QEMU's names where QEMU has one (`ifname` is `tap` here, `script`, `downscript`, `vhost`,
//! `queues`, `mac`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Most queue pairs a NIC may have.
pub const NET_MAX_QUEUES: u16 = 16;

/// A virtio-net card on a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// A name for the NIC, unique within the VM (defaults to `net<N>`); QMP's `set_link`
    /// names it.
    #[serde(default)]
    pub id: Option<String>,
    /// The host tap interface: opened if it exists, created otherwise (and then removed when
    /// the VMM exits). Without a name the kernel picks one (`tapN`).
    #[serde(default)]
    pub tap: Option<String>,
    /// MAC address, `52:54:00:12:34:56`; generated under 52:54:00 when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Hand the data path to the kernel's vhost-net.
    #[serde(default)]
    pub vhost: bool,
    /// Queue pairs (a multiqueue tap when more than one).
    #[serde(default = "one")]
    pub queues: u16,
    /// The MTU the guest is told (VIRTIO_NET_F_MTU); absent: the guest's default (1500).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Run with the tap's name as argument once the tap is open (QEMU's `script`, e.g.
    /// /etc/qemu-ifup adding the tap to a bridge).
    #[serde(default)]
    pub script: Option<PathBuf>,
    /// Run with the tap's name as argument when the VMM exits (QEMU's `downscript`).
    #[serde(default)]
    pub downscript: Option<PathBuf>,
    /// Limits on what the guest receives.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// A rate limiter, as Firecracker configures one: a bytes bucket and an operations (frames)
/// bucket, each optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Frames.
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// A token bucket: `size` tokens per `refill_time` milliseconds, with `one_time_burst` extra
/// tokens available once at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket size: tokens per refill time.
    pub size: u64,
    /// Extra tokens, available once.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill the whole bucket.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// `n` tokens per second.
    pub fn per_second(n: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size: n,
            one_time_burst: 0,
            refill_time: 1000,
        }
    }
}

impl RateLimiterConfig {
    /// Checks the buckets; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for (what, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                if b.size == 0 || b.refill_time == 0 {
                    return Err(format!(
                        "{what}: size and refill_time must be above 0 (leave the bucket out for \
                         no limit)"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn one() -> u16 {
    1
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

impl NetConfig {
    /// A NIC with every default.
    pub fn new() -> NetConfig {
        NetConfig {
            id: None,
            tap: None,
            mac: None,
            vhost: false,
            queues: 1,
            mtu: None,
            script: None,
            downscript: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    /// Checks one NIC (its id is checked against the others by the caller).
    pub(super) fn validate(&self, id: &str) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            field,
            reason: format!("NIC `{id}`: {reason}"),
        };
        if let Some(mac) = &self.mac {
            let m = parse_mac(mac).ok_or_else(|| {
                invalid(
                    "net.mac",
                    format!("`{mac}` is not a MAC address like 52:54:00:12:34:56"),
                )
            })?;
            if m[0] & 1 != 0 {
                return Err(invalid(
                    "net.mac",
                    format!("`{mac}` is a multicast address; a NIC needs a unicast one"),
                ));
            }
            if m == [0; 6] {
                return Err(invalid("net.mac", "00:00:00:00:00:00 is not usable".into()));
            }
        }
        if let Some(tap) = &self.tap {
            let ok = !tap.is_empty()
                && tap.len() <= 15
                && tap
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
            if !ok {
                return Err(invalid(
                    "net.tap",
                    format!("`{tap}` is not an interface name (1-15 characters, no '/' or ':')"),
                ));
            }
        }
        if self.queues == 0 || self.queues > NET_MAX_QUEUES {
            return Err(invalid(
                "net.queues",
                format!("{} is out of range (1..={NET_MAX_QUEUES})", self.queues),
            ));
        }
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return Err(invalid(
                    "net.mtu",
                    format!("{mtu} is below the IPv4 minimum of 68"),
                ));
            }
        }
        if let Some(r) = &self.rx_rate_limiter {
            r.validate()
                .map_err(|e| invalid("net.rx_rate_limiter", e))?;
        }
        if let Some(r) = &self.tx_rate_limiter {
            r.validate()
                .map_err(|e| invalid("net.tx_rate_limiter", e))?;
        }
        for (field, path) in [
            ("net.script", &self.script),
            ("net.downscript", &self.downscript),
        ] {
            if let Some(p) = path {
                let meta = std::fs::metadata(p)
                    .map_err(|e| invalid(field, format!("cannot use {}: {e}", p.display())))?;
                if !meta.is_file() {
                    return Err(invalid(field, format!("{} is not a file", p.display())));
                }
            }
        }
        Ok(())
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new()
    }
}

fn on_off(field: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::Invalid {
            field,
            reason: format!("`{v}` is not on or off"),
        }),
    }
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses `--net [tap=NAME][,mac=MAC][,vhost=on|off][,queues=N][,mtu=N][,script=PATH|no]
    /// [,downscript=PATH|no][,id=ID][,rx_bps=N][,tx_bps=N][,rx_pps=N][,tx_pps=N]`
    /// (`ifname` is accepted for `tap`, as QEMU names it; the rates are bytes and frames per
    /// second).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            field: "net",
            reason,
        };
        let mut n = NetConfig::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not KEY=VALUE")))?;
            match k {
                "id" => n.id = Some(v.to_string()),
                "tap" | "ifname" => n.tap = Some(v.to_string()),
                "mac" | "macaddr" => n.mac = Some(v.to_string()),
                "vhost" => n.vhost = on_off("net.vhost", v)?,
                "queues" => {
                    n.queues = v
                        .parse()
                        .map_err(|_| bad(format!("queues `{v}` is not a number")))?
                }
                "mtu" | "host_mtu" => {
                    n.mtu = Some(
                        v.parse()
                            .map_err(|_| bad(format!("mtu `{v}` is not a number")))?,
                    )
                }
                "rx_bps" | "tx_bps" | "rx_pps" | "tx_pps" => {
                    let rate: u64 = v
                        .parse()
                        .map_err(|_| bad(format!("{k} `{v}` is not a number")))?;
                    let lim = if k.starts_with("rx") {
                        &mut n.rx_rate_limiter
                    } else {
                        &mut n.tx_rate_limiter
                    };
                    let lim = lim.get_or_insert_with(RateLimiterConfig::default);
                    let bucket = (rate > 0).then(|| TokenBucketConfig::per_second(rate));
                    if k.ends_with("bps") {
                        lim.bandwidth = bucket;
                    } else {
                        lim.ops = bucket;
                    }
                }
                "script" => n.script = (v != "no").then(|| v.into()),
                "downscript" => n.downscript = (v != "no").then(|| v.into()),
                _ => return Err(bad(format!("unknown key `{k}`"))),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(
            parse_mac("52-54-00-AB-cd-EF"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:567",
            "zz:54:00:12:34:56",
            "5:54:00:12:34:56",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn flag_parses() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:00:00:01,vhost=on,queues=2,script=no,id=lan"
            .parse()
            .unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert!(n.vhost);
        assert_eq!(n.queues, 2);
        assert_eq!(n.script, None);
        assert_eq!(n.id.as_deref(), Some("lan"));
        assert!("tap=t,bogus=1".parse::<NetConfig>().is_err());
        assert!("tap=t,vhost=maybe".parse::<NetConfig>().is_err());
        assert!("tap=t,queues=x".parse::<NetConfig>().is_err());
        let d: NetConfig = "".parse().unwrap();
        assert_eq!(d, NetConfig::new());
        let r: NetConfig = "tx_bps=10000000,tx_pps=5000,rx_bps=1000".parse().unwrap();
        assert_eq!(
            r.tx_rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::per_second(10_000_000)),
                ops: Some(TokenBucketConfig::per_second(5000)),
            })
        );
        assert_eq!(
            r.rx_rate_limiter.unwrap().bandwidth,
            Some(TokenBucketConfig::per_second(1000))
        );
        assert!("rx_bps=fast".parse::<NetConfig>().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let check = |n: NetConfig| n.validate("net0").map_err(|e| e.to_string());
        let mut n = NetConfig::new();
        assert!(check(n.clone()).is_ok());
        n.mac = Some("01:00:5e:00:00:01".into());
        assert!(check(n.clone()).unwrap_err().contains("net.mac"));
        n.mac = Some("52:54:00:zz:00:01".into());
        assert!(check(n.clone()).unwrap_err().contains("net.mac"));
        n.mac = None;
        n.queues = 17;
        assert!(check(n.clone()).unwrap_err().contains("net.queues"));
        n.queues = 1;
        n.tap = Some("a/b".into());
        assert!(check(n.clone()).unwrap_err().contains("net.tap"));
        n.tap = None;
        n.script = Some("/nonexistent/ifup".into());
        assert!(check(n.clone()).unwrap_err().contains("net.script"));
        n.script = None;
        n.mtu = Some(20);
        assert!(check(n.clone()).unwrap_err().contains("net.mtu"));
        n.mtu = None;
        n.tx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: 0,
                refill_time: 0,
            }),
            ops: None,
        });
        assert!(check(n).unwrap_err().contains("net.tx_rate_limiter"));
    }
}
