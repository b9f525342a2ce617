//! Durations as operators write them in format files and in the
//! `mailgend.bounces.window` key: `"15m"`, `"1h30m"`, `"2d"`, `"45s"`.

/// Digits followed by a unit (`d`, `h`, `m`, `s`), repeated; `None` for an
/// empty string, a bare number, another unit or an overflow.
pub fn parse_duration(s: &str) -> Option<chrono::Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let n: i64 = num.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        num.clear();
    }
    if !num.is_empty() {
        return None;
    }
    chrono::Duration::try_seconds(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn units_and_refusals() {
        assert_eq!(parse_duration("1d12h"), Some(Duration::hours(36)));
        assert_eq!(parse_duration(" 45s "), Some(Duration::seconds(45)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("90"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
    }
}
