//! The agent proper: starts `bootstrap`, serves it the Lambda Runtime API, and relays
//! invocations, results, errors and log lines to and from the host.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::output::{Output, Pipes};
use crate::protocol::{read_frame, write_frame, Frame, Invoke, ProtocolError, Start};

/// Where the Runtime API listens (`AWS_LAMBDA_RUNTIME_API`).
pub const RUNTIME_API_ADDR: &str = "127.0.0.1:9001";
/// Lambda's limit on a synchronous response.
pub const MAX_RESPONSE_BYTES: usize = 6 * 1024 * 1024;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The bundle directory (`LAMBDA_TASK_ROOT`).
    pub task_root: PathBuf,
    /// Where the Runtime API listens.
    pub runtime_api: SocketAddr,
    /// The uid and gid `bootstrap` runs as (`None`: the agent's own). Switching from uid 0 to
    /// another clears the function's capabilities; the agent must hold `CAP_SETUID` and
    /// `CAP_SETGID`.
    pub function_ids: Option<(u32, u32)>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            task_root: PathBuf::from("/var/task"),
            runtime_api: RUNTIME_API_ADDR.parse().expect("constant address parses"),
            function_ids: None,
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The host channel failed.
    #[error("host channel: {0}")]
    Channel(#[from] ProtocolError),
    /// The host sent something out of order.
    #[error("host protocol: {0}")]
    Sequence(String),
    /// The Runtime API could not listen.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

struct Shared {
    to_host: mpsc::Sender<Frame>,
    /// The next invocation, handed to whichever `/next` call is waiting.
    next: tokio::sync::Mutex<mpsc::Receiver<Invoke>>,
    /// The request in flight, for log tagging and response validation.
    current: Mutex<String>,
    ready_sent: Mutex<bool>,
    /// The function's output pipes, once it runs.
    output: std::sync::OnceLock<Arc<Output>>,
}

impl Shared {
    fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
    fn set_current(&self, id: &str) {
        let mut c = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.clear();
        c.push_str(id);
    }
}

/// Runs the agent over `channel` until the host shuts it down, `bootstrap` exits, or the channel
/// closes.
///
/// # Errors
/// When the channel breaks or the host sends frames out of order.
pub async fn run<S>(channel: S, config: AgentConfig) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rx, mut tx) = tokio::io::split(channel);
    let start = match read_frame(&mut rx).await? {
        Some(Frame::Start(s)) => s,
        Some(other) => {
            return Err(AgentError::Sequence(format!(
                "expected Start, got {other:?}"
            )))
        }
        None => return Ok(()),
    };
    let (to_host, mut outbox) = mpsc::channel::<Frame>(256);
    let writer = tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            let last = matches!(frame, Frame::Exited { .. });
            if write_frame(&mut tx, &frame).await.is_err() || last {
                break;
            }
        }
    });
    let (invoke_tx, invoke_rx) = mpsc::channel::<Invoke>(1);
    let shared = Arc::new(Shared {
        to_host: to_host.clone(),
        next: tokio::sync::Mutex::new(invoke_rx),
        current: Mutex::new(String::new()),
        ready_sent: Mutex::new(false),
        output: std::sync::OnceLock::new(),
    });

    let listener = tokio::net::TcpListener::bind(config.runtime_api)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.runtime_api,
            source,
        })?;
    let app = router(Arc::clone(&shared));
    let server = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(listener, app).await;
    });

    let exited = spawn_bootstrap(&start, &config, &shared);

    let result = loop {
        tokio::select! {
            frame = read_frame(&mut rx) => match frame {
                Ok(Some(Frame::Invoke(inv))) => {
                    if invoke_tx.send(inv).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(Frame::Shutdown)) | Ok(None) => break Ok(()),
                Ok(Some(other)) => break Err(AgentError::Sequence(format!("unexpected {other:?}"))),
                // The host closing the channel (it destroyed the sandbox) is a normal end.
                Err(ProtocolError::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) =>
                {
                    break Ok(())
                }
                Err(e) => break Err(e.into()),
            },
            status = wait_exit(exited.clone()) => {
                let _ = to_host.send(status).await;
                break Ok(());
            }
        }
    };
    server.abort();
    drop(to_host);
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    result
}

