//! `sluice-agent`: PID 1 of a sandbox.
//!
//! - `sluice-agent jail '<JailSpec JSON>'`: stage 1 of the jailed-process sandbox (started by the
//!   host with the protocol socket as stdin).
//! - `sluice-agent init '<JailSpec JSON>'`: stage 2, PID 1 of the new namespaces; builds the root,
//!   locks itself down and becomes the agent, which starts the function as the jail's
//!   unprivileged function uid.
//! - `sluice-agent serve --task-root DIR`: the agent alone on stdin (micro-VM `/init`, tests).
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;

use sluice_agent::jail::{self, JailSpec};
use sluice_agent::runtime::{self, AgentConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("jail") => spec(&args).and_then(|s| stage1(&s)),
        Some("init") => spec(&args).and_then(|s| {
            jail::stage2(&s).map_err(|e| e.to_string())?;
            serve(AgentConfig {
                function_ids: Some((jail::FUNCTION_UID, jail::FUNCTION_GID)),
                ..AgentConfig::default()
            })
        }),
        Some("serve") => {
            let mut config = AgentConfig::default();
            if let (Some("--task-root"), Some(dir)) = (args.get(2).map(String::as_str), args.get(3))
            {
                config.task_root = dir.into();
            }
            serve(config)
        }
        _ => Err("usage: sluice-agent jail|init <spec-json> | serve [--task-root DIR]".to_owned()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-agent: {e}");
            ExitCode::from(111)
        }
    }
}

fn spec(args: &[String]) -> Result<JailSpec, String> {
    let text = args.get(2).ok_or("missing jail spec")?;
    serde_json::from_str(text).map_err(|e| format!("bad jail spec: {e}"))
}

fn stage1(spec: &JailSpec) -> Result<ExitCode, String> {
    let stdin = std::io::stdin();
    let fd: OwnedFd = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let mut channel = std::os::unix::net::UnixStream::from(fd);
    jail::stage1(spec, &mut channel).map_err(|e| e.to_string())?;
    drop(channel);
    let exe = std::env::current_exe().map_err(|e| format!("find own executable: {e}"))?;
    let json = serde_json::to_string(spec).map_err(|e| e.to_string())?;
    // The first child after unshare(CLONE_NEWPID) is PID 1 of the new namespace.
    let status = std::process::Command::new(exe)
        .arg("init")
        .arg(json)
        .status()
        .map_err(|e| format!("start stage 2: {e}"))?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(112)).unwrap_or(112),
    ))
}

fn serve(config: AgentConfig) -> Result<ExitCode, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("start runtime: {e}"))?;
    rt.block_on(async move {
        let stdin = std::io::stdin();
        let fd: OwnedFd = stdin
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())?;
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let stream = tokio::net::UnixStream::from_std(std_stream).map_err(|e| e.to_string())?;
        runtime::run(stream, config)
            .await
            .map_err(|e| e.to_string())
    })?;
    Ok(ExitCode::SUCCESS)
}
