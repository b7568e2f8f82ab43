//! Sandbox benchmark: cold start (boot to first response), warm invoke round trip (p50/p99) and
//! host memory per idle sandbox, for Sluice's jail and, in the same run, for Debian's `bwrap`
//! jailing the same agent and the same `bootstrap` (the `lambda_runtime`-built echo function).
//!
//! Run: `scripts/bench.sh sandbox` (builds the release agent and test functions first), or
//! `cargo build --release -p sluice-agent -p sluice-testfns && cargo bench -p sluice-workers --bench sandbox`.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::sandbox::Channel;
use sluice_workers::{BootError, FunctionSpec, InvokeOutcome, Isolation, Sandbox, SandboxBackend};

const COLD_STARTS: usize = 60;
const WARM_INVOKES: usize = 5000;
const IDLE_SANDBOXES: usize = 10;

fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    let dir = exe
        .ancestors()
        .nth(2)
        .expect("target/release")
        .to_path_buf();
    for bin in ["sluice-agent", "fn-echo"] {
        assert!(
            dir.join(bin).is_file(),
            "{} missing: run `cargo build --release -p sluice-agent -p sluice-testfns` first (scripts/bench.sh does)",
            dir.join(bin).display()
        );
    }
    dir
}

fn bundle(bin_dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sluice-bench-bundle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bundle dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::copy(bin_dir.join("fn-echo"), dir.join("bootstrap")).expect("copy bootstrap");
    dir
}

/// `bwrap` jailing the same agent: user, PID, network (loopback), IPC and UTS namespaces, a
/// read-only root of the same host directories, the bundle at /var/task, a private /tmp.
struct Bwrap {
    agent: PathBuf,
}

struct BwrapChild(tokio::process::Child);

#[async_trait]
impl Isolation for BwrapChild {
    async fn destroy(mut self: Box<Self>) {
        let _ = self.0.start_kill();
        let _ = self.0.wait().await;
    }
    fn out_of_memory(&self) -> bool {
        false
    }
    fn memory_bytes(&self) -> Option<u64> {
        None
    }
}

#[async_trait]
impl SandboxBackend for Bwrap {
    fn name(&self) -> &'static str {
        "bwrap"
    }
    async fn launch(
        &self,
        _id: u64,
        spec: &FunctionSpec,
    ) -> Result<(Pin<Box<dyn Channel>>, Box<dyn Isolation>), BootError> {
        let (host, guest) = StdUnixStream::pair().map_err(|e| BootError::Setup(e.to_string()))?;
        let mut cmd = tokio::process::Command::new("bwrap");
        for dir in ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"] {
            if Path::new(dir).exists() {
                cmd.args(["--ro-bind", dir, dir]);
            }
        }
        cmd.arg("--ro-bind").arg(&spec.task_dir).arg("/var/task");
        cmd.arg("--ro-bind").arg(&self.agent).arg("/sluice-agent");
        cmd.args(["--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]);
        cmd.args([
            "--unshare-all",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
        ]);
        cmd.args(["/sluice-agent", "serve", "--task-root", "/var/task"]);
        let child = cmd
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(guest)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BootError::Setup(format!("start bwrap: {e}")))?;
        host.set_nonblocking(true)
            .map_err(|e| BootError::Setup(e.to_string()))?;
        let stream =
            tokio::net::UnixStream::from_std(host).map_err(|e| BootError::Setup(e.to_string()))?;
        Ok((Box::pin(stream), Box::new(BwrapChild(child))))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

/// RSS of a process and all its descendants, bytes.
fn tree_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let own = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let mut total = own;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                total += tree_rss(c);
            }
        }
    }
    total
}

/// Direct children of this process (the jail's stage 1, or bwrap).
fn my_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{me}/task")) {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

struct Figures {
    cold_p50: Duration,
    cold_p99: Duration,
    warm_p50: Duration,
    warm_p99: Duration,
    rss_per_idle: u64,
    cgroup_per_idle: Option<u64>,
}

