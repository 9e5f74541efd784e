//! Wall-clock time and record ids, in one place: Unix milliseconds, the data path's `Instant` -> wall clock
//! mapping, UUIDv7 ids, and the RFC 3339 / `--since` text forms review commands print and read (the `time`
//! crate does the calendar).
//!
//! A leaf module: audit, the inspectors and the CLI use it; it uses nothing of the crate. The sans-IO core
//! never calls it (time is passed in).
#![deny(unsafe_code)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    (unix_ms() / 1000).max(0) as u64
}

/// Maps the data path's monotonic `Instant`s to wall-clock milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    instant: Instant,
    unix_ms: i64,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            unix_ms: unix_ms(),
        }
    }

    pub fn unix_ms(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.unix_ms + d.as_millis() as i64,
            None => self.unix_ms - self.instant.duration_since(at).as_millis() as i64,
        }
    }
}

/// A new time-ordered id (UUIDv7, hyphenated text).
pub fn uuid_v7() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A random non-negative 63-bit id (run ids).
pub fn random_id() -> i64 {
    (rand::random::<u64>() >> 1) as i64
}

/// `2026-11-26T23:10:05.123Z`.
pub fn format_ms(ms: i64) -> String {
    let t = if ms < 0 {
        OffsetDateTime::UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    } else {
        OffsetDateTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The UTC calendar date and time of `unix_seconds`, or `None` past what the calendar holds.
pub fn utc_datetime(unix_seconds: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix_seconds).ok()
}

/// Parses `--since`: a duration back from `now_ms` (`90s`, `15m`, `2h`, `7d`) or a UTC time
/// (`2026-11-26T10:00:00Z`, `2026-11-26T10:00:00.5Z`, `2026-11-26`). Returns unix milliseconds.
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    let unit = |c: char| match c {
        's' => Some(1_000),
        'm' => Some(60_000),
        'h' => Some(3_600_000),
        'd' => Some(86_400_000),
        _ => None,
    };
    if let Some(last) = s.chars().last() {
        if let (Some(mult), Ok(n)) = (unit(last), s[..s.len() - 1].parse::<i64>()) {
            return Ok(now_ms - n * mult);
        }
    }
    let bad = || {
        format!("{s:?} is neither a duration (like 15m, 2h, 7d) nor a UTC time (like 2026-11-26T10:00:00Z)")
    };
    let t = if s.contains('T') {
        OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?
    } else {
        let fmt = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]")
            .map_err(|_| bad())?;
        let d = Date::parse(s, &fmt).map_err(|_| bad())?;
        PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_utc()
    };
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// The `--since` option of the review commands, as unix milliseconds.
pub fn since_arg(since: Option<String>, now_ms: i64) -> anyhow::Result<Option<i64>> {
    since
        .map(|s| parse_since(&s, now_ms))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--since: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_utc() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        let t = parse_since("2026-11-26T23:10:05.123Z", 0).unwrap();
        assert_eq!(format_ms(t), "2026-11-26T23:10:05.123Z");
        assert_eq!(parse_since("2000-03-01", 0).unwrap(), 951_868_800_000);
    }

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(
            parse_since("15m", 1_000_000_000).unwrap(),
            1_000_000_000 - 900_000
        );
        assert_eq!(
            parse_since("2d", 200_000_000_000).unwrap(),
            200_000_000_000 - 172_800_000
        );
        assert!(parse_since("yesterday", 0).is_err());
        assert!(parse_since("2026-13-01", 0).is_err());
    }

    #[test]
    fn ids_are_uuid_v7_and_ordered() {
        let a = uuid_v7();
        std::thread::sleep(Duration::from_millis(2));
        let b = uuid_v7();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        assert!(a < b);
    }
}
