//! Wall-clock time in Unix milliseconds, the unit of furrow/1 timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds as an RFC 3339 UTC date to the second
/// (`2026-12-04T13:16:06Z`), for people; `-` for 0 (never).
pub fn rfc3339(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates_for_people() {
        assert_eq!(rfc3339(1_763_683_200_123), "2025-11-21T00:00:00Z");
        assert_eq!(rfc3339(0), "-");
        assert_eq!(rfc3339(u64::MAX), format!("{} ms", u64::MAX));
    }
}
