//! The local services `sluice dev` starts when none are reachable: Redis (`redis-server`) and a
//! Kafka-compatible broker (tansu, with durable `sqlite://` storage).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A service this process started; stopped (SIGTERM, then SIGKILL) by [`Service::stop`].
pub struct Service {
    pub name: &'static str,
    child: Child,
}

impl Service {
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // Ask politely so the broker and Redis close their files; SIGKILL if they linger.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                tracing::info!(service = self.name, "stopped");
                return;
            }
        }
        let _ = self.child.kill().await;
        tracing::warn!(service = self.name, "killed after 5 s");
    }
}

/// Whether something accepts TCP connections at `addr`.
pub async fn reachable(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Finds `name` on PATH or in `~/.cargo/bin`.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

async fn wait_until_reachable(
    addr: &str,
    name: &str,
    child: &mut Child,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if reachable(addr).await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited with {status} before it answered; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{name} did not answer on {addr} within 60 s; see {}",
        log.display()
    )
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok((path, file))
}

/// Starts `redis-server` on `127.0.0.1:port` with its data (append-only file) under `dir`.
pub async fn start_redis(dir: &Path, port: u16) -> anyhow::Result<Service> {
    let bin = find_binary("redis-server").context(
        "redis-server is not installed: run scripts/setup.sh (or apt-get install redis-server)",
    )?;
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let (log, file) = log_file(dir, "redis")?;
    let mut child = Command::new(bin)
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--appendonly",
            "yes",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .context("start redis-server")?;
    wait_until_reachable(
        &format!("127.0.0.1:{port}"),
        "redis-server",
        &mut child,
        &log,
    )
    .await?;
    Ok(Service {
        name: "redis-server",
        child,
    })
}

/// Starts tansu on `127.0.0.1:port` with durable SQLite storage under `dir`.
pub async fn start_tansu(dir: &Path, port: u16) -> anyhow::Result<Service> {
    let bin = std::env::var_os("SLUICE_TANSU").map(PathBuf::from).or_else(|| find_binary("tansu")).context(
        "tansu is not installed: run scripts/setup.sh (it runs `cargo install tansu@0.6.0 --locked \
         --features dynostore,libsql`, 15–25 minutes once)",
    )?;
    let data = dir.join("kafka");
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let (log, file) = log_file(dir, "tansu")?;
    let url = format!("tcp://127.0.0.1:{port}");
    // tansu resolves the sqlite:// path against its working directory.
    let mut child = Command::new(bin)
        .args(tansu_args("tansu.db", &url))
        .current_dir(&data)
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .context("start tansu")?;
    wait_until_reachable(&format!("127.0.0.1:{port}"), "tansu", &mut child, &log).await?;
    Ok(Service {
        name: "tansu",
        child,
    })
}

/// tansu 0.6.0's command line for one broker on `listener` storing in the SQLite file `db`
/// (relative to its working directory). Its `memory://` engine reports wrong high watermarks.
fn tansu_args(db: &str, listener: &str) -> Vec<String> {
    vec![
        "broker".into(),
        "--storage-engine".into(),
        format!("sqlite://{db}"),
        "--listener-url".into(),
        listener.into(),
        "--advertised-listener-url".into(),
        listener.into(),
    ]
}
