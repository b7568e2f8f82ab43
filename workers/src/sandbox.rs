//! One sandbox: the guest agent in an isolated environment, reached over the host–agent protocol.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_agent::protocol::{read_frame, write_frame, Frame, Invoke, ProtocolError, Start};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

/// What a sandbox runs: a function's bundle and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// Function name.
    pub name: String,
    /// Identifies the function's configuration; sandboxes are reused only for the same one.
    pub revision: u64,
    /// The bundle directory (holds `bootstrap`).
    pub task_dir: PathBuf,
    /// Memory limit, MiB.
    pub memory_mb: u64,
    /// Longest invocation.
    pub timeout: Duration,
    /// User environment.
    pub environment: Vec<(String, String)>,
    /// `_HANDLER`.
    pub handler: String,
    /// Function ARN given to the runtime.
    pub arn: String,
    /// Region.
    pub region: String,
    /// Size of the function's `/tmp`, MiB (Lambda's EphemeralStorage, default 512).
    pub ephemeral_storage_mb: u64,
}

impl FunctionSpec {
    /// A spec with Lambda's defaults for a bundle directory (tests, benchmarks).
    #[must_use]
    pub fn new(name: &str, task_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            revision: 1,
            task_dir: task_dir.into(),
            memory_mb: 128,
            timeout: Duration::from_secs(3),
            environment: Vec::new(),
            handler: "bootstrap".into(),
            arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
            region: "us-east-1".into(),
            ephemeral_storage_mb: 512,
        }
    }
}

/// A byte stream to the agent.
pub trait Channel: AsyncRead + AsyncWrite + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + 'static> Channel for T {}

/// The isolation around one sandbox (a jail, a micro-VM): what the host must do to stop it and
/// what it can observe of it.
#[async_trait]
pub trait Isolation: Send + Sync {
    /// Kills everything in the sandbox and releases its resources (processes, mounts, cgroups).
    async fn destroy(self: Box<Self>);
    /// Whether the sandbox was killed for exceeding its memory limit.
    fn out_of_memory(&self) -> bool;
    /// Memory charged to the sandbox, bytes, where known.
    fn memory_bytes(&self) -> Option<u64>;
}

/// A way to create sandboxes.
#[async_trait]
pub trait SandboxBackend: Send + Sync {
    /// Its name (`jail`, `kvm`).
    fn name(&self) -> &'static str;
    /// Starts the isolation with the agent inside, returning the channel to the agent.
    async fn launch(
        &self,
        id: u64,
        spec: &FunctionSpec,
    ) -> Result<(Pin<Box<dyn Channel>>, Box<dyn Isolation>), BootError>;
}

/// Why a sandbox did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The isolation could not be set up (host problem; retryable elsewhere).
    #[error("set up the sandbox: {0}")]
    Setup(String),
    /// The runtime reported an initialisation error (`/runtime/init/error`).
    #[error("{error_type}: {}", String::from_utf8_lossy(payload))]
    Init {
        /// Error type.
        error_type: String,
        /// Error body.
        payload: Vec<u8>,
    },
    /// The runtime exited before asking for an event.
    #[error("Runtime exited with error: {0}")]
    Exited(String),
    /// Init took longer than the limit.
    #[error("init did not finish within {0:?}")]
    Timeout(Duration),
    /// The channel broke.
    #[error("agent channel: {0}")]
    Channel(#[from] ProtocolError),
}

/// How one invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeOutcome {
    /// The function returned this payload.
    Response(Vec<u8>),
    /// The function reported an error (`/invocation/{id}/error`); the sandbox stays warm.
    FunctionError {
        /// Error type.
        error_type: String,
        /// Error body.
        payload: Vec<u8>,
    },
    /// The runtime failed to initialise.
    InitError {
        /// Error type.
        error_type: String,
        /// Error body.
        payload: Vec<u8>,
    },
    /// The invocation ran past its timeout; the sandbox was killed.
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The runtime exited or the sandbox died mid-invocation.
    Crashed {
        /// What happened ("exit status 3", "signal: killed").
        reason: String,
    },
    /// The sandbox exceeded its memory limit and was killed.
    OutOfMemory,
}

impl InvokeOutcome {
    /// Whether the sandbox may serve another invocation after this outcome.
    #[must_use]
    pub fn sandbox_survives(&self) -> bool {
        matches!(
            self,
            InvokeOutcome::Response(_) | InvokeOutcome::FunctionError { .. }
        )
    }

