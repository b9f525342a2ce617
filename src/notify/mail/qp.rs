//! Quoted-printable exactly as Python's email package writes it.

use super::MAXLEN;

/// Bytes `quoprimime.body_encode` leaves alone (besides CR and LF).
fn qp_body_safe(b: u8) -> bool {
    b == b'\t' || ((b' '..=b'~').contains(&b) && b != b'=')
}

/// Python's `email.quoprimime.body_encode(body, maxlinelen)` with `eol`
/// `"\n"`, where `body` holds one character per byte (Python gets the
/// UTF-8 bytes as a latin-1 string).
pub fn qp_body_encode(body: &[u8], maxlinelen: usize) -> String {
    assert!(maxlinelen >= 4, "maxlinelen must be at least 4");
    if body.is_empty() {
        return String::new();
    }
    let mut translated = String::with_capacity(body.len() * 2);
    for &b in body {
        if qp_body_safe(b) || b == b'\r' || b == b'\n' {
            translated.push(b as char);
        } else {
            translated.push_str(&format!("={b:02X}"));
        }
    }
    let maxlinelen = maxlinelen as isize;
    let maxlinelen1 = maxlinelen - 1;
    let mut encoded: Vec<String> = Vec::new();
    for line in splitlines(&translated) {
        let line = line.as_bytes();
        let len = line.len() as isize;
        let piece = |a: isize, b: isize| -> &str {
            let a = a.clamp(0, len) as usize;
            let b = b.clamp(0, len) as usize;
            std::str::from_utf8(&line[a..b.max(a)]).expect("ASCII")
        };
        let mut start: isize = 0;
        let laststart = len - 1 - maxlinelen;
        while start <= laststart {
            let stop = start + maxlinelen1;
            if line[(stop - 2) as usize] == b'=' {
                encoded.push(piece(start, stop - 1).to_string());
                start = stop - 2;
            } else if line[(stop - 1) as usize] == b'=' {
                encoded.push(piece(start, stop).to_string());
                start = stop - 1;
            } else {
                encoded.push(format!("{}=", piece(start, stop)));
                start = stop;
            }
        }
        match line.last() {
            Some(&ws @ (b' ' | b'\t')) => {
                let room = start - laststart;
                let quoted = format!("={ws:02X}");
                let q = if room >= 3 {
                    quoted
                } else if room == 2 {
                    format!("{}=\n", ws as char)
                } else {
                    format!("=\n{quoted}")
                };
                encoded.push(format!("{}{q}", piece(start, len - 1)));
            }
            _ => encoded.push(piece(start, len).to_string()),
        }
    }
    if translated.ends_with(['\r', '\n']) {
        encoded.push(String::new());
    }
    encoded.join("\n")
}

/// Python's `str.splitlines` for text holding only ASCII: splits at CRLF,
/// CR and LF; no empty last element for a final line end.
fn splitlines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find(['\r', '\n']) {
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

/// The quoted-printable payload of a text part as intelmq-mailgen writes
/// it: line ends (CRLF, CR, LF) normalised to one LF, a final line end
/// added, `body_encode` at 78 columns, then every `From ` replaced by
/// `From=20` (anywhere, as the old content manager does).
pub fn encode_text_qp(text: &str) -> String {
    let mut normal = Vec::with_capacity(text.len() + 1);
    for (i, line) in splitlines_bytes(text.as_bytes()).into_iter().enumerate() {
        if i > 0 {
            normal.push(b'\n');
        }
        normal.extend_from_slice(line);
    }
    normal.push(b'\n');
    qp_body_encode(&normal, MAXLEN).replace("From ", "From=20")
}

/// `bytes.splitlines()`: CRLF, CR and LF only.
fn splitlines_bytes(s: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qp_examples() {
        assert_eq!(qp_body_encode(b"", 78), "");
        assert_eq!(qp_body_encode(b"\n", 78), "\n");
        assert_eq!(qp_body_encode(b"a=b \n", 78), "a=3Db=20\n");
        assert_eq!(encode_text_qp("From x\r\ny"), "From=20x\ny\n");
        assert_eq!(encode_text_qp(""), "\n");
    }
}
