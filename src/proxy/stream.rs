//! The byte streams of the proxy: a client's socket and a server connection's socket, each
//! either plain TCP or TLS over TCP, and their read and write halves for the relay.
//!
//! Plain TCP is the hot path and costs nothing extra: its halves are `TcpStream::split`'s,
//! behind one `match`, with no allocation and no trait object. A TLS stream sits in a
//! mutex so that both halves can reach it from `&self` (the relay polls a read and a write
//! in one `select!`, from one task, so the lock is never contended and never held across an
//! `.await`); splitting it allocates nothing either.
//!
//! rustls buffers what it encrypts: its `poll_write` may accept bytes that are not on the
//! socket yet when the socket is full, and only a later write or flush sends them. The relay
//! never flushes, so a TLS stream here flushes after every write, and, when that could not
//! finish, before every read, which the relay polls whenever it waits. Bytes accepted by a
//! write therefore always reach the peer without an explicit flush.

use parking_lot::Mutex;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp;
use tokio::net::TcpStream;

/// A socket that may have been upgraded to TLS. `T` is the TLS stream type of the side.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<Mutex<T>>),
}

/// A client's connection: plain, or TLS after an SSLRequest.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// A connection to a pod: plain, or TLS per `tls.pod_tls`.
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// The read half of a [`MaybeTls`] for the relay.
pub enum ReadHalf<'a, T> {
    Plain(tcp::ReadHalf<'a>),
    Tls(&'a Mutex<T>),
}

/// The write half of a [`MaybeTls`] for the relay.
pub enum WriteHalf<'a, T> {
    Plain(tcp::WriteHalf<'a>),
    Tls(&'a Mutex<T>),
}

impl<T> MaybeTls<T> {
    pub fn tls(stream: T) -> Self {
        MaybeTls::Tls(Box::new(Mutex::new(stream)))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// Read and write halves that can be polled at the same time.
    pub fn split(&mut self) -> (ReadHalf<'_, T>, WriteHalf<'_, T>) {
        match self {
            MaybeTls::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            MaybeTls::Tls(s) => (ReadHalf::Tls(s), WriteHalf::Tls(s)),
        }
    }
}

impl ClientStream {
    /// Runs the server side of a TLS handshake on a plain stream, which then becomes the
    /// TLS stream.
    pub async fn accept_tls(&mut self, acceptor: &tokio_rustls::TlsAcceptor) -> io::Result<()> {
        let MaybeTls::Plain(tcp) = self else {
            return Err(io::Error::other("the connection is encrypted already"));
        };
        // The handshake takes the socket by value, but `self` must stay a stream meanwhile:
        // the caller's authentication timeout may drop this future and then still write to
        // `self`. So `self` holds a duplicate descriptor of the same connection until the
        // handshake is done; a once-per-connection dup(2), off the relay's path.
        let dup = std::net::TcpStream::from(tcp.as_fd().try_clone_to_owned()?);
        let tcp = std::mem::replace(tcp, TcpStream::from_std(dup)?);
        let tls = acceptor.accept(tcp).await?;
        *self = MaybeTls::tls(tls);
        Ok(())
    }
}

impl ServerStream {
    /// Whether an idle connection still looks alive: no EOF and no unsolicited bytes (a
    /// server shutting down sends a FATAL before closing). A connection idle for less than
    /// `PEEK_AFTER` whose socket the runtime has seen nothing arrive on is taken as alive
    /// without a system call (the hot path: one syscall per checkout was a fifth of the
    /// router's system calls per transaction); otherwise a real non-blocking peek decides,
    /// since the runtime's readiness may lag the pod's FIN, and a peek consumes nothing
    /// (not even TLS records).
    pub fn looks_alive(&self, idle_for: std::time::Duration) -> bool {
        match self {
            MaybeTls::Plain(s) => tcp_looks_alive(s, idle_for),
            MaybeTls::Tls(s) => tcp_looks_alive(s.lock().get_ref().0, idle_for),
        }
    }
}

/// [`ServerStream::looks_alive`] on the TCP socket under the stream.
fn tcp_looks_alive(tcp: &TcpStream, idle_for: std::time::Duration) -> bool {
    use futures_util::FutureExt;
    use std::os::fd::AsRawFd;
    let readiness_seen = || {
        std::future::poll_fn(|cx| tcp.poll_read_ready(cx))
            .now_or_never()
            .is_some()
    };
    if idle_for < PEEK_AFTER && !readiness_seen() {
        return true;
    }
    let mut probe = [0u8; 1];
    let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    matches!(
        nix::sys::socket::recv(tcp.as_raw_fd(), &mut probe, flags),
        Err(nix::errno::Errno::EAGAIN)
    )
}

/// Idle connections younger than this are checked by the runtime's readiness alone (see
/// [`ServerStream::looks_alive`]): far longer than the runtime takes to see an event the
/// kernel queued, far shorter than the idle time of a pool that is not busy.
const PEEK_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

// === TLS plumbing shared by whole streams and halves ===

/// Sends what rustls still holds from earlier writes; `Pending` leaves it for later.
fn flush_pending<T: AsyncWrite + Unpin>(s: &mut T, cx: &mut Context<'_>) -> io::Result<()> {
    match Pin::new(s).poll_flush(cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Ok(()),
    }
}

fn tls_read<T: AsyncRead + AsyncWrite + Unpin>(
    s: &mut T,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    flush_pending(s, cx)?;
    Pin::new(s).poll_read(cx, buf)
}

fn tls_write<T: AsyncWrite + Unpin>(
    s: &mut T,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    let n = std::task::ready!(Pin::new(&mut *s).poll_write(cx, buf))?;
    flush_pending(s, cx)?;
    Poll::Ready(Ok(n))
}

// === impl AsyncRead/AsyncWrite ===

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => tls_read(s.get_mut(), cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => tls_write(s.get_mut(), cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.get_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.get_mut()).poll_shutdown(cx),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ReadHalf<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => tls_read(&mut *s.lock(), cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WriteHalf<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => tls_write(&mut *s.lock(), cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(&mut *s.lock()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(&mut *s.lock()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{PrivateKeyDer, ServerName};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

    /// The relay stops writing once a write has been accepted and then only waits on reads.
    /// rustls may still hold encrypted bytes of accepted writes when the socket was full;
    /// those must reach the peer anyway. Here the peer reads nothing until the router's
    /// socket and rustls' buffer are full, so bytes are certainly held back.
    #[tokio::test]
    async fn tls_bytes_accepted_by_writes_reach_the_peer_while_only_reads_are_polled() {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        });
        let mut stream = ClientStream::Plain(listener.accept().await.unwrap().0);
        stream
            .accept_tls(&tokio_rustls::TlsAcceptor::from(Arc::new(server)))
            .await
            .unwrap();
        assert!(stream.is_tls());
        let mut peer = peer.await.unwrap();

        let (mut r, mut w) = stream.split();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while let Ok(written) =
            tokio::time::timeout(Duration::from_millis(200), w.write(&chunk)).await
        {
            sent += written.unwrap();
        }
        let receive_all = async {
            let mut got = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while got < sent {
                let n = peer.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {got} of {sent} bytes");
                got += n;
            }
            got
        };
        let mut one = [0u8; 1];
        tokio::select! {
            got = tokio::time::timeout(Duration::from_secs(20), receive_all) => {
                assert_eq!(got.expect("every accepted byte reaches the peer"), sent);
            }
            _ = r.read(&mut one) => panic!("the peer sent nothing"),
        }
    }
}