/// The exit of `bootstrap`, once known.
type ExitSlot = Arc<tokio::sync::watch::Sender<Option<Frame>>>;

async fn wait_exit(slot: ExitSlot) -> Frame {
    let mut rx = slot.subscribe();
    loop {
        if let Some(f) = rx.borrow_and_update().clone() {
            return f;
        }
        if rx.changed().await.is_err() {
            return Frame::Exited {
                code: -1,
                signal: 0,
            };
        }
    }
}

fn lambda_env(start: &Start, config: &AgentConfig) -> Vec<(String, String)> {
    let log_group = format!("/aws/lambda/{}", start.function_name);
    let mut env: Vec<(String, String)> = start.environment.clone();
    for (k, v) in [
        ("AWS_LAMBDA_RUNTIME_API", config.runtime_api.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", start.function_name.clone()),
        (
            "AWS_LAMBDA_FUNCTION_VERSION",
            start.function_version.clone(),
        ),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            start.memory_mb.to_string(),
        ),
        ("AWS_LAMBDA_LOG_GROUP_NAME", log_group),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME",
            "sluice/[$LATEST]sandbox".to_owned(),
        ),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_owned()),
        ("AWS_REGION", start.region.clone()),
        ("AWS_DEFAULT_REGION", start.region.clone()),
        ("_HANDLER", start.handler.clone()),
        ("LAMBDA_TASK_ROOT", config.task_root.display().to_string()),
        ("LAMBDA_RUNTIME_DIR", "/var/runtime".to_owned()),
        ("PATH", "/usr/local/bin:/usr/bin:/bin:/opt/bin".to_owned()),
        (
            "LD_LIBRARY_PATH",
            "/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib"
                .to_owned(),
        ),
        ("LANG", "en_US.UTF-8".to_owned()),
        ("TZ", ":UTC".to_owned()),
        ("HOME", "/tmp".to_owned()),
    ] {
        env.push((k.to_owned(), v));
    }
    env
}

/// Starts `bootstrap`, with a thread per output stream forwarding lines as log frames and a
/// thread that waits for its exit. As PID 1 the agent also reaps orphans (`waitpid(-1)`).
fn spawn_bootstrap(start: &Start, config: &AgentConfig, shared: &Arc<Shared>) -> ExitSlot {
    let (slot, _) = tokio::sync::watch::channel(None);
    let slot = Arc::new(slot);
    let bootstrap = config.task_root.join("bootstrap");
    let spawned = Pipes::new().and_then(|(stdout, stderr, pipes)| {
        let mut command = Command::new(&bootstrap);
        command
            .env_clear()
            .envs(lambda_env(start, config))
            .current_dir(&config.task_root)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some((uid, gid)) = config.function_ids {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        command.spawn().map(|child| (child, pipes))
    });
    let (mut child, pipes) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let payload = serde_json::json!({
                "errorMessage": format!("Couldn't find valid bootstrap(s): [{}]: {e}", bootstrap.display()),
                "errorType": "Runtime.InvalidEntrypoint",
            });
            let tx = shared.to_host.clone();
            let _ = tx.try_send(Frame::InitError {
                error_type: "Runtime.InvalidEntrypoint".into(),
                payload: payload.to_string().into_bytes(),
            });
            slot.send_replace(Some(Frame::Exited {
                code: 127,
                signal: 0,
            }));
            return slot;
        }
    };
    let tagger = Arc::clone(shared);
    let output = pipes.start(move |line| {
        let frame = Frame::Log {
            request_id: tagger.current(),
            line,
        };
        tagger.to_host.blocking_send(frame).is_ok()
    });
    let _ = shared.output.set(Arc::clone(&output));
    let waiter = Arc::clone(&slot);
    std::thread::spawn(move || {
        use std::os::unix::process::ExitStatusExt;
        let status = child.wait();
        output.close();
        let frame = match status {
            Ok(s) => Frame::Exited {
                code: s.code().map_or(-1, i64::from),
                signal: s.signal().map_or(0, i64::from),
            },
            Err(_) => Frame::Exited {
                code: -1,
                signal: 0,
            },
        };
        waiter.send_replace(Some(frame));
        // As PID 1, adopt and reap whatever the runtime left behind.
        if std::process::id() == 1 {
            loop {
                match nix::sys::wait::waitpid(None, None) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::ECHILD) => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    });
    slot
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .layer(DefaultBodyLimit::max(MAX_RESPONSE_BYTES + 1))
        .with_state(shared)
}

