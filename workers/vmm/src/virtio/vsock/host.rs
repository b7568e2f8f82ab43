//! The host side of the vsock device: listeners for guest-initiated connections and streams
//! implementing tokio's `AsyncRead`/`AsyncWrite`.
//!
//! State shared with the device thread lives in [`Shared`] behind one mutex; the device wakes
//! host tasks through their wakers, and host tasks wake the device through its eventfd.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::num::Wrapping;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmm_sys_util::eventfd::EventFd;

/// Receive buffer advertised to the guest per connection (guest → host bytes the host holds).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Host → guest bytes buffered per connection before writers wait.
pub const HOST_TX_CAP: usize = 256 * 1024;
/// Connections per VM.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections waiting in one listener's accept queue.
pub const LISTEN_BACKLOG: usize = 16;
/// Control packets waiting for guest receive buffers; more are dropped (they are resets and
/// credit updates, which the protocol recovers from).
pub const MAX_PENDING_CONTROL: usize = 256;

/// Errors of the host-side API.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Another listener holds the port.
    #[error("listen on vsock port {0}: already in use")]
    AddrInUse(u32),
    /// The device fail-stopped or the VM is gone.
    #[error("the vsock device is stopped")]
    DeviceStopped,
    /// Creating the device's eventfd.
    #[error("create the vsock host eventfd")]
    CreateEventFd(#[source] io::Error),
}

/// One connection, keyed by (host port, guest port).
pub(crate) type ConnKey = (u32, u32);

/// A control packet to send to the guest; its header is built when sent, with current credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Response(ConnKey),
    Rst(ConnKey),
    CreditUpdate(ConnKey),
}

