//! The connections: sockets opened with `TCP_NODELAY` (and TLS) that
//! record whether the last write finished, greeted, authenticated and
//! pooled for reuse.

use super::*;

/// An open session with what [`Outbound::send`] needs to know about it.
pub(super) struct Conn {
    pub(super) smtp: AsyncSmtpConnection,
    /// The relay announced `SIZE` (RFC 1870), with this limit (`None`: no
    /// limit, `SIZE 0` or no number).
    pub(super) size: Option<Option<usize>>,
    pub(super) io: Arc<IoState>,
}

/// What the socket saw, read after a failure to tell "the end of the data
/// was never written" from "written, but no reply came".
#[derive(Debug, Default)]
pub(super) struct IoState {
    /// The last write or flush failed or had not completed: bytes handed
    /// to it may not have reached the kernel.
    pub(super) write_unfinished: AtomicBool,
}

impl IoState {
    pub(super) fn note<T>(&self, r: &std::task::Poll<std::io::Result<T>>) {
        let unfinished = !matches!(r, std::task::Poll::Ready(Ok(_)));
        self.write_unfinished.store(unfinished, Ordering::Relaxed);
    }

    pub(super) fn write_unfinished(&self) -> bool {
        self.write_unfinished.load(Ordering::Relaxed)
    }
}

/// A socket lettre can drive (`AsyncTokioStream` is lettre's trait for
/// caller-provided streams).
#[derive(Debug)]
pub(super) struct Plain(TcpStream, Arc<IoState>);

#[derive(Debug)]
pub(super) struct Wrapped(tokio_native_tls::TlsStream<TcpStream>, Arc<IoState>);

macro_rules! delegate_io {
    ($t:ty, $inner:ident => $get:expr) => {
        impl tokio::io::AsyncRead for $t {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
        impl tokio::io::AsyncWrite for $t {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let r = std::pin::Pin::new(&mut self.0).poll_write(cx, buf);
                self.1.note(&r);
                r
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let r = std::pin::Pin::new(&mut self.0).poll_flush(cx);
                self.1.note(&r);
                r
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
        impl AsyncTokioStream for $t {
            fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
                let $inner = &self.0;
                $get
            }
        }
    };
}

delegate_io!(Plain, s => s.peer_addr());
delegate_io!(Wrapped, s => s.get_ref().get_ref().get_ref().peer_addr());

/// A pooled connection idle for longer than this is checked with NOOP
/// before use: a relay that dropped it meanwhile must not turn the next
/// mail into one whose delivery is in doubt.
pub(super) const CHECK_AFTER_IDLE: Duration = Duration::from_secs(2);

impl Outbound {
    /// can have been delivered when this fails.
    pub(super) async fn connect(&self) -> Result<Conn, SmtpError> {
        use lettre::transport::smtp::commands::Ehlo;
        let i = &self.inner;
        let unreachable = |e: String| SmtpError::Unreachable(format!("{}: {e}", i.relay));
        let io = Arc::new(IoState::default());
        let work = async {
            let tcp = TcpStream::connect((i.host.as_str(), i.port))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tcp.set_nodelay(true)
                .map_err(|e| unreachable(e.to_string()))?;
            let stream: Box<dyn AsyncTokioStream> = match &i.implicit {
                Some(connector) => Box::new(Wrapped(
                    connector
                        .connect(&i.host, tcp)
                        .await
                        .map_err(|e| unreachable(format!("TLS: {e}")))?,
                    io.clone(),
                )),
                None => Box::new(Plain(tcp, io.clone())),
            };
            let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &i.hello)
                .await
                .map_err(|e| classify_setup(&e))?;
            if let Some(params) = &i.tls_parameters {
                if i.tls == SmtpTls::StartTls || conn.can_starttls() {
                    conn.starttls(params.clone(), &i.hello)
                        .await
                        .map_err(|e| classify_setup(&e))?;
                }
            }
            // lettre keeps only the EHLO keywords it uses itself; SIZE's
            // limit needs the reply. Asked once more (allowed any time,
            // RFC 5321 4.1.4), before AUTH.
            let ehlo = conn
                .command(Ehlo::new(i.hello.clone()))
                .await
                .map_err(|e| classify_setup(&e))?;
            let size = ehlo.message().skip(1).find_map(|line| {
                let mut words = line.split_whitespace();
                let keyword = words.next()?;
                keyword.eq_ignore_ascii_case("SIZE").then(|| {
                    words
                        .next()
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|n| *n > 0)
                })
            });
            if let Some(creds) = &i.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], creds)
                    .await
                    .map_err(|e| classify_setup(&e))?;
            }
            Ok(Conn {
                smtp: conn,
                size,
                io: io.clone(),
            })
        };
        tokio::time::timeout(i.timeout, work)
            .await
            .map_err(|_| unreachable("timed out while connecting".into()))?
    }

    /// A pooled connection that still answers, or a new one.
    pub(super) async fn checkout(&self) -> Result<Conn, SmtpError> {
        loop {
            let pooled = self.inner.idle.lock().expect("smtp pool").pop();
            let Some((mut conn, since)) = pooled else {
                return self.connect().await;
            };
            if since.elapsed() < CHECK_AFTER_IDLE {
                return Ok(conn);
            }
            let alive = tokio::time::timeout(self.inner.timeout, conn.smtp.test_connected()).await;
            if matches!(alive, Ok(true)) {
                return Ok(conn);
            }
            self.discard(conn).await;
        }
    }

    /// Returns a healthy connection to the pool.
    pub(super) fn put_back(&self, conn: Conn) {
        let mut idle = self.inner.idle.lock().expect("smtp pool");
        if idle.len() < self.inner.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    /// Closes a connection that is not reused. lettre's `abort` says QUIT
    /// and waits for the reply: bounded, since the relay may not answer.
    pub(super) async fn discard(&self, mut conn: Conn) {
        let wait = self.inner.timeout.min(Duration::from_secs(5));
        let _ = tokio::time::timeout(wait, conn.smtp.abort()).await;
    }
}
