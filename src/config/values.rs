//! The string syntaxes of config values: byte sizes ("64KiB"), durations ("1h30m") and
//! schedules ("every 15m" or a 5-field cron expression), parsed and shown back. Pure functions
//! of strings: this module knows nothing of TOML, keys or files.

use std::str::FromStr;
use std::time::Duration;

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

/// When a group is snapshotted automatically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// `every 15m`: a fixed interval.
    Every(Duration),
    /// A 5-field cron expression (minute hour day-of-month month day-of-week) or a nickname
    /// such as `@daily`, parsed by croner.
    Cron(CronExpr),
}

impl std::fmt::Display for Schedule {
    /// As the config writes it: `every 1h30m`, or the cron expression.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => {
                let mut rest = d.as_secs();
                f.write_str("every ")?;
                if rest == 0 {
                    return write!(f, "{}ms", d.as_millis());
                }
                for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
                    if rest >= size {
                        write!(f, "{}{unit}", rest / size)?;
                        rest %= size;
                    }
                }
                Ok(())
            }
            Schedule::Cron(c) => write!(f, "{c}"),
        }
    }
}

impl FromStr for Schedule {
    type Err = String;

    /// `every <duration>` or a cron expression.
    fn from_str(s: &str) -> Result<Schedule, String> {
        let s = s.trim();
        if let Some(every) = s.strip_prefix("every ") {
            return parse_duration(every).map(Schedule::Every);
        }
        s.parse().map(Schedule::Cron)
    }
}

/// A cron expression as cron's users write it: 5 fields with ranges, lists, steps, day and
/// month names (`*/15 8-18 * * mon-fri`), or `@hourly`, `@daily`, `@weekly`, `@monthly`,
/// `@yearly`. Seconds and year fields are refused: the schedule's unit is the minute. When
/// both day fields are restricted either may match, as in Vixie cron.
#[derive(Clone)]
pub struct CronExpr {
    text: String,
    // Boxed: the parsed form is a few hundred bytes, the rest of a `Schedule` a few words.
    cron: Box<croner::Cron>,
}

impl CronExpr {
    /// The expression as written, with runs of blanks made one.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed expression, to evaluate (see `schedule`).
    pub fn cron(&self) -> &croner::Cron {
        &self.cron
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &CronExpr) -> bool {
        self.text == other.text
    }
}

impl Eq for CronExpr {}

impl std::fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CronExpr({:?})", self.text)
    }
}

impl std::fmt::Display for CronExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for CronExpr {
    type Err = String;

    fn from_str(expr: &str) -> Result<CronExpr, String> {
        let text = expr.split_whitespace().collect::<Vec<_>>().join(" ");
        let fields = text.split(' ').count();
        // croner would take 6 or 7 fields (seconds, year); say what this key expects instead.
        if !(fields == 5 || (fields == 1 && text.starts_with('@'))) {
            return Err(format!(
                "\"{expr}\" is neither \"every <duration>\" (e.g. \"every 15m\") nor a 5-field cron \
                 expression (minute hour day-of-month month day-of-week, e.g. \"0 */6 * * *\" or \
                 \"@daily\")"
            ));
        }
        // croner skips an empty list item ("1,,2"); cron refuses it, and so do we.
        if let Some(field) = text.split(' ').find(|f| f.split(',').any(str::is_empty)) {
            return Err(format!(
                "cron expression \"{text}\": field \"{field}\" has an empty list item"
            ));
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser.parse(&text).map_err(|e| {
            format!("cron expression \"{text}\" (minute hour day-of-month month day-of-week): {e}")
        })?;
        Ok(CronExpr {
            text,
            cron: Box::new(cron),
        })
    }
}

/// Parses a byte size: a plain integer or one followed by B, K/KiB, M/MiB, G/GiB or T/TiB
/// (all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let usage = "write an integer with B, KiB, MiB, GiB or TiB, e.g. \"64KiB\"";
    if digits == 0 {
        return Err(format!("invalid size \"{s}\": {usage}"));
    }
    let unit = t[digits..].trim_start();
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => KIB,
        "M" | "MiB" => MIB,
        "G" | "GiB" => GIB,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" | "MB" | "GB" | "TB" => {
            return Err(format!(
                "invalid size \"{s}\": \"{unit}\" is ambiguous (1000 or 1024?); {usage}"
            ))
        }
        _ => {
            return Err(format!(
                "invalid size \"{s}\": unknown unit \"{unit}\"; {usage}"
            ))
        }
    };
    t[..digits]
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("size \"{s}\" is too large"))
}