#[derive(Debug, Default)]
pub(crate) struct Conn {
    /// Guest → host bytes not yet read by the host.
    pub(crate) rx: VecDeque<u8>,
    /// Bytes the host consumed (what we report as `fwd_cnt`).
    pub(crate) fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` last reported to the guest.
    pub(crate) fwd_cnt_sent: Wrapping<u32>,
    pub(crate) read_waker: Option<Waker>,
    /// The guest will send no more.
    pub(crate) guest_done_sending: bool,
    /// Host → guest bytes not yet sent.
    pub(crate) tx: VecDeque<u8>,
    /// Bytes sent to the guest.
    pub(crate) tx_cnt: Wrapping<u32>,
    pub(crate) peer_buf_alloc: u32,
    pub(crate) peer_fwd_cnt: Wrapping<u32>,
    pub(crate) write_waker: Option<Waker>,
    /// The host finished writing; a SHUTDOWN follows the data.
    pub(crate) host_shutdown: bool,
    pub(crate) shutdown_sent: bool,
    /// Reset by either side or by the device stopping.
    pub(crate) reset: bool,
}

impl Conn {
    /// Bytes the guest can still take.
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub(crate) fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Listener {
    pub(crate) backlog: VecDeque<ConnKey>,
    pub(crate) waker: Option<Waker>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) listeners: HashMap<u32, Listener>,
    pub(crate) conns: HashMap<ConnKey, Conn>,
    pub(crate) control: VecDeque<Control>,
    /// The device fail-stopped or the VM stopped: nothing more will move.
    pub(crate) stopped: bool,
}

impl State {
    pub(crate) fn push_control(&mut self, c: Control) {
        if self.control.len() < MAX_PENDING_CONTROL {
            self.control.push_back(c);
        }
    }

    /// Ends every connection and listener (fail-stop, VM stop).
    pub(crate) fn stop(&mut self) {
        self.stopped = true;
        for conn in self.conns.values_mut() {
            conn.reset = true;
            conn.wake();
        }
        for l in self.listeners.values_mut() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
        self.control.clear();
    }
}

/// State shared by the device thread and host handles.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Raised by host handles when the device has work (data, shutdown, credit to announce).
    pub(crate) evt: EventFd,
}

impl Shared {
    pub(crate) fn new() -> Result<Arc<Self>, VsockError> {
        Ok(Arc::new(Self {
            state: Mutex::new(State::default()),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::CreateEventFd)?,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Every update keeps the state consistent before it can panic (none do), so a poisoned
        // lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn kick(&self) {
        if let Err(e) = self.evt.write(1) {
            tracing::debug!(error = %e, "wake the vsock device");
        }
    }
}

/// The host end of a VM's vsock device: opens listeners for guest-initiated connections (the
/// guest connects to CID 2, port P).
#[derive(Debug, Clone)]
pub struct VsockHost {
    pub(crate) shared: Arc<Shared>,
}

impl VsockHost {
    /// Listens for guest connections to host port `port`.
    ///
    /// # Errors
    /// [`VsockError::AddrInUse`] when another listener holds the port;
    /// [`VsockError::DeviceStopped`] after the device stopped.
    pub fn listen(&self, port: u32) -> Result<VsockListener, VsockError> {
        let mut state = self.shared.lock();
        if state.stopped {
            return Err(VsockError::DeviceStopped);
        }
        if state.listeners.contains_key(&port) {
            return Err(VsockError::AddrInUse(port));
        }
        state.listeners.insert(port, Listener::default());
        Ok(VsockListener {
            shared: self.shared.clone(),
            port,
        })
    }

    /// Stops every connection and listener (the VM is going away).
    pub fn stop(&self) {
        self.shared.lock().stop();
    }

    /// Live connections.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.len()
    }
}

/// Accepts guest connections to one host port.
#[derive(Debug)]
pub struct VsockListener {
    shared: Arc<Shared>,
    port: u32,
}

impl VsockListener {
    /// The next connection from the guest.
    ///
    /// # Errors
    /// [`VsockError::DeviceStopped`] once the device stopped.
    pub async fn accept(&self) -> Result<VsockStream, VsockError> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection.
    ///
    /// # Errors
    /// [`VsockError::DeviceStopped`] once the device stopped.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Result<VsockStream, VsockError>> {
        let mut state = self.shared.lock();
        if state.stopped {
            return Poll::Ready(Err(VsockError::DeviceStopped));
        }
        let Some(listener) = state.listeners.get_mut(&self.port) else {
            return Poll::Ready(Err(VsockError::DeviceStopped));
        };
        match listener.backlog.pop_front() {
            Some(key) => Poll::Ready(Ok(VsockStream {
                shared: self.shared.clone(),
                key,
            })),
            None => {
                listener.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(l) = state.listeners.remove(&self.port) {
            for key in l.backlog {
                state.conns.remove(&key);
                state.push_control(Control::Rst(key));
            }
            drop(state);
            self.shared.kick();
        }
    }
}

/// One connection with the guest: a byte stream (tokio `AsyncRead` + `AsyncWrite`).
/// Dropping it resets the connection.
#[derive(Debug)]
pub struct VsockStream {
    shared: Arc<Shared>,
    key: ConnKey,
}

impl VsockStream {
    /// (host port, guest port).
    #[must_use]
    pub fn ports(&self) -> (u32, u32) {
        self.key
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        let Some(conn) = state.conns.get_mut(&self.key) else {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        };
        if conn.rx.is_empty() {
            if conn.reset {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if conn.guest_done_sending {
                return Poll::Ready(Ok(()));
            }
            conn.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = conn.rx.len().min(buf.remaining());
        let (a, b) = conn.rx.as_slices();
        let from_a = n.min(a.len());
        buf.put_slice(&a[..from_a]);
        buf.put_slice(&b[..n - from_a]);
        conn.rx.drain(..n);
        conn.fwd_cnt += Wrapping(u32::try_from(n).expect("at most CONN_BUF_ALLOC"));
        // Announce freed credit once a quarter of the window was consumed, so a guest blocked
        // on credit resumes.
        let announce = (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4;
        if announce {
            let key = self.key;
            state.push_control(Control::CreditUpdate(key));
            drop(state);
            self.shared.kick();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        let Some(conn) = state.conns.get_mut(&self.key) else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        if conn.reset || conn.host_shutdown {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = HOST_TX_CAP - conn.tx.len();
        if room == 0 {
            conn.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        conn.tx.extend(&buf[..n]);
        drop(state);
        self.shared.kick();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if let Some(conn) = state.conns.get_mut(&self.key) {
            conn.host_shutdown = true;
        }
        drop(state);
        self.shared.kick();
        Poll::Ready(Ok(()))
    }
}

impl Drop for VsockStream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(conn) = state.conns.remove(&self.key) {
            if !conn.reset && !state.stopped {
                state.push_control(Control::Rst(self.key));
                drop(state);
                self.shared.kick();
            }
        }
    }
}