    /// Lambda's error type and body for an error outcome (`None` for a response), as the Invoke
    /// API returns them with `X-Amz-Function-Error: Unhandled`.
    #[must_use]
    pub fn error(&self, request_id: &str) -> Option<(String, Vec<u8>)> {
        let body = |error_type: &str, message: String| {
            let v = serde_json::json!({ "errorMessage": message, "errorType": error_type });
            (error_type.to_owned(), v.to_string().into_bytes())
        };
        match self {
            InvokeOutcome::Response(_) => None,
            InvokeOutcome::FunctionError {
                error_type,
                payload,
            }
            | InvokeOutcome::InitError {
                error_type,
                payload,
            } => Some((error_type.clone(), payload.clone())),
            InvokeOutcome::Timeout { after } => Some(body(
                "Sandbox.Timedout",
                format!(
                    "RequestId: {request_id} Error: Task timed out after {:.2} seconds",
                    after.as_secs_f64()
                ),
            )),
            InvokeOutcome::Crashed { reason } => Some(body(
                "Runtime.ExitError",
                format!("RequestId: {request_id} Error: Runtime exited with error: {reason}"),
            )),
            InvokeOutcome::OutOfMemory => Some(body(
                "Runtime.OutOfMemory",
                format!("RequestId: {request_id} Error: Runtime exited with error: signal: killed"),
            )),
        }
    }
}

/// A log line of the function, tagged with the request in flight.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Function name.
    pub function: String,
    /// Request id, empty outside invocations.
    pub request_id: String,
    /// The line.
    pub line: String,
}

/// A booted sandbox, ready for one invocation at a time.
pub struct Sandbox {
    id: u64,
    spec: Arc<FunctionSpec>,
    writer: WriteHalf<Pin<Box<dyn Channel>>>,
    reader: ReadHalf<Pin<Box<dyn Channel>>>,
    logs: Option<mpsc::Sender<LogLine>>,
    isolation: Option<Box<dyn Isolation>>,
    dead: bool,
    /// The current invocation's output lines (the last [`LOG_TAIL_BYTES`] or so of them).
    log_tail: Vec<u8>,
    /// When it was booted.
    pub booted_at: Instant,
    /// When it last finished an invocation.
    pub last_used: Instant,
    /// Invocations served.
    pub invocations: u64,
}

/// How much of an invocation's output a sandbox keeps for its caller (Lambda's `LogType: Tail`
/// returns the last 4 KB of the log).
pub const LOG_TAIL_BYTES: usize = 4096;

fn describe_exit(code: i64, signal: i64) -> String {
    if signal != 0 {
        let name = nix::sys::signal::Signal::try_from(i32::try_from(signal).unwrap_or(0))
            .map(|s| match s {
                nix::sys::signal::Signal::SIGKILL => "killed".to_owned(),
                nix::sys::signal::Signal::SIGSYS => "bad system call".to_owned(),
                nix::sys::signal::Signal::SIGSEGV => "segmentation fault".to_owned(),
                nix::sys::signal::Signal::SIGABRT => "aborted".to_owned(),
                other => other.as_str().to_lowercase(),
            })
            .unwrap_or_else(|_| signal.to_string());
        format!("signal: {name}")
    } else {
        format!("exit status {code}")
    }
}

