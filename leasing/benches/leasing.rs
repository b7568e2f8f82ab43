//! Throughput of lease renewals and of slot acquire + release, printed beside `redis-benchmark`
//! against the same server in the same run, as a ratio.
//!
//! ```text
//! cargo bench -p sluice-leasing --bench leasing
//! ```
//!
//! Starts its own `redis-server` on a free loopback port, or uses `REDIS_URL` when set.
//! `SLUICE_BENCH_SECS` (default 3) is the measuring time per operation, `SLUICE_BENCH_TASKS`
//! (default 50) the number of concurrent tasks, all sharing one multiplexed connection as a
//! Sluice node does; `redis-benchmark` runs with as many clients (`-c`), one connection each.

use std::error::Error;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use sluice_leasing::{ConcurrencyCounter, FunctionLimit, Leaser};

type BenchResult<T> = Result<T, Box<dyn Error>>;

const WARMUP: Duration = Duration::from_millis(500);
const REDIS_BENCHMARK_REQUESTS: &str = "200000";

/// A `redis-server` this benchmark started; killed on drop.
struct OwnServer {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server() -> BenchResult<(OwnServer, String)> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("sluice-bench-redis-{port}"));
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| format!("spawn redis-server (run scripts/test.sh to install it): {err}"))?;
    let server = OwnServer { child, dir };
    let started = Instant::now();
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("redis-server did not start within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((server, format!("redis://127.0.0.1:{port}/")))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> BenchResult<T> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| format!("{name} must be a number, got {value:?}").into()),
        Err(_) => Ok(default),
    }
}

/// Runs `op` in `tasks` concurrent loops for `secs` after a warm-up; returns completed ops/s.
async fn measure<F, Fut>(tasks: usize, duration: Duration, op: F) -> BenchResult<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = BenchResult<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now() + WARMUP;
    let end = start + duration;
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let (op, done) = (Arc::clone(&op), Arc::clone(&done));
        handles.push(tokio::spawn(async move {
            loop {
                op(task).await.map_err(|err| err.to_string())?;
                let now = tokio::time::Instant::now();
                if now >= end {
                    return Ok::<(), String>(());
                }
                if now >= start {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for handle in handles {
        handle.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64())
}

/// Runs `redis-benchmark` against `url` and returns its requests per second.
fn redis_benchmark(url: &str, clients: usize, command: &[&str]) -> BenchResult<f64> {
    let output = Command::new("redis-benchmark")
        .args(["-u", url, "-c", &clients.to_string()])
        .args(["-n", REDIS_BENCHMARK_REQUESTS, "--csv"])
        .args(command)
        .output()
        .map_err(|err| format!("run redis-benchmark (install redis-tools): {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    // CSV: a header, then `"TEST","RPS",…`.
    let stdout = String::from_utf8(output.stdout)?;
    let rps = stdout
        .lines()
        .filter(|line| !line.starts_with("\"test\""))
        .find_map(|line| line.split("\",\"").nth(1))
        .ok_or_else(|| format!("no result in redis-benchmark output: {stdout:?}"))?;
    Ok(rps.parse()?)
}

async fn server_version(conn: &mut ConnectionManager) -> BenchResult<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned())
}

fn main() -> BenchResult<()> {
    let secs: u64 = env_or("SLUICE_BENCH_SECS", 3)?;
    let tasks: usize = env_or("SLUICE_BENCH_TASKS", 50)?;
    let duration = Duration::from_secs(secs);
    let (_own, url) = match std::env::var("REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let (server, url) = start_server()?;
            (Some(server), url)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let (version, renew, pairs, sha) = runtime.block_on(async {
        let mut conn = sluice_leasing::connect(&url).await?;
        let version = server_version(&mut conn).await?;
        let prefix = format!("bench-{}", uuid::Uuid::new_v4());

        // Lease renew: each task renews its own lease, as each poller renews its work units.
        let leaser = Leaser::new(conn.clone(), &prefix, "bench", Duration::from_secs(60))?;
        let mut leases = Vec::with_capacity(tasks);
        for task in 0..tasks {
            let lease = leaser
                .acquire(&format!("unit-{task}"))
                .await?
                .ok_or("a fresh lease is free")?;
            leases.push(lease);
        }
        let leases = Arc::new(leases);
        let renew = {
            let leases = Arc::clone(&leases);
            measure(tasks, duration, move |task| {
                let leases = Arc::clone(&leases);
                async move { Ok(leases[task].renew_now().await?) }
            })
            .await?
        };
        for lease in Arc::try_unwrap(leases).map_err(|_| "leases still shared")? {
            lease.release().await?;
        }

        // Slot acquire + release on the unreserved pool (three sorted sets per script), with
        // a limit that is never reached, spread over ten functions.
        let counter = ConcurrencyCounter::new(conn.clone(), &prefix, Duration::from_secs(60))?;
        let limit = FunctionLimit::Unreserved {
            unreserved_limit: 1_000_000,
        };
        let pairs = measure(tasks, duration, move |task| {
            let counter = counter.clone();
            async move {
                let slot = counter
                    .acquire(&format!("function-{}", task % 10), limit)
                    .await?;
                slot.release().await?;
                Ok(())
            }
        })
        .await?;

        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg("return 1")
            .query_async(&mut conn)
            .await?;
        BenchResult::Ok((version, renew, pairs, sha))
    })?;

    let set = redis_benchmark(&url, tasks, &["-t", "set"])?;
    let evalsha = redis_benchmark(&url, tasks, &["EVALSHA", &sha, "0"])?;

    let rows = [
        ("redis-benchmark SET", set),
        ("redis-benchmark EVALSHA `return 1`", evalsha),
        ("sluice lease renew (1 EVALSHA)", renew),
        ("sluice slot acquire+release, pairs", pairs),
        ("sluice slot acquire+release, scripts", pairs * 2.0),
    ];
    println!();
    println!(
        "redis-server {version} at {url}; {tasks} concurrent tasks on one multiplexed \
         connection (sluice) / {tasks} connections (redis-benchmark, -n {REDIS_BENCHMARK_REQUESTS}); \
         {secs} s per sluice operation"
    );
    println!(
        "{:<40} {:>12} {:>14} {:>18}",
        "operation", "ops/s", "ratio vs SET", "ratio vs EVALSHA"
    );
    for (name, ops) in rows {
        println!(
            "{name:<40} {ops:>12.0} {:>14.2} {:>18.2}",
            ops / set,
            ops / evalsha
        );
    }
    Ok(())
}
