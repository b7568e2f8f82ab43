//! A private tansu broker per test, for tests that stop, freeze or restart the broker itself
//! (the shared one from `scripts/test.sh` serves every other test and must not be disturbed).
//!
//! It runs on a free loopback port with its own durable `sqlite://` data in its own directory,
//! exactly as the scripts start the shared one, so a restart keeps every record. `tansu` must be
//! on `PATH` (or named by `SLUICE_TANSU`); `scripts/test.sh` installs it. A missing broker fails
//! the test with that instruction: broker tests are never skipped.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// How long tansu may take to accept connections after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many ports to try when the one picked was taken between picking and binding.
const PORT_ATTEMPTS: usize = 5;

/// A running tansu owned by one test; killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct Broker {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn broker_binary() -> String {
    std::env::var("SLUICE_TANSU").unwrap_or_else(|_| "tansu".to_owned())
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

impl Broker {
    /// Starts a broker on a free loopback port and waits until it accepts connections.
    ///
    /// # Panics
    /// When `tansu` is not installed (run `scripts/test.sh`) or does not come up; the message
    /// carries its log.
    #[must_use]
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-tansu-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the broker's directory");
        let mut broker = Self {
            port: 0,
            dir,
            child: None,
        };
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            broker.port = free_port();
            match broker.spawn() {
                Ok(()) => return broker,
                Err(log) => last_log = log,
            }
        }
        panic!("tansu did not start after {PORT_ATTEMPTS} attempts; last log:\n{last_log}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.join("tansu.log");
        let out = std::fs::File::create(&log).expect("create the broker's log");
        let err = out.try_clone().expect("clone the log handle");
        let binary = broker_binary();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&binary)
            .current_dir(&self.dir)
            .args(["broker", "--storage-engine", "sqlite://tansu.db"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{binary}` not found: these tests run a private Kafka-compatible broker. Run \
                 `scripts/test.sh` (it installs tansu 0.6.0), or set SLUICE_TANSU to its path."
            ),
            Err(e) => panic!("spawn `{binary}`: {e}"),
        };
        let started = Instant::now();
        loop {
            if accepts(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers` and `sluice node --kafka`.
    #[must_use]
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's directory (its log is `tansu.log` there).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing is answered, like a
    /// broker stalled by its host or cut off by the network.
    ///
    /// # Panics
    /// When the broker is not running.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Resumes a broker frozen by [`Broker::pause`] (SIGCONT).
    ///
    /// # Panics
    /// When the broker is not running.
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// Kills the broker (SIGKILL), as a crash would; its data stays on disk.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker and starts it again on the same port and the same data.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart(&mut self) {
        self.kill();
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn() {
                Ok(()) => return,
                Err(log) => last_log = log,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "tansu did not restart on port {}; last log:\n{last_log}",
            self.port
        );
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the broker is running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        nix::sys::signal::kill(pid, signal).expect("signal the broker");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGKILL ends a frozen broker too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
