//! Durations written the way people write them in workflow files: `250ms`, `5s`, `2m`, `1h`, `1d`.

use std::fmt;

use schemars::JsonSchema;
use serde::{Serialize, Serializer};

/// A non-negative duration with millisecond precision, written as text in workflow files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    ms: u64,
}

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Self { ms }
    }

    pub const fn from_secs(s: u64) -> Self {
        Self { ms: s * 1000 }
    }

    pub const fn as_millis(self) -> u64 {
        self.ms
    }

    /// Parses `<number><unit>` where unit is one of `ms`, `s`, `m`, `h`, `d`. A bare number means
    /// seconds. Fractions are allowed (`1.5s`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 =
            num.parse().map_err(|_| format!("expected a duration such as `500ms`, `5s` or `2m`, got `{text}`"))?;
        let factor = match unit.trim() {
            "ms" => 1.0,
            "" | "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            other => return Err(format!("unknown duration unit `{other}` in `{text}`: use ms, s, m, h or d")),
        };
        let ms = value * factor;
        if !ms.is_finite() || !(0.0..=10.0 * 365.0 * 86_400_000.0).contains(&ms) {
            return Err(format!("duration `{text}` is out of range (0 to 10 years)"));
        }
        Ok(Self { ms: ms.round() as u64 })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.ms;
        if ms == 0 {
            return write!(f, "0s");
        }
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
            if ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(\\.[0-9]+)?(ms|s|m|h|d)?$",
            "description": "a duration such as 500ms, 5s, 2m, 1h or 1d"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Duration;

    #[test]
    fn parses_units_and_round_trips() {
        for (text, ms) in
            [("500ms", 500), ("5s", 5000), ("2m", 120_000), ("1h", 3_600_000), ("1.5s", 1500), ("3", 3000)]
        {
            let d = Duration::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.as_millis(), ms, "{text}");
            assert_eq!(Duration::parse(&d.to_string()), Ok(d));
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in ["", "abc", "5 weeks", "-1s", "1e999s", "5x"] {
            assert!(Duration::parse(text).is_err(), "{text} should be rejected");
        }
    }
}
