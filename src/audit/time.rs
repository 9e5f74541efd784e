//! Wall-clock helpers for records and review: unix milliseconds <-> RFC 3339 UTC, and `--since` parsing.

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-26T23:10:05.123Z`.
pub fn format_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// Parses `--since`: a duration back from `now_ms` (`90s`, `15m`, `2h`, `7d`) or a UTC time
/// (`2026-11-26T10:00:00Z`, `2026-11-26`). Returns unix milliseconds.
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
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let mut dp = date.split('-');
    let (y, m, d) = (dp.next(), dp.next(), dp.next());
    let (Some(y), Some(m), Some(d), None) = (y, m, d, dp.next()) else {
        return Err(bad());
    };
    let (y, m, d) = (
        y.parse::<i64>().map_err(|_| bad())?,
        m.parse::<u32>().map_err(|_| bad())?,
        d.parse::<u32>().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let mut tp = time.split(':');
    let h = tp
        .next()
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(bad)?;
    let mi = tp
        .next()
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(bad)?;
    let sec = tp
        .next()
        .map(|v| v.parse::<f64>().map_err(|_| bad()))
        .transpose()?
        .unwrap_or(0.0);
    Ok(days_from_civil(y, m, d) * 86_400_000 + h * 3_600_000 + mi * 60_000 + (sec * 1000.0) as i64)
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
}
