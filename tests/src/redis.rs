//! A private `redis-server` per test: free loopback port, own directory, no persistence.
//!
//! Starting one takes a few milliseconds, so every test gets its own and can restart, pause or
//! kill it without disturbing the others. `redis-server` must be on `PATH` (or named by
//! `SLUICE_REDIS_SERVER`); `scripts/test.sh` installs it. A missing server fails the test with
//! that instruction: Redis tests are never skipped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use crate::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports to try when the one picked was taken between picking and binding.
const PORT_ATTEMPTS: usize = 5;

/// A running `redis-server` owned by one test; killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn server_binary() -> String {
    std::env::var("SLUICE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// Whether a Redis server answers `PING` on `port`.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0_u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed (run `scripts/test.sh`), or the server does not come
    /// up; the message carries the server's log.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the Redis directory");
        let mut server = Self {
            port: 0,
            dir,
            child: None,
        };
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} attempts; last log:\n{last_log}");
    }

    /// Spawns the server on `self.port`; `Err` carries its log when it exited or never answered.
    fn spawn(&mut self) -> Result<(), String> {
        let log = self.log_path();
        // Truncate so that the error log is this attempt's.
        std::fs::write(&log, b"").expect("reset the Redis log");
        let binary = server_binary();
        let child = Command::new(&binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{binary}` not found: the Redis integration tests need a real redis-server. \
                 Run `scripts/test.sh` (it installs and checks the test dependencies), or \
                 `apt-get install redis-server`, or set SLUICE_REDIS_SERVER to its path."
            ),
            Err(err) => panic!("spawn `{binary}`: {err}"),
        };
        let started = Instant::now();
        loop {
            if answers_ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The server's directory (its log is `redis.log` there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A connection as Sluice opens it ([`sluice_leasing::connect`]).
    ///
    /// # Panics
    ///
    /// When the server does not accept the connection.
    pub async fn connect(&self) -> ::redis::aio::ConnectionManager {
        sluice_leasing::connect(&self.url())
            .await
            .expect("connect to the test redis-server")
    }

    /// Kills the server (SIGKILL), as a crash would; everything in it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a new, empty one on the same port.
    ///
    /// # Panics
    ///
    /// When the new server does not come up.
    pub fn restart(&mut self) {
        self.kill();
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn() {
                Ok(()) => return,
                Err(log) => last_log = log,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "redis-server did not restart on port {}; last log:\n{last_log}",
            self.port
        );
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered, like a
    /// server stalled by the host or a network partition.
    ///
    /// # Panics
    ///
    /// When the server is not running or the signal cannot be sent.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a server frozen by [`RedisServer::pause`] (SIGCONT).
    ///
    /// # Panics
    ///
    /// When the server is not running or the signal cannot be sent.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill {signal} {pid} failed: {status}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
