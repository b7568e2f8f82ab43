//! Wall-clock helpers shared by every stage: Unix milliseconds and the ISO 8601 forms Lambda
//! prints.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, Unix ms, unsigned (for deadlines and wire fields that are `u64`).
#[must_use]
pub fn unix_ms() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

/// Now, Unix ms.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `ms` (Unix) as `YYYY-MM-DDTHH:MM:SS.mmm` followed by `zone` (`Z` for destination records,
/// `+0000` for `LastModified`), proleptic Gregorian (Howard Hinnant's days-to-civil algorithm).
#[must_use]
pub fn iso8601(ms: i64, zone: &str) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}{zone}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::iso8601;

    #[test]
    fn dates_format_like_lambda() {
        assert_eq!(iso8601(0, "Z"), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso8601(1_573_755_365_568, "+0000"),
            "2019-11-14T18:16:05.568+0000"
        );
        assert_eq!(iso8601(951_782_400_000, "Z"), "2000-02-29T00:00:00.000Z");
    }
}
