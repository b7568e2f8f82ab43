//! A Lambda function (built with `lambda_runtime`) that misbehaves on request. The event's
//! `action` picks how:
//! - `echo`: return the event; `log`: print a line to stdout and stderr, then return;
//! - `error`: return a function error; `sleep`: wait `ms` milliseconds, then return the event;
//! - `stamp`: return the time the handler started (`started_ms`, Unix ms);
//! - `tmp`: report the size of `/tmp` (`tmp_mb`, the function's EphemeralStorage);
//! - `exit`: exit the process mid-invocation;
//! - `hang`: never answer;
//! - `hog`: allocate and touch `mb` MiB (default 1024);
//! - `net`: try to reach an outside address and report what happened;
//! - `syscall`: make a forbidden system call (`unshare`);
//! - `inspect`: report what the function sees of its sandbox (ids, writable paths, environment,
//!   the trace header and `_X_AMZN_TRACE_ID`).
//!
//! With the environment variable `INIT_SLEEP_MS` set, its initialisation takes that long before it
//! asks for the first event (an init that never finishes, when longer than the init timeout).
#![forbid(unsafe_code)]

use std::time::Duration;

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let p = event.payload;
    match p["action"].as_str().unwrap_or("echo") {
        "log" => {
            // `lines` more numbered lines on stdout first (default none).
            for i in 0..p["lines"].as_u64().unwrap_or(0) {
                println!("line {i}");
            }
            println!("hello from stdout");
            eprintln!("hello from stderr");
            Ok(p)
        }
        "error" => Err("the function failed on purpose".into()),
        "tmp" => {
            // The size of /tmp as the function sees it (its EphemeralStorage).
            let st = nix::sys::statvfs::statvfs("/tmp")?;
            let bytes = st.blocks() as u64 * st.fragment_size() as u64;
            Ok(json!({ "tmp_mb": bytes / (1024 * 1024) }))
        }
        "stamp" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Ok(json!({ "started_ms": now, "sent_ms": p["sent_ms"] }))
        }
        "sleep" => {
            tokio::time::sleep(Duration::from_millis(p["ms"].as_u64().unwrap_or(100))).await;
            Ok(p)
        }
        "exit" => std::process::exit(3),
        "hang" => loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        },
        "hog" => {
            let mb = p["mb"].as_u64().unwrap_or(1024) as usize;
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mb {
                chunks.push(vec![1u8; 1024 * 1024]);
            }
            Ok(json!({ "allocated_mb": chunks.len() }))
        }
        "net" => {
            let outside = std::net::TcpStream::connect_timeout(
                &"1.1.1.1:53".parse().expect("literal address"),
                Duration::from_secs(2),
            );
            Ok(
                json!({ "outside": match outside { Ok(_) => "connected".to_owned(), Err(e) => e.to_string() } }),
            )
        }
        "syscall" => {
            let r = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER);
            Ok(json!({ "unshare": format!("{r:?}") }))
        }
        "inspect" => {
            let try_write = |path: &str| match std::fs::write(path, b"x") {
                Ok(()) => "written".to_owned(),
                Err(e) => e.to_string(),
            };
            let processes = std::fs::read_dir("/proc")
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                        .count()
                })
                .unwrap_or(0);
            Ok(json!({
                "pid": std::process::id(),
                "uid": nix::unistd::getuid().as_raw(),
                "hostname": nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
                "processes": processes,
                "write_task": try_write("/var/task/x"),
                "write_etc": try_write("/etc/x"),
                "write_root": try_write("/x"),
                "write_tmp": try_write("/tmp/x"),
                "task_root": std::env::var("LAMBDA_TASK_ROOT").unwrap_or_default(),
                "runtime_api": std::env::var("AWS_LAMBDA_RUNTIME_API").unwrap_or_default(),
                "function_name": std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_default(),
                "memory": std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").unwrap_or_default(),
                "user_var": std::env::var("GREETING").unwrap_or_default(),
                "deadline_ms": event.context.deadline,
                "request_id": event.context.request_id,
                "trace_header": event.context.xray_trace_id,
                "trace_env": std::env::var("_X_AMZN_TRACE_ID").unwrap_or_default(),
                "arn": event.context.invoked_function_arn,
            }))
        }
        _ => Ok(p),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    if let Some(ms) = std::env::var("INIT_SLEEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    lambda_runtime::run(service_fn(handler)).await
}
