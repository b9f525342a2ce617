//! One "did you mean" for the three configuration languages (the JSON
//! config, the format files, the router's YAML), so a typo gets the same
//! hint wherever it is made.

/// The known key `key` is most likely a typo of, if any: equal but for
/// case, `-`/`_` or a trailing `s`, or within a few edits (insertions,
/// deletions, substitutions, swaps of neighbours: `remote-smpt`), one per
/// four characters of the known key, at least one. Ties go to the
/// earlier key in `known`.
pub fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    let key = norm(key);
    let mut best: Option<(usize, &'k str)> = None;
    for &k in known {
        let candidate = norm(k);
        let d = if candidate.trim_end_matches('s') == key.trim_end_matches('s') {
            0
        } else {
            distance(&key, &candidate)
        };
        if d <= (candidate.chars().count() / 4).max(1) && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

/// Optimal string alignment distance.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn typos_find_their_key() {
        let known = ["columns", "column_titles", "match", "events", "remote-smtp"];
        for (typo, key) in [
            ("colums", "columns"),
            ("colums_titles", "column_titles"),
            ("Column-Titles", "column_titles"),
            ("event", "events"),
            ("remote-smpt", "remote-smtp"),
            ("remote_smtp", "remote-smtp"),
            ("mtach", "match"),
        ] {
            assert_eq!(did_you_mean(typo, &known), Some(key), "{typo}");
        }
    }

    #[test]
    fn unrelated_words_get_no_hint() {
        let known = ["columns", "match", "to", "cc"];
        for word in ["zzz", "templates", "xy", "subject"] {
            assert_eq!(did_you_mean(word, &known), None, "{word}");
        }
    }

    #[test]
    fn the_closest_wins() {
        assert_eq!(
            did_you_mean("filtre", &["filters", "filter"]),
            Some("filter")
        );
    }
}