async fn measure(backend: &dyn SandboxBackend, spec: &Arc<FunctionSpec>) -> Figures {
    let mut cold = Vec::with_capacity(COLD_STARTS);
    for i in 0..COLD_STARTS {
        let started = Instant::now();
        let mut sb = Sandbox::boot(
            backend,
            i as u64,
            Arc::clone(spec),
            Duration::from_secs(10),
            None,
        )
        .await
        .expect("boot");
        let out = sb.invoke("cold", br#"{"cold":true}"#.to_vec(), "").await;
        cold.push(started.elapsed());
        assert!(matches!(out, InvokeOutcome::Response(_)), "{out:?}");
        sb.destroy().await;
    }
    let mut sb = Sandbox::boot(
        backend,
        10_000,
        Arc::clone(spec),
        Duration::from_secs(10),
        None,
    )
    .await
    .expect("boot");
    for _ in 0..200 {
        sb.invoke("warmup", b"{}".to_vec(), "").await;
    }
    let mut warm = Vec::with_capacity(WARM_INVOKES);
    let payload = br#"{"hello":"world"}"#.to_vec();
    for i in 0..WARM_INVOKES {
        let id = format!("warm-{i}");
        let started = Instant::now();
        let out = sb.invoke(&id, payload.clone(), "").await;
        warm.push(started.elapsed());
        assert!(matches!(out, InvokeOutcome::Response(_)));
    }
    sb.destroy().await;

    let before: Vec<u32> = my_children();
    let mut idle = Vec::new();
    for i in 0..IDLE_SANDBOXES {
        let mut sb = Sandbox::boot(
            backend,
            20_000 + i as u64,
            Arc::clone(spec),
            Duration::from_secs(10),
            None,
        )
        .await
        .expect("boot");
        sb.invoke("touch", b"{}".to_vec(), "").await;
        idle.push(sb);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss: u64 = my_children()
        .into_iter()
        .filter(|p| !before.contains(p))
        .map(tree_rss)
        .sum();
    let cgroup: Option<u64> = idle.iter().map(Sandbox::memory_bytes).sum();
    for sb in idle {
        sb.destroy().await;
    }
    cold.sort();
    warm.sort();
    Figures {
        cold_p50: percentile(&cold, 0.5),
        cold_p99: percentile(&cold, 0.99),
        warm_p50: percentile(&warm, 0.5),
        warm_p99: percentile(&warm, 0.99),
        rss_per_idle: rss / IDLE_SANDBOXES as u64,
        cgroup_per_idle: cgroup.map(|c| c / IDLE_SANDBOXES as u64),
    }
}

/// The machine's floor: a one-byte ping-pong between two threads over a Unix socket pair (two
/// wake-ups). A warm invoke crosses four process boundaries (host → agent → bootstrap → agent →
/// host), so two ping-pongs is the least it can cost here.
fn ping_pong_p50() -> Duration {
    use std::io::{Read, Write};
    let (mut a, mut b) = StdUnixStream::pair().expect("pair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut times = Vec::with_capacity(20_000);
    let mut buf = [0u8; 1];
    for _ in 0..20_000 {
        let t = Instant::now();
        a.write_all(b"x").expect("write");
        a.read_exact(&mut buf).expect("read");
        times.push(t.elapsed());
    }
    drop(a);
    let _ = echo.join();
    times.sort();
    percentile(&times, 0.5)
}

fn main() {
    let bin_dir = release_dir();
    let task = bundle(&bin_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let spec = Arc::new(FunctionSpec::new("bench-echo", &task));
        let mut jail_cfg = JailConfig::detect();
        jail_cfg.agent = bin_dir.join("sluice-agent");
        let cgroups = jail_cfg.cgroups.name();
        let jail = JailBackend::new(jail_cfg).expect("jail backend");
        let bwrap = Bwrap { agent: bin_dir.join("sluice-agent") };
        println!(
            "sandbox benchmark: lambda_runtime echo function, 128 MiB; {COLD_STARTS} cold starts, {WARM_INVOKES} warm invokes, {IDLE_SANDBOXES} idle sandboxes; cgroups: {cgroups}"
        );
        let ours = measure(&jail, &spec).await;
        let theirs = measure(&bwrap, &spec).await;
        println!("{:<34} {:>14} {:>14}", "", "sluice jail", "bwrap + agent");
        for (name, a, b) in [
            ("cold start p50 (boot → 1st reply)", ours.cold_p50, theirs.cold_p50),
            ("cold start p99", ours.cold_p99, theirs.cold_p99),
            ("warm round trip p50", ours.warm_p50, theirs.warm_p50),
            ("warm round trip p99", ours.warm_p99, theirs.warm_p99),
        ] {
            println!("{name:<34} {:>14} {:>14}", fmt(a), fmt(b));
        }
        println!(
            "{:<34} {:>11.1} MiB {:>11.1} MiB",
            "host RSS per idle sandbox",
            ours.rss_per_idle as f64 / 1048576.0,
            theirs.rss_per_idle as f64 / 1048576.0
        );
        if let Some(c) = ours.cgroup_per_idle {
            println!("{:<34} {:>11.1} MiB {:>14}", "cgroup memory per idle sandbox", c as f64 / 1048576.0, "n/a");
        }
        let pp = ping_pong_p50();
        println!(
            "machine floor: socket ping-pong p50 {} → a warm invoke (4 process crossings) cannot beat ~{}",
            fmt(pp),
            fmt(pp * 2)
        );
        println!(
            "cold start ratio sluice/bwrap: {:.2} (targets: cold p50 ≤ 10 ms and ≤ bwrap; warm p50 ≤ 100 µs)",
            ours.cold_p50.as_secs_f64() / theirs.cold_p50.as_secs_f64()
        );
    });
    let _ = std::fs::remove_dir_all(&task);
}
