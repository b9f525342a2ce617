//! Reading without ever holding more than a limit: one line at a time,
//! and a whole DATA phase (dot-stuffing undone, bare CR/LF refused).

use std::io;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::MAX_DATA_LINE;

/// The outcome of reading one line.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LineRead {
    /// A complete line (with its LF) is in the buffer.
    Line,
    /// Longer than the limit; it was read to its end and dropped.
    TooLong,
    /// The client closed the connection (possibly mid-line).
    Eof,
}

/// Reads one line of at most `limit` octets into `buf` without ever
/// holding more than that.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<LineRead> {
    let mut overflow = false;
    loop {
        let avail = rd.fill_buf().await?;
        if avail.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (take, complete) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if !overflow {
            if buf.len() + take <= limit {
                buf.extend_from_slice(&avail[..take]);
            } else {
                overflow = true;
                buf.clear();
            }
        }
        rd.consume(take);
        if complete {
            return Ok(if overflow {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// What became of a DATA phase.
#[derive(Debug, PartialEq, Eq)]
pub enum DataRead {
    Message(Vec<u8>),
    TooBig,
    LineTooLong,
    /// A LF without CR, or a CR without LF.
    BareLineEnd,
    Eof,
    Timeout,
    /// `data-timeout` passed (the session's own deadline, not a read's).
    Deadline,
}

/// Reads message data up to the `.` line, undoing dot-stuffing, keeping at
/// most `max` octets.
pub async fn read_data<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    max: usize,
    timeout: std::time::Duration,
) -> io::Result<DataRead> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    let (mut too_big, mut too_long) = (false, false);
    loop {
        line.clear();
        let read =
            match tokio::time::timeout(timeout, read_line(rd, &mut line, MAX_DATA_LINE)).await {
                Ok(r) => r?,
                Err(_) => return Ok(DataRead::Timeout),
            };
        match read {
            LineRead::Eof => return Ok(DataRead::Eof),
            LineRead::TooLong => {
                too_long = true;
                continue;
            }
            LineRead::Line => {}
        }
        // The line ends at its first LF, so a bare LF shows as a missing
        // CR before it; a bare CR is one anywhere before the final CRLF.
        if !line.ends_with(b"\r\n") || line[..line.len() - 2].contains(&b'\r') {
            return Ok(DataRead::BareLineEnd);
        }
        if line == b".\r\n" {
            break;
        }
        let part = line.strip_prefix(b".").unwrap_or(&line);
        if too_big || data.len() + part.len() > max {
            // Keep reading to the end to stay in sync, but keep nothing.
            too_big = true;
            data = Vec::new();
        } else {
            data.extend_from_slice(part);
        }
    }
    Ok(if too_long {
        DataRead::LineTooLong
    } else if too_big {
        DataRead::TooBig
    } else {
        DataRead::Message(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn lines_are_bounded() {
        let input: &[u8] = b"short\r\n0123456789abcdef\r\nnext\n";
        let mut rd = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"short\r\n");
        buf.clear();
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::TooLong
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"next\n");
        buf.clear();
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::Eof
        );
    }

    async fn data(input: &[u8], max: usize) -> DataRead {
        let mut rd = BufReader::new(input);
        read_data(&mut rd, max, Duration::from_secs(1))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_8bit_kept() {
        assert_eq!(
            data(b"Subject: x\r\n\r\n..dot\r\n\xff\xfe\r\n.\r\nQUIT\r\n", 100).await,
            DataRead::Message(b"Subject: x\r\n\r\n.dot\r\n\xff\xfe\r\n".to_vec())
        );
    }

    #[tokio::test]
    async fn data_refusals() {
        assert_eq!(data(b"0123456789\r\n.\r\n", 5).await, DataRead::TooBig);
        assert_eq!(data(b"a\nb\r\n.\r\n", 100).await, DataRead::BareLineEnd);
        // Refused at the first bare LF, before any "end" it may suggest.
        assert_eq!(data(b"a\r\n.\nRSET\r\n", 100).await, DataRead::BareLineEnd);
        // Bare CR: inside a line, and the <CR>.<CR> "end" some relays see.
        assert_eq!(data(b"a\rb\r\n.\r\n", 100).await, DataRead::BareLineEnd);
        assert_eq!(
            data(b"x\r\n\r.\rMAIL FROM:<e@x>\r\n.\r\n", 100).await,
            DataRead::BareLineEnd
        );
        assert_eq!(data(b"a\r\r\n.\r\n", 100).await, DataRead::BareLineEnd);
        assert_eq!(data(b"a\r\nno end", 100).await, DataRead::Eof);
        let mut long = vec![b'x'; MAX_DATA_LINE + 1];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(data(&long, usize::MAX).await, DataRead::LineTooLong);
    }
}
