//! A `sluice node` process under the fault suite's control: SIGKILL, SIGSTOP/SIGCONT, SIGTERM and
//! restart, with its log kept in a file.
//!
//! [`crate::node::Node`] sends a node's stdout (where its log goes) to `/dev/null` and does not
//! expose its process, so the suite runs its own: the log is how the suite learns what each
//! invocation ran (the function's lines, target `function`), and SIGSTOP needs the pid. The log
//! file is appended to across restarts.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::free_port;
use crate::functions::bin_dir;

/// How long a node may take to serve its API after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A node of a fault case; SIGKILLed on drop.
pub struct FaultNode {
    child: Option<Child>,
    /// Its id (`--node-id`).
    pub id: String,
    /// Its API, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    args: Vec<String>,
    log: PathBuf,
}

impl FaultNode {
    /// Starts a node with every role on `kafka` and `redis_url`, under `prefix`, keeping its log,
    /// code cache and run directory under `dir`; `extra` are more `sluice node` flags.
    ///
    /// # Panics
    /// When the binary is missing or the node does not come up.
    #[must_use]
    pub fn start(
        kafka: &str,
        redis_url: &str,
        prefix: &str,
        id: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let home = dir.join(id);
        let mut args: Vec<String> = [
            "node",
            "--kafka",
            kafka,
            "--redis",
            redis_url,
            "--node-id",
            id,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend([
            "--api".to_owned(),
            format!("127.0.0.1:{port}"),
            "--topic-prefix".to_owned(),
            format!("{prefix}."),
            "--redis-prefix".to_owned(),
            format!("{prefix}:"),
            "--code-cache-dir".to_owned(),
            home.join("code").display().to_string(),
            "--run-dir".to_owned(),
            home.join("run").display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        std::fs::create_dir_all(&home).expect("create the node's directory");
        let mut node = Self {
            child: None,
            id: id.to_owned(),
            endpoint: format!("http://127.0.0.1:{port}"),
            args,
            log: dir.join(format!("{id}.log")),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let bin = bin_dir().join("sluice");
        assert!(
            bin.is_file(),
            "{} is not built (cargo build --workspace --bins)",
            bin.display()
        );
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the node's log");
        let err = out.try_clone().expect("clone the log handle");
        let child = Command::new(bin)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_FAULT_NODE_LOG")
                    .unwrap_or_else(|_| "warn,function=info,sluice_pollers::balance=info".into()),
            )
            .env("NO_COLOR", "1")
            // The fault function's bundle is a `Code.Path` under the temporary directory.
            .env("SLUICE_CODE_PATH_ROOTS", std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start sluice node");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "node {} exited with {status} before serving its API; log {}",
                    self.id,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node {} did not serve {} within 60 s",
            self.id, self.endpoint
        );
    }

    /// The node's log (stdout and stderr, every run of it).
    #[must_use]
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// How many partitions of `topic` this node took (its log's `took partition` lines, every
    /// run of it).
    #[must_use]
    pub fn partitions_taken(&self, topic: &str) -> usize {
        self.log_lines(&format!("took partition topic={topic} "))
    }

    /// How many partitions of `topic` this node holds now, as its log tells (taken minus handed
    /// over; a SIGKILLed run's partitions are still counted).
    #[must_use]
    pub fn partitions_held(&self, topic: &str) -> usize {
        let handed = self.log_lines(&format!("handed partition over topic={topic} "))
            + self.log_lines(&format!("stopped consuming the partition topic={topic} "));
        self.partitions_taken(topic).saturating_sub(handed)
    }

    fn log_lines(&self, needle: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).count()
    }

    /// Whether the process is running (or stopped), not yet reaped.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn pid(&self) -> Option<Pid> {
        let child = self.child.as_ref()?;
        Some(Pid::from_raw(i32::try_from(child.id()).ok()?))
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, signal);
        }
    }

    /// SIGKILL: no drain, no commit, no lease release.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes with its connections open (its sandboxes run on).
    pub fn stop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`FaultNode::stop`].
    pub fn cont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGTERM, then waits up to `within` for the exit; how long it took, or `None` when it was
    /// still running (it is then SIGKILLed).
    pub fn terminate(&mut self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        self.signal(Signal::SIGTERM);
        let mut child = self.child.take()?;
        while started.elapsed() < within {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Starts the node again, with the same flags and port, if it is not running.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn start_again(&mut self) {
        if !self.is_running() {
            self.child = None;
            self.spawn();
        }
    }
}

impl Drop for FaultNode {
    fn drop(&mut self) {
        self.cont();
        self.kill();
    }
}
