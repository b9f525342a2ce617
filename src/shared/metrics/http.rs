//! The `/metrics` HTTP endpoint both daemons serve.
//!
//! Why a hand-written HTTP reader instead of `hyper`: the endpoint answers
//! one GET on a fixed path and nothing else. A bounded read of one request
//! head (request line + headers, at most [`ServeLimits::max_head`] bytes,
//! within [`ServeLimits::head_timeout`]), a fixed response and
//! `Connection: close` is about a hundred lines that are easy to audit,
//! whereas hyper + hyper-util + http-body would add several crates and an
//! API to keep up with for that surface. Keep-alive is deliberately not
//! offered: Prometheus scrapes every 15–60 s and reconnecting costs nothing.
//!
//! [`serve`] serves any [`Exposition`], so the alert router's metrics
//! (`route::metrics`) use the same endpoint code with their own registry.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{to_classic_text, Format};

/// Limits of the `/metrics` server against clients that are slow, huge or
/// many. [`serve`] uses [`ServeLimits::default`].
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// The whole request head must arrive within this time (slowloris).
    pub head_timeout: Duration,
    /// Largest request head accepted, in bytes.
    pub max_head: usize,
    /// Connections handled at once; more are closed right away.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            head_timeout: Duration::from_secs(5),
            max_head: 8 * 1024,
            max_connections: 32,
        }
    }
}

/// What the `/metrics` endpoint serves: anything that can render its
/// current values as an exposition page. The notifier's `notify::metrics::Metrics` and the
/// alert router's `route::metrics::RouteMetrics` share one HTTP server.
/// Rendering may do a little I/O first (the router counts its spool
/// directory at scrape time), hence a future.
pub trait Exposition: Send + Sync + 'static {
    /// The page in the OpenMetrics format ([`super::CONTENT_TYPE`]); the server
    /// converts it for clients that want the classic one.
    fn render(&self) -> BoxFuture<'_, String>;
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, then
/// returns. Binding is the caller's job, so a taken port is a clear startup
/// error there. Errors accepting one connection are logged and do not end
/// the server (a flood of clients must not stop the mailer's metrics).
pub async fn serve<M: Exposition + ?Sized>(
    listener: TcpListener,
    metrics: Arc<M>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, metrics, shutdown, ServeLimits::default()).await
}

/// [`serve`] with explicit limits (the tests use short timeouts).
pub async fn serve_with<M: Exposition + ?Sized>(
    listener: TcpListener,
    metrics: Arc<M>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of
                        // spinning on the same error.
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("metrics endpoint: too many connections, closing {peer}");
                    drop(stream);
                    continue;
                };
                let metrics = metrics.clone();
                let limits = limits.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    if let Err(e) = handle(stream, &*metrics, &limits).await {
                        tracing::debug!("metrics endpoint: {peer}: {e}");
                    }
                });
            }
        }
    }
    // Scrapes in flight are cut off: a scraper retries, and shutdown must not
    // wait for a slow client.
    conns.shutdown().await;
    Ok(())
}

/// Why a connection was closed without a normal response.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("request head not complete within {0:?}")]
    Timeout(Duration),
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("connection closed before a complete request head")]
    Incomplete,
    #[error("malformed request line")]
    Malformed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One connection: read one request head, answer, close.
async fn handle<M: Exposition + ?Sized>(
    mut stream: TcpStream,
    metrics: &M,
    limits: &ServeLimits,
) -> Result<(), ConnError> {
    let head =
        match tokio::time::timeout(limits.head_timeout, read_head(&mut stream, limits.max_head))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnError::Timeout(limits.head_timeout)),
        };
    let head = match head {
        Ok(h) => h,
        Err(e @ ConnError::TooLarge(_)) => {
            respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                "text/plain; charset=utf-8",
                b"request head too large\n",
                true,
            )
            .await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let Some((method, target)) = parse_request_line(&head) else {
        respond(
            &mut stream,
            400,
            "Bad Request",
            "text/plain; charset=utf-8",
            b"bad request\n",
            true,
        )
        .await?;
        return Err(ConnError::Malformed);
    };
    let with_body = method == "GET";
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            b"only GET and HEAD\n",
            true,
        )
        .await;
    }
    // The query string is ignored (Prometheus may add ?name[]=… parameters).
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => {
            let format = Format::negotiate(header(&head, "accept"));
            let page = metrics.render().await;
            let body = match format {
                Format::OpenMetrics => page,
                Format::Classic => to_classic_text(&page),
            };
            respond(
                &mut stream,
                200,
                "OK",
                format.content_type(),
                body.as_bytes(),
                with_body,
            )
            .await
        }
        "/" => {
            respond(
                &mut stream,
                200,
                "OK",
                "text/plain; charset=utf-8",
                b"mailgend: metrics are at /metrics\n",
                with_body,
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "Not Found",
                "text/plain; charset=utf-8",
                b"not found; metrics are at /metrics\n",
                with_body,
            )
            .await
        }
    }
}

/// Reads until the blank line that ends the request head. Returns the head
/// (without the blank line); what follows (a body) is never read, since the
/// connection is closed after the response.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<String, ConnError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnError::Incomplete);
        }
        buf.extend_from_slice(&chunk[..n]);
        // Bare LF line ends are tolerated (RFC 9112 §2.2), hence both forms.
        let end = match (find(&buf, b"\r\n\r\n"), find(&buf, b"\n\n")) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(end) = end {
            if end > max {
                return Err(ConnError::TooLarge(max));
            }
            return String::from_utf8(buf[..end].to_vec()).map_err(|_| ConnError::Malformed);
        }
        if buf.len() > max {
            return Err(ConnError::TooLarge(max));
        }
    }
}

/// The value of header `name` (lower case) in a request head; the first
/// one when repeated.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `METHOD SP request-target SP HTTP/1.x` → (method, target).
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return None;
    }
    Some((method, target))
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> Result<(), ConnError> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    if with_body {
        out.extend_from_slice(body);
    }
    // A client that stops reading must not hold the task forever either.
    match tokio::time::timeout(Duration::from_secs(10), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r.map_err(ConnError::Io),
        Err(_) => Err(ConnError::Timeout(Duration::from_secs(10))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup() {
        let head = "GET /metrics HTTP/1.1\r\nHost: x\r\nACCEPT:  text/plain \r\nAccept: b";
        assert_eq!(header(head, "accept"), Some("text/plain"));
        assert_eq!(header(head, "user-agent"), None);
        assert_eq!(header("GET /accept: x HTTP/1.1", "get /accept"), None);
    }

    #[test]
    fn request_line_parsing() {
        assert_eq!(
            parse_request_line("GET /metrics HTTP/1.1\r\nHost: x"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line("HEAD /?a=b HTTP/1.0"),
            Some(("HEAD", "/?a=b"))
        );
        assert_eq!(parse_request_line("GET /metrics"), None);
        assert_eq!(parse_request_line("GET metrics HTTP/1.1"), None);
        assert_eq!(parse_request_line("GET /metrics HTTP/2 x"), None);
        assert_eq!(parse_request_line("\u{16}\u{3}\u{1} /x HTTP/1.1"), None);
        assert_eq!(parse_request_line(""), None);
    }
}
