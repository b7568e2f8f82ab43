//! `sluice dev`: the single-machine default. Starts the broker and Redis when they are not
//! reachable, then a node with every role; Ctrl-C stops everything it started.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::node::{self, NodeArgs, Role};
use crate::services::{self, Service};

/// Options of `sluice dev`.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Kafka address: used if reachable, else a local tansu broker is started on its port.
    #[arg(long, env = "SLUICE_KAFKA", default_value = "127.0.0.1:9092")]
    kafka: String,
    /// Redis address (host:port): used if reachable, else a local redis-server is started.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// Address the API and `/metrics` listen on.
    #[arg(long, env = "SLUICE_API", default_value = "127.0.0.1:9000")]
    api: std::net::SocketAddr,
    /// Memory all sandboxes may use together, MiB.
    #[arg(long, default_value_t = 4096)]
    memory_budget_mb: u64,
    /// Waits before retrying an async event after a function error (Lambda: 60s,120s).
    #[arg(long, value_delimiter = ',', default_value = "60s,120s", value_parser = crate::node::parse_duration)]
    async_retry_delays: Vec<Duration>,
    /// Where started services keep their data and logs.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = ".sluice-dev")]
    data_dir: PathBuf,
}

fn port_of(addr: &str) -> anyhow::Result<u16> {
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    port.parse()
        .with_context(|| format!("{addr:?} must be host:port"))
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    node::init_tracing();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let mut started: Vec<Service> = Vec::new();
    let result = run_inner(&args, &mut started).await;
    for service in started.into_iter().rev() {
        service.stop().await;
    }
    result
}

async fn run_inner(args: &DevArgs, started: &mut Vec<Service>) -> anyhow::Result<()> {
    if services::reachable(&args.redis).await {
        info!(addr = %args.redis, "using the Redis that is already running");
    } else {
        info!(addr = %args.redis, "starting redis-server");
        started.push(services::start_redis(&args.data_dir, port_of(&args.redis)?).await?);
    }
    if services::reachable(&args.kafka).await {
        info!(addr = %args.kafka, "using the Kafka broker that is already running");
    } else {
        info!(addr = %args.kafka, "starting tansu (Kafka-compatible broker, sqlite storage)");
        started.push(services::start_tansu(&args.data_dir, port_of(&args.kafka)?).await?);
    }
    let node_args = NodeArgs {
        kafka: args.kafka.clone(),
        redis: format!("redis://{}", args.redis),
        api: args.api,
        roles: vec![Role::Frontend, Role::Poller, Role::Worker],
        node_id: Some("dev".into()),
        topic_prefix: "sluice.".into(),
        redis_prefix: "sluice:".into(),
        account_concurrency: 1000,
        region: "us-east-1".into(),
        sandbox: crate::worker::SandboxKind::Auto,
        memory_budget_mb: args.memory_budget_mb,
        async_retry_delays: args.async_retry_delays.clone(),
        throttle_backoff_min: Duration::from_secs(1),
        throttle_backoff_max: Duration::from_secs(300),
        lease_ttl: Duration::from_secs(10),
        access_keys: Vec::new(),
        worker_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        worker_advertise: None,
        worker_ttl: Duration::from_secs(5),
        worker_token: None,
        sandbox_idle_timeout: Duration::from_secs(300),
        init_timeout: Duration::from_secs(10),
        code_cache_dir: "/var/cache/sluice/code".into(),
        code_cache_max_mb: 10_240,
        kafka_properties: Vec::new(),
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    node::start(&node_args, &cancel, &tracker).await?;
    info!(api = %args.api, "sluice dev is up; Ctrl-C stops it");
    node::wait_for_signal().await;
    info!("shutting down");
    cancel.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    Ok(())
}