/// Parses a duration: integers with units w (7 days), d, h, m, s, ms, largest first, e.g.
/// "1h30m", "500ms", "1w2d".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let usage =
        "write e.g. \"10s\", \"500ms\", \"15m\", \"1h30m\" or \"2d\" (units w, d, h, m, s, ms)";
    if t.is_empty() {
        return Err(format!("empty duration; {usage}"));
    }
    let mut rest = t;
    let mut millis: u64 = 0;
    let mut previous_rank = None;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let (number, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        rest = &rest[digits + unit_len..];
        let (rank, unit_millis) = match unit {
            _ if number.is_empty() => return Err(format!("invalid duration \"{s}\"; {usage}")),
            "w" => (0, 7 * 86_400_000),
            "d" => (1, 86_400_000),
            "h" => (2, 3_600_000),
            "m" => (3, 60_000),
            "s" => (4, 1_000),
            "ms" => (5, 1),
            "" => return Err(format!("duration \"{s}\" lacks a unit; {usage}")),
            _ => {
                return Err(format!(
                    "duration \"{s}\" has unknown unit \"{unit}\"; {usage}"
                ))
            }
        };
        if previous_rank.is_some_and(|p| p >= rank) {
            return Err(format!(
                "duration \"{s}\": units must go largest first, each once"
            ));
        }
        previous_rank = Some(rank);
        millis = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_millis))
            .and_then(|m| m.checked_add(millis))
            .ok_or_else(|| format!("duration \"{s}\" is too large"))?;
    }
    Ok(Duration::from_millis(millis))
}

pub(super) fn fmt_size(bytes: u64) -> String {
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", GIB),
        ("MiB", MIB),
        ("KiB", KIB),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

pub(super) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("4096", 4096),
            ("0", 0),
            ("12B", 12),
            ("64KiB", 64 << 10),
            ("64K", 64 << 10),
            ("1MiB", 1 << 20),
            (" 2 MiB ", 2 << 20),
            ("1GiB", 1 << 30),
            ("3G", 3 << 30),
            ("1TiB", 1 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for text in [
            "", "KiB", "-1", "1.5MiB", "64KB", "1MB", "64kib", "1PiB", "64 KiBs",
        ] {
            assert!(parse_size(text).is_err(), "{text} should be rejected");
        }
        assert!(parse_size("99999999999TiB").is_err_and(|e| e.contains("too large")));
        assert!(parse_size("1MB").is_err_and(|e| e.contains("ambiguous")));
    }

    #[test]
    fn durations() {
        let s = Duration::from_secs;
        for (text, expected) in [
            ("10s", s(10)),
            ("0s", s(0)),
            ("500ms", Duration::from_millis(500)),
            ("15m", s(900)),
            ("1h", s(3600)),
            ("1h30m", s(5400)),
            ("2d", s(172_800)),
            ("1w", s(604_800)),
            ("1w2d", s(777_600)),
            ("36h", s(129_600)),
            ("1m30s250ms", Duration::from_millis(90_250)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for text in [
            "",
            "10",
            "s",
            "1.5h",
            "10sec",
            "30m1h",
            "1h1h",
            "-1s",
            "1 h",
            "99999999999999d",
            "2d1w",
            "1W",
        ] {
            assert!(parse_duration(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn schedules() {
        let spaced = "0  */6  *  *  0".parse::<Schedule>();
        assert!(matches!(&spaced, Ok(Schedule::Cron(c)) if c.as_str() == "0 */6 * * 0"));
        let fields = "* * * *".parse::<Schedule>().unwrap_err();
        assert!(fields.contains("5-field cron"), "{fields}");
        let range = "60 * * * *".parse::<Schedule>().unwrap_err();
        assert!(
            range.starts_with("cron expression \"60 * * * *\" (minute hour"),
            "{range}"
        );
        let every = "every 1h30m".parse::<Schedule>();
        assert_eq!(every, Ok(Schedule::Every(Duration::from_secs(5400))));
        for cron in [
            "*/15 * * * *",
            "0 3 * * *",
            "0,30 8-18 * * 1-5",
            "5 0 1 1,4,7,10 *",
            "59 23 31 12 7",
            "0  */6  *  *  0",
            "*/15 9-17 * * mon-fri",
            "0 0 1 jan,jul *",
            "0 12 * * SAT,sun",
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "0 8-18/2 * * *",
        ] {
            let parsed = cron.parse::<Schedule>();
            assert!(
                matches!(parsed, Ok(Schedule::Cron(_))),
                "{cron}: {parsed:?}"
            );
        }
        for bad in [
            "every",
            "every 15",
            "hourly",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "10-5 * * * *",
            "1,,2 * * * *",
            "a * * * *",
            "-1 * * * *",
            "*/ * * * *",
            "@fortnightly",
            "@daily *",
            "0 0 * * * 2030",
            "* * * * mon-",
            "* * * foo *",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad} should be rejected");
        }
    }

    proptest! {
        #[test]
        fn sizes_round_trip(n in 0u64..(1 << 40)) {
            prop_assert_eq!(parse_size(&fmt_size(n)), Ok(n));
        }
    }
}
