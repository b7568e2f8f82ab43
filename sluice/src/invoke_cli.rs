//! `sluice invoke`: call a function through a node's Lambda-compatible Invoke API.

use std::io::Read;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use crate::functions::Endpoint;

/// Lambda's invocation types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InvocationType {
    /// Wait for the function and print its response.
    RequestResponse,
    /// Queue the event (202) and return at once; retries and destinations apply.
    Event,
    /// Only check that the function exists and the request is valid (204).
    DryRun,
}

/// Options of `sluice invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The function's name.
    name: String,
    /// The event, as JSON text.
    #[arg(long, conflicts_with = "file")]
    payload: Option<String>,
    /// Read the event from this file (`-` for stdin).
    #[arg(long)]
    file: Option<String>,
    /// How to invoke.
    #[arg(
        long = "invocation-type",
        short = 't',
        value_enum,
        default_value = "request-response"
    )]
    kind: InvocationType,
    /// Shorthand for `--invocation-type event`.
    #[arg(long, conflicts_with = "kind")]
    event: bool,
    #[command(flatten)]
    endpoint: Endpoint,
}

pub async fn run(args: InvokeArgs) -> anyhow::Result<()> {
    let payload: Vec<u8> = match (&args.payload, args.file.as_deref()) {
        (Some(p), _) => p.clone().into_bytes(),
        (None, Some("-")) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("read the event from stdin")?;
            buf
        }
        (None, Some(path)) => std::fs::read(path).with_context(|| format!("read {path}"))?,
        (None, None) => b"{}".to_vec(),
    };
    let kind = if args.event {
        InvocationType::Event
    } else {
        args.kind
    };
    let header = match kind {
        InvocationType::RequestResponse => "RequestResponse",
        InvocationType::Event => "Event",
        InvocationType::DryRun => "DryRun",
    };
    let url = format!(
        "{}/2015-03-31/functions/{}/invocations",
        args.endpoint.endpoint, args.name
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .header("X-Amz-Invocation-Type", header)
        .header("content-type", "application/json")
        .body(payload)
        .send()
        .await
        .context("cannot reach the Sluice API (is a node running? see --endpoint)")?;
    let status = resp.status();
    let request_id = resp
        .headers()
        .get("x-amzn-RequestId")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let function_error = resp
        .headers()
        .get("x-amz-function-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let error_type = resp
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.context("read the response")?;
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        bail!(
            "{} ({}): {}",
            error_type.unwrap_or_else(|| "error".into()),
            status.as_u16(),
            v["message"]
                .as_str()
                .unwrap_or(&String::from_utf8_lossy(&body))
        );
    }
    eprintln!("StatusCode: {}  RequestId: {request_id}", status.as_u16());
    if !body.is_empty() {
        println!("{}", String::from_utf8_lossy(&body));
    }
    if let Some(e) = function_error {
        bail!("the function returned an error (FunctionError: {e})");
    }
    Ok(())
}
