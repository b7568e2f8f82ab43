//! The function's stdout and stderr: a thread per stream turns lines into log frames, and
//! [`Output::flush`] makes sure every line written before a result is relayed before it.
//!
//! The function writes its log lines and then posts its result, but the pipe readers run on
//! their own threads, so without a flush the result could overtake the last lines (which would
//! then be tagged with no request, and reach the host only with the next invocation). The agent
//! keeps a write end of each pipe; a flush writes a marker into each and waits until every
//! reader has passed it, so everything the function wrote earlier has become frames.

use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
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
        let mut passed = Vec::new();
        for fd in self.readers {
            let seen = Arc::new(AtomicU64::new(0));
            passed.push(Arc::clone(&seen));
            let (emit, notify) = (Arc::clone(&emit), Arc::clone(&notify));
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(std::fs::File::from(fd)).split(b'\n') {
                    let Ok(line) = line else { break };
                    let (text, marked) = match line.strip_suffix(MARK) {
                        Some(rest) => (rest, true),
                        None => (&line[..], false),
                    };
                    // A marker ends a partial line the function left unterminated.
                    if (!marked || !text.is_empty())
                        && !emit(String::from_utf8_lossy(text).into_owned())
                    {
                        break;
                    }
                    if marked {
                        seen.fetch_add(1, Ordering::AcqRel);
                        notify.notify_waiters();
                    }
                }
            });
        }
        Arc::new(Output {
            writers: Mutex::new(Some(self.writers)),
            written: AtomicU64::new(0),
            passed,
            notify,
        })
    }
}

impl Output {
    /// Waits (at most [`FLUSH_TIMEOUT`]) until every line written so far has been emitted.
    pub(crate) async fn flush(self: &Arc<Self>) {
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
