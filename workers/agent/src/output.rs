//! The function's stdout and stderr: a thread per stream turns lines into log frames, and
//! [`Output::flush`] makes sure every line written before a result is relayed before it.
//!
//! The function writes its log lines and then posts its result, but the pipe readers run on
//! their own threads, so without a flush the result could overtake the last lines (which would
//! then be tagged with no request, and reach the host only with the next invocation). The agent
//! keeps a write end of each pipe; a flush writes a marker into each and waits until every
//! reader has passed it, so everything the function wrote earlier has become frames.
//!
//! Most results follow no unread output, and then the flush returns at once: each reader
//! consumes bytes and emits their lines while holding its pipe's gate, so with every gate free,
//! no partial line held, and both pipes empty (one `poll`), everything written has been emitted.
//! A warm invocation pays for the marker only when there is something to relay.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Ends a flush marker line; NUL never appears in a text log line.
const MARK: &[u8] = b"\x00sluice-flush";
/// Longest a flush waits (a reader stuck behind a full host channel must not stall results).
const FLUSH_TIMEOUT: Duration = Duration::from_millis(100);

/// The output pipes of one function process.
pub(crate) struct Output {
    /// The agent's own write ends (`None` once the function exited).
    writers: Mutex<Option<Vec<std::fs::File>>>,
    /// Markers written so far.
    written: AtomicU64,
    /// Markers each reader has passed.
    passed: Vec<Arc<AtomicU64>>,
    /// Held by each reader from consuming bytes to emitting their lines; holds whether it keeps
    /// a partial line.
    gates: Vec<Arc<Mutex<bool>>>,
    /// Copies of the read ends, to poll.
    peek: Vec<OwnedFd>,
    notify: Arc<tokio::sync::Notify>,
}

/// The agent's ends of a child's stdout and stderr pipes, before it is spawned.
pub(crate) struct Pipes {
    readers: Vec<OwnedFd>,
    writers: Vec<std::fs::File>,
}

impl Pipes {
    /// Two pipes: the child's stdout and stderr, and the agent's ends (closed on exec).
    pub(crate) fn new() -> std::io::Result<(Stdio, Stdio, Self)> {
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        let mut child_ends = Vec::new();
        for _ in 0..2 {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            writers.push(std::fs::File::from(w.try_clone()?));
            child_ends.push(w);
            readers.push(r);
        }
        let stderr = Stdio::from(child_ends.pop().expect("two pipes"));
        let stdout = Stdio::from(child_ends.pop().expect("two pipes"));
        Ok((stdout, stderr, Self { readers, writers }))
    }

    /// Starts a reader thread per pipe; `emit` gets each line.
    pub(crate) fn start(
        self,
        emit: impl Fn(String) -> bool + Send + Sync + 'static,
    ) -> Arc<Output> {
        let emit = Arc::new(emit);
        let notify = Arc::new(tokio::sync::Notify::new());
        let (mut passed, mut gates, mut peek) = (Vec::new(), Vec::new(), Vec::new());
        for fd in self.readers {
            let seen = Arc::new(AtomicU64::new(0));
            let gate = Arc::new(Mutex::new(false));
            passed.push(Arc::clone(&seen));
            gates.push(Arc::clone(&gate));
            // Without a copy to poll, every flush takes the marker path (see `pending`).
            if let Ok(copy) = fd.try_clone() {
                peek.push(copy);
            }
            let (emit, notify) = (Arc::clone(&emit), Arc::clone(&notify));
            std::thread::spawn(move || {
                read_lines(fd, &gate, |line| {
                    let (text, marked) = match line.strip_suffix(MARK) {
                        Some(rest) => (rest, true),
                        None => (line, false),
                    };
                    // A marker ends a partial line the function left unterminated.
                    if (!marked || !text.is_empty())
                        && !emit(String::from_utf8_lossy(text).into_owned())
                    {
                        return false;
                    }
                    if marked {
                        seen.fetch_add(1, Ordering::AcqRel);
                        notify.notify_waiters();
                    }
                    true
                });
            });
        }
        Arc::new(Output {
            writers: Mutex::new(Some(self.writers)),
            written: AtomicU64::new(0),
            passed,
            gates,
            peek,
            notify,
        })
    }
}

/// Reads `fd` and hands each line (without its newline) to `line` until end of file, an error,
/// or `line` returning false. Bytes are consumed and their lines emitted while holding `gate`
/// (whose value says whether a partial line is kept); waiting for bytes happens outside it.
fn read_lines(fd: OwnedFd, gate: &Mutex<bool>, mut line: impl FnMut(&[u8]) -> bool) {
    let mut file = std::fs::File::from(fd);
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        {
            let mut fds = [nix::poll::PollFd::new(
                file.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        let mut held = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Readable (or closed): this thread is the only reader, so this does not block.
        let n = match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            let ok = if partial.is_empty() {
                line(&rest[..i])
            } else {
                partial.extend_from_slice(&rest[..i]);
                let ok = line(&partial);
                partial.clear();
                ok
            };
            if !ok {
                return;
            }
            rest = &rest[i + 1..];
        }
        partial.extend_from_slice(rest);
        *held = !partial.is_empty();
    }
    if !partial.is_empty() {
        line(&partial);
    }
}

impl Output {
    /// Whether any output may not have been emitted yet: a reader is mid-chunk or holds a
    /// partial line, or a pipe has bytes.
    fn pending(&self) -> bool {
        if self.peek.len() != self.gates.len() {
            return true;
        }
        // Holding every gate: nothing is between consumed and emitted.
        let mut held = Vec::with_capacity(self.gates.len());
        for gate in &self.gates {
            match gate.try_lock() {
                Ok(g) if !*g => held.push(g),
                _ => return true,
            }
        }
        let mut fds: Vec<nix::poll::PollFd<'_>> = self
            .peek
            .iter()
            .map(|fd| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        !matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
            Ok(0)
        )
    }

    /// Waits (at most [`FLUSH_TIMEOUT`]) until every line written so far has been emitted.
    pub(crate) async fn flush(self: &Arc<Self>) {
        if !self.pending() {
            return;
        }
        let this = Arc::clone(self);
        let target = tokio::task::spawn_blocking(move || {
            let mut guard = this
                .writers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let writers = guard.as_mut()?;
            let mut mark = MARK.to_vec();
            mark.push(b'\n');
            for w in writers.iter_mut() {
                w.write_all(&mark).ok()?;
            }
            Some(this.written.fetch_add(1, Ordering::AcqRel) + 1)
        })
        .await
        .ok()
        .flatten();
        let Some(target) = target else { return };
        let reached = || {
            self.passed
                .iter()
                .all(|p| p.load(Ordering::Acquire) >= target)
        };
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
            loop {
                let notified = self.notify.notified();
                if reached() {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// Drops the agent's write ends (the function exited), so the readers see end of file.
    pub(crate) fn close(&self) {
        self.writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}