fn api_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errorType": error_type, "errorMessage": message });
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn next(State(shared): State<Arc<Shared>>) -> Response {
    let first = {
        let mut sent = shared
            .ready_sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !std::mem::replace(&mut *sent, true)
    };
    if first {
        let _ = shared.to_host.send(Frame::Ready).await;
    }
    let invoke = {
        let mut rx = shared.next.lock().await;
        rx.recv().await
    };
    let Some(inv) = invoke else {
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Runtime.Shutdown",
            "the sandbox is shutting down",
        );
    };
    shared.set_current(&inv.request_id);
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    put("lambda-runtime-aws-request-id", &inv.request_id);
    put("lambda-runtime-deadline-ms", &inv.deadline_ms.to_string());
    put("lambda-runtime-invoked-function-arn", &inv.function_arn);
    put("lambda-runtime-trace-id", &inv.trace_id);
    put("content-type", "application/json");
    (StatusCode::OK, headers, inv.payload).into_response()
}

/// `Some(error response)` when `id` is not the invocation in flight.
fn check_request(shared: &Shared, id: &str) -> Option<Response> {
    if shared.current() == id && !id.is_empty() {
        None
    } else {
        Some(api_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            "Invalid request ID",
        ))
    }
}

async fn finish(shared: &Shared, frame: Frame) -> Response {
    // Lines the function wrote before its result belong to this request, and go first.
    if let Some(output) = shared.output.get() {
        output.flush().await;
    }
    // The tag stays until the next invocation starts: a line that still trails the result is
    // this request's.
    let _ = shared.to_host.send(frame).await;
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        r#"{"status":"OK"}"#,
    )
        .into_response()
}

async fn response(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = check_request(&shared, &id) {
        return r;
    }
    if body.len() > MAX_RESPONSE_BYTES {
        let payload = serde_json::json!({
            "errorMessage": format!("Response payload size ({} bytes) exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes).", body.len()),
            "errorType": "Function.ResponseSizeTooLarge",
        });
        finish(
            &shared,
            Frame::FunctionError {
                request_id: id,
                error_type: "Function.ResponseSizeTooLarge".into(),
                payload: payload.to_string().into_bytes(),
            },
        )
        .await;
        return api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "response too large",
        );
    }
    finish(
        &shared,
        Frame::Response {
            request_id: id,
            payload: body.to_vec(),
        },
    )
    .await
}

fn error_type(headers: &HeaderMap, body: &[u8]) -> String {
    headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["errorType"].as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| "Unhandled".to_owned())
}

async fn error(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check_request(&shared, &id) {
        return r;
    }
    let error_type = error_type(&headers, &body);
    finish(
        &shared,
        Frame::FunctionError {
            request_id: id,
            error_type,
            payload: body.to_vec(),
        },
    )
    .await
}

async fn init_error(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let error_type = error_type(&headers, &body);
    if let Some(output) = shared.output.get() {
        output.flush().await;
    }
    let _ = shared
        .to_host
        .send(Frame::InitError {
            error_type,
            payload: body.to_vec(),
        })
        .await;
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        r#"{"status":"OK"}"#,
    )
        .into_response()
}
