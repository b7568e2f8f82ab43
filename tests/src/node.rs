//! A real `sluice node` process for end-to-end tests, on the test broker and a private Redis,
//! with its own topic and key prefixes.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::functions::bin_dir;

/// A running node; SIGKILLed on drop (and its own directory removed).
pub struct Node {
    child: Child,
    /// Its API, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    args: Vec<String>,
    /// Its code cache and run directory (unless the test gave its own), so nodes never share
    /// them.
    dir: std::path::PathBuf,
}

/// Flags that make a node's retries and lease hand-overs fast enough for tests: async retries
/// after 1 s and 2 s, throttle back-off 200 ms to 1 s, 3 s leases.
pub const FAST_RETRIES: &[&str] = &[
    "--async-retry-delays",
    "1s,2s",
    "--throttle-backoff-min",
    "200ms",
    "--throttle-backoff-max",
    "1s",
    "--lease-ttl",
    "3s",
];

impl Node {
    /// Starts a node with every role; `extra` are more `sluice node` flags.
    ///
    /// # Panics
    /// When the binary is missing or the node does not come up within 60 s.
    #[must_use]
    pub fn start(kafka: &str, redis_url: &str, prefix: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "node".into(),
            "--kafka".into(),
            kafka.into(),
            "--redis".into(),
            redis_url.into(),
            "--api".into(),
            format!("127.0.0.1:{port}"),
            "--topic-prefix".into(),
            format!("{prefix}."),
            "--redis-prefix".into(),
            format!("{prefix}:"),
        ];
        if !extra.contains(&"--node-id") {
            args.extend(["--node-id".to_owned(), format!("{prefix}-node")]);
        }
        let dir = std::env::temp_dir().join(format!("sluice-node-{}", uuid::Uuid::new_v4()));
        if !extra.contains(&"--code-cache-dir") {
            args.extend([
                "--code-cache-dir".to_owned(),
                dir.join("code").display().to_string(),
            ]);
        }
        if !extra.contains(&"--run-dir") {
            args.extend([
                "--run-dir".to_owned(),
                dir.join("run").display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut node = Self {
            child: spawn(&args),
            endpoint: format!("http://127.0.0.1:{port}"),
            args,
            dir,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sluice node exited with {status} before serving its API");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sluice node did not serve {} within 60 s", self.endpoint);
    }

    /// SIGKILLs the node (no shutdown, no commits, no lease release).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a clean stop) and waits up to `within` for the node to exit; returns how
    /// long it took and how it exited, or `None` if it was still running (it is then killed).
    pub fn terminate(&mut self, within: Duration) -> Option<(Duration, std::process::ExitStatus)> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).ok()?);
        let started = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).ok()?;
        while started.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((started.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Starts the node again with the same flags (same API port).
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.args);
        self.wait_ready();
    }

    /// The value of a Prometheus counter or gauge, summed over label sets matching `labels`.
    ///
    /// # Panics
    /// When `/metrics` cannot be read.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.endpoint))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn spawn(args: &[String]) -> Child {
    let bin = bin_dir().join("sluice");
    assert!(
        bin.is_file(),
        "{} is not built (cargo test --workspace builds it)",
        bin.display()
    );
    Command::new(bin)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("SLUICE_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env(
            "SLUICE_CODE_PATH_ROOTS",
            format!(
                "{},{}",
                crate::functions::bundle_root().display(),
                concat!(env!("CARGO_MANIFEST_DIR"), "/../examples")
            ),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sluice node")
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
