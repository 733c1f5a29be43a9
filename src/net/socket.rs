//! The site's UDP socket, and knowing when it is closed.
//!
//! quinn's endpoint owns its socket, and the endpoint's driver task drops it once the last
//! endpoint handle and connection are gone; on a multi-threaded runtime that happens on another
//! worker, some time after [`crate::Node::shutdown`] dropped its own handles. A restart on the
//! same address must wait for it, or it fails with "address in use". [`tracked_runtime`] wraps
//! the socket so that closing it completes a [`Released`] future: shutdown awaits that event
//! instead of guessing with sleeps.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::sync::oneshot;

/// Binds the site's UDP socket with large kernel buffers: at replication rates the default
/// ~200 KiB receive buffer overflows during bursts, and every drop costs QUIC a congestion-window
/// cut. The kernel caps the request at `net.core.rmem_max` / `wmem_max`.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Completes once the socket wrapped by the matching [`tracked_runtime`] is closed.
pub(crate) type Released = oneshot::Receiver<()>;

/// The tokio runtime for quinn, with the endpoint's socket wrapped so that closing it completes
/// the returned [`Released`].
pub(crate) fn tracked_runtime() -> (Arc<dyn Runtime>, Released) {
    let (tx, rx) = oneshot::channel();
    (
        Arc::new(Tracked {
            on_close: Mutex::new(Some(tx)),
        }),
        rx,
    )
}

#[derive(Debug)]
struct Tracked {
    on_close: Mutex<Option<oneshot::Sender<()>>>,
}

impl Runtime for Tracked {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = TokioRuntime.wrap_udp_socket(t)?;
        let on_close = self.on_close.lock().expect("tracker lock").take();
        Ok(Arc::new(Socket {
            inner,
            _on_close: on_close,
        }))
    }
}

/// The wrapped socket. Field order matters: `inner` (the descriptor) drops before `_on_close`
/// signals.
struct Socket {
    inner: Arc<dyn AsyncUdpSocket>,
    _on_close: Option<oneshot::Sender<()>>,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// A poller that keeps the wrapped socket (and so the signal) alive as long as it lives; its
/// inner poller, which holds the descriptor, drops first.
#[derive(Debug)]
struct Poller {
    inner: Pin<Box<dyn UdpPoller>>,
    _socket: Arc<Socket>,
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_writable(cx)
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            inner: self.inner.clone().create_io_poller(),
            _socket: self,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
