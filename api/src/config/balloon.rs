//! virtio-balloon configuration: `"balloon": {"deflate_on_oom": true, "free_page_reporting":
//! true, "stats_interval_s": 2}` and the `--balloon` flag.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The balloon device (QEMU's `virtio-balloon-pci`); absent: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Let the guest take pages back from the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Let the guest report its free memory, which the host takes back.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Seconds between two requests for the guest's memory statistics (0: none until a
    /// client sets an interval, as QEMU's `guest-stats-polling-interval`).
    #[serde(default)]
    pub stats_interval_s: u32,
}

/// The longest statistics interval accepted (a day).
pub const MAX_STATS_INTERVAL_S: u32 = 86_400;

impl BalloonConfig {
    /// Checks the interval.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(ConfigError::Invalid {
                field: "balloon.stats_interval_s",
                reason: format!(
                    "{} is out of range (0..={MAX_STATS_INTERVAL_S})",
                    self.stats_interval_s
                ),
            });
        }
        Ok(())
    }
}

impl std::str::FromStr for BalloonConfig {
    type Err = ConfigError;

    /// `deflate_on_oom=on,free_page_reporting=on,stats_interval_s=2` (the `--balloon` flag);
    /// `on` alone gives a balloon with the defaults.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            field: "balloon",
            reason,
        };
        let mut c = BalloonConfig::default();
        if s == "on" {
            return Ok(c);
        }
        for part in s.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(bad(format!("`{part}` is not KEY=VALUE")));
            };
            let flag = |v: &str| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(bad(format!("{key}: `{v}` is not on or off"))),
            };
            match key {
                "deflate_on_oom" | "deflate-on-oom" => c.deflate_on_oom = flag(value)?,
                "free_page_reporting" | "free-page-reporting" => {
                    c.free_page_reporting = flag(value)?
                }
                "stats_interval_s" => {
                    c.stats_interval_s = value
                        .parse()
                        .map_err(|_| bad(format!("stats_interval_s: `{value}` is not seconds")))?
                }
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}` (deflate_on_oom, free_page_reporting, \
                         stats_interval_s)"
                    )))
                }
            }
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_parses_and_names_its_mistakes() {
        let c: BalloonConfig = "deflate_on_oom=on,free_page_reporting=on,stats_interval_s=2"
            .parse()
            .unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                stats_interval_s: 2
            }
        );
        assert_eq!(
            "on".parse::<BalloonConfig>().unwrap(),
            BalloonConfig::default()
        );
        for (bad, word) in [
            ("deflate_on_oom=maybe", "not on or off"),
            ("speed=9", "unknown key"),
            ("stats_interval_s=-1", "not seconds"),
            ("stats_interval_s=999999", "out of range"),
            ("deflate_on_oom", "KEY=VALUE"),
        ] {
            let e = bad.parse::<BalloonConfig>().unwrap_err().to_string();
            assert!(e.contains(word), "{bad}: {e}");
        }
        let json: BalloonConfig =
            serde_json::from_str(r#"{"deflate_on_oom": true, "stats_interval_s": 2}"#).unwrap();
        assert!(json.deflate_on_oom && !json.free_page_reporting);
        assert!(serde_json::from_str::<BalloonConfig>(r#"{"size": 1}"#).is_err());
    }
}