impl Sandbox {
    /// Boots a sandbox for `spec` and waits until its runtime asks for the first event.
    ///
    /// # Errors
    /// [`BootError`]: set-up failures, init errors, a runtime that exits or takes longer than
    /// `init_timeout`.
    pub async fn boot(
        backend: &dyn SandboxBackend,
        id: u64,
        spec: Arc<FunctionSpec>,
        init_timeout: Duration,
        logs: Option<mpsc::Sender<LogLine>>,
    ) -> Result<Sandbox, BootError> {
        let (channel, isolation) = backend.launch(id, &spec).await?;
        let (reader, mut writer) = tokio::io::split(channel);
        let start = Start {
            function_name: spec.name.clone(),
            function_version: "$LATEST".into(),
            memory_mb: spec.memory_mb,
            handler: spec.handler.clone(),
            region: spec.region.clone(),
            environment: spec.environment.clone(),
        };
        let mut sandbox = Sandbox {
            id,
            spec,
            writer: {
                if let Err(e) = write_frame(&mut writer, &Frame::Start(start)).await {
                    isolation.destroy().await;
                    return Err(e.into());
                }
                writer
            },
            reader,
            logs,
            isolation: Some(isolation),
            dead: false,
            log_tail: Vec::new(),
            booted_at: Instant::now(),
            last_used: Instant::now(),
            invocations: 0,
        };
        let ready = tokio::time::timeout(init_timeout, sandbox.wait_ready()).await;
        match ready {
            Ok(Ok(())) => {
                sandbox.booted_at = Instant::now();
                Ok(sandbox)
            }
            Ok(Err(e)) => {
                sandbox.destroy().await;
                Err(e)
            }
            Err(_) => {
                sandbox.destroy().await;
                Err(BootError::Timeout(init_timeout))
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), BootError> {
        let mut init_error = None;
        while let Some(frame) = self.next_frame().await {
            match frame {
                Frame::Ready => return Ok(()),
                Frame::InitError {
                    error_type,
                    payload,
                } => init_error = Some((error_type, payload)),
                Frame::Exited { code, signal } => {
                    return Err(match init_error {
                        Some((error_type, payload)) => BootError::Init {
                            error_type,
                            payload,
                        },
                        None => BootError::Exited(describe_exit(code, signal)),
                    })
                }
                _ => {}
            }
        }
        Err(match init_error {
            Some((error_type, payload)) => BootError::Init {
                error_type,
                payload,
            },
            None => BootError::Exited("the sandbox closed its channel".into()),
        })
    }

    /// The sandbox's number.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What it runs.
    #[must_use]
    pub fn spec(&self) -> &Arc<FunctionSpec> {
        &self.spec
    }

    /// Whether it can take another invocation.
    #[must_use]
    pub fn is_alive(&self) -> bool {
        !self.dead
    }

    /// Memory charged to the sandbox, bytes, where known.
    #[must_use]
    pub fn memory_bytes(&self) -> Option<u64> {
        self.isolation.as_ref().and_then(|i| i.memory_bytes())
    }

    /// Runs one invocation. On timeout the sandbox is killed (outcome [`InvokeOutcome::Timeout`]);
    /// a sandbox whose outcome does not survive must be destroyed by the caller.
    pub async fn invoke(
        &mut self,
        request_id: &str,
        payload: Vec<u8>,
        trace_id: &str,
    ) -> InvokeOutcome {
        let timeout = self.spec.timeout;
        self.log_tail.clear();
        let deadline_ms =
            sluice_core::time::unix_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let frame = Frame::Invoke(Invoke {
            request_id: request_id.to_owned(),
            deadline_ms,
            function_arn: self.spec.arn.clone(),
            trace_id: trace_id.to_owned(),
            payload,
        });
        if let Err(e) = write_frame(&mut self.writer, &frame).await {
            self.dead = true;
            return self.crashed(format!("the sandbox's channel failed: {e}"));
        }
        let outcome = match tokio::time::timeout(timeout, self.wait_result(request_id)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.dead = true;
                InvokeOutcome::Timeout { after: timeout }
            }
        };
        self.invocations += 1;
        self.last_used = Instant::now();
        if !outcome.sandbox_survives() {
            self.dead = true;
        }
        outcome
    }

    /// The last invocation's output lines (at most about [`LOG_TAIL_BYTES`]), taken.
    pub fn take_log(&mut self) -> Vec<u8> {
        let mut log = std::mem::take(&mut self.log_tail);
        if log.len() > LOG_TAIL_BYTES {
            log.drain(..log.len() - LOG_TAIL_BYTES);
        }
        log
    }

    fn crashed(&self, reason: String) -> InvokeOutcome {
        if self.isolation.as_ref().is_some_and(|i| i.out_of_memory()) {
            InvokeOutcome::OutOfMemory
        } else {
            InvokeOutcome::Crashed { reason }
        }
    }

    async fn wait_result(&mut self, request_id: &str) -> InvokeOutcome {
        while let Some(frame) = self.next_frame().await {
            match frame {
                Frame::Response {
                    request_id: id,
                    payload,
                } if id == request_id => {
                    return InvokeOutcome::Response(payload);
                }
                Frame::FunctionError {
                    request_id: id,
                    error_type,
                    payload,
                } if id == request_id => {
                    return InvokeOutcome::FunctionError {
                        error_type,
                        payload,
                    };
                }
                Frame::InitError {
                    error_type,
                    payload,
                } => {
                    return InvokeOutcome::InitError {
                        error_type,
                        payload,
                    }
                }
                Frame::Exited { code, signal } => {
                    self.dead = true;
                    // The kernel's OOM kill shows as SIGKILL; give the cgroup a moment to count it.
                    if signal == 9 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    return self.crashed(describe_exit(code, signal));
                }
                _ => {}
            }
        }
        self.dead = true;
        self.crashed("signal: killed (the sandbox closed its channel)".into())
    }

    /// The next frame from the agent other than a log line (those go to the log sink and
    /// `tracing`); `None` when the channel closed or the guest sent a bad frame. Frames are read
    /// on the invoking task itself: no hand-off to another task on the latency path.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            match read_frame(&mut self.reader).await {
                Ok(Some(Frame::Log { request_id, line })) => {
                    tracing::info!(target: "function", function = %self.spec.name, request_id = %request_id, "{line}");
                    self.log_tail.extend_from_slice(line.as_bytes());
                    self.log_tail.push(b'\n');
                    if self.log_tail.len() > 2 * LOG_TAIL_BYTES {
                        let cut = self.log_tail.len() - LOG_TAIL_BYTES;
                        self.log_tail.drain(..cut);
                    }
                    if let Some(logs) = &self.logs {
                        let _ = logs.try_send(LogLine {
                            function: self.spec.name.clone(),
                            request_id,
                            line,
                        });
                    }
                }
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => return None,
                Err(e) => {
                    // A corrupt frame from the guest: the sandbox is treated as dead.
                    tracing::warn!(function = %self.spec.name, error = %e, "sandbox sent a bad frame");
                    return None;
                }
            }
        }
    }

    /// Stops the sandbox and releases everything it held.
    pub async fn destroy(mut self) {
        self.dead = true;
        let _ = write_frame(&mut self.writer, &Frame::Shutdown).await;
        if let Some(iso) = self.isolation.take() {
            iso.destroy().await;
        }
    }
}
