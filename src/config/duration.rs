//! Durations as operators write them (`250ms`, `90s`, `15m`, `1h30m`) and as tether prints them.
//!
//! Parsing is strict: an unknown unit, a missing number or an empty string is refused with the
//! offending text, so a typo in `--deadline` can never silently become "no deadline".

use std::time::Duration;

/// Parse `<n><unit>` pairs, largest unit first and each at most once (`1h30m`, `2m30s`,
/// `1s500ms`; units `h`, `m`, `s`, `ms`), or a bare number of seconds (`90`), as `timeout(1)`
/// reads one. `2h2h`, `30m1h` and units tether does not know (`1d`) are refused: a deadline
/// written wrong must fail loudly, not mean something else.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let bad = || {
        format!(
            "invalid duration {text:?} (use forms like 250ms, 90s, 15m, 1h30m, \
             or a number of seconds)"
        )
    };
    if t.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = t.parse().map_err(|_| bad())?;
        return secs
            .checked_mul(1_000)
            .map(Duration::from_millis)
            .ok_or_else(bad);
    }
    let mut total: u128 = 0;
    let mut rest = t;
    // The unit before, as its length in ms: each next unit must be smaller.
    let mut previous = u128::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u128 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        if unit_ms >= previous {
            return Err(bad());
        }
        previous = unit_ms;
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    let ms = u64::try_from(total).map_err(|_| bad())?;
    Ok(Duration::from_millis(ms))
}

/// Human form for log lines: `12ms`, `4.2s`, `3m07s`, `2h05m`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 3_600_000 {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = d.as_secs() / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// Human form of an age measured in whole seconds (a lock's or a record's age): `0s`, `45s`,
/// `3m12s`, `2h05m` — never `0ms`, a precision it was not measured with.
pub(crate) fn human_secs(secs: u64) -> String {
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3_600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        let m = secs / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// The canonical form of a configured duration (`60m` stays `60m`, `90s` stays `90s`).
pub(crate) fn canonical(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1_000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s.is_multiple_of(3_600) {
        format!("{}h", s / 3_600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("1s500ms"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse("2h0m5s"), Ok(Duration::from_secs(7_205)));
        // A bare number is seconds, as timeout(1) reads it.
        assert_eq!(parse("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse(" 90 "), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn refuses_garbage_naming_it() {
        for bad in [
            "",
            "1d",
            "2h2h",
            "30m1h",
            "1s1m",
            "5ms5s",
            "18446744073709552",
            "x",
            "10x",
            "m5",
            "1h-3m",
            "5 m",
            "99999999999999999999999h",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn ages_in_whole_seconds_print_in_seconds() {
        for (secs, text) in [
            (0, "0s"),
            (1, "1s"),
            (59, "59s"),
            (60, "1m00s"),
            (192, "3m12s"),
            (3_599, "59m59s"),
            (3_600, "1h00m"),
            (7_500, "2h05m"),
            (90_000, "25h00m"),
        ] {
            assert_eq!(human_secs(secs), text, "{secs} s");
        }
    }

    #[test]
    fn prints_humanly_and_canonically() {
        assert_eq!(human(Duration::from_millis(12)), "12ms");
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(45), "45s");
        assert_eq!(human_secs(192), "3m12s");
        assert_eq!(human_secs(7_500), "2h05m");
        assert_eq!(human(Duration::from_millis(4_200)), "4.2s");
        assert_eq!(human(Duration::from_secs(187)), "3m07s");
        assert_eq!(human(Duration::from_secs(7_500)), "2h05m");
        assert_eq!(canonical(Duration::from_secs(3_600)), "1h");
        assert_eq!(canonical(Duration::from_secs(5_400)), "90m");
        assert_eq!(canonical(Duration::from_secs(90)), "90s");
        assert_eq!(canonical(Duration::from_millis(1_500)), "1500ms");
    }
}
