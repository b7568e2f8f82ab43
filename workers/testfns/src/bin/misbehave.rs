//! A Lambda function (built with `lambda_runtime`) that misbehaves on request. The event's
//! `action` picks how:
//! - `echo`: return the event; `log`: print a line to stdout and stderr, then return;
//! - `error`: return a function error;
//! - `exit`: exit the process mid-invocation;
//! - `hang`: never answer;
//! - `hog`: allocate and touch `mb` MiB (default 1024);
//! - `net`: try to reach an outside address and report what happened;
//! - `syscall`: make a forbidden system call (`unshare`).
#![forbid(unsafe_code)]

use std::time::Duration;

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let p = event.payload;
    match p["action"].as_str().unwrap_or("echo") {
        "log" => {
            println!("hello from stdout");
            eprintln!("hello from stderr");
            Ok(p)
        }
        "error" => Err("the function failed on purpose".into()),
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
            Ok(json!({ "outside": match outside { Ok(_) => "connected".to_owned(), Err(e) => e.to_string() } }))
        }
        "syscall" => {
            let r = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER);
            Ok(json!({ "unshare": format!("{r:?}") }))
        }
        _ => Ok(p),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
