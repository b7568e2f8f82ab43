//! `sluice dev`: the single-machine default. Starts the broker and Redis when they are not
//! reachable, then a node with every role; Ctrl-C stops everything it started.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser};
use tracing::info;

use crate::node::{self, NodeConfig, Role};

/// `sluice node`'s settings with their defaults.
#[derive(Parser)]
struct NodeDefaults {
    #[command(flatten)]
    node: NodeConfig,
}
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
    /// Another directory `Code.Path` may name bundles under (repeatable). The working directory
    /// is always allowed, and so are the roots in SLUICE_CODE_PATH_ROOTS.
    #[arg(long = "code-path-root", value_name = "DIR")]
    code_path_roots: Vec<PathBuf>,
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
    // Every other setting keeps `sluice node`'s default (and its SLUICE_* variable).
    let mut node_args = NodeDefaults::try_parse_from(["node"])
        .context("the node's default settings")?
        .node;
    node_args.kafka.clone_from(&args.kafka);
    node_args.redis = format!("redis://{}", args.redis);
    node_args.api = args.api;
    node_args.roles = vec![Role::Frontend, Role::Poller, Role::Worker];
    node_args.node_id = Some("dev".into());
    node_args.memory_budget_mb = args.memory_budget_mb;
    // The code cache lives under the data directory, so a dev node never shares (and is never
    // refused) the host-wide default another node holds.
    if std::env::var_os("SLUICE_CODE_CACHE_DIR").is_none() {
        let data = std::fs::canonicalize(&args.data_dir)
            .with_context(|| format!("resolve {}", args.data_dir.display()))?;
        node_args.code_cache_dir = data.join("code-cache");
    }
    node_args
        .async_retry_delays
        .clone_from(&args.async_retry_delays);
    // A laptop's bundles live in the project being worked on: `--code ./bundle` just works.
    let cwd = std::env::current_dir().context("the working directory")?;
    if cwd.parent().is_none() {
        tracing::warn!("sluice dev runs in /: Code.Path may name any directory on this machine");
    }
    node_args.code_path_roots.push(cwd);
    node_args
        .code_path_roots
        .extend(args.code_path_roots.iter().cloned());
    info!(roots = ?node_args.code_path_roots, "Code.Path allowed under these directories");
    crate::config::validate(&node_args)?;
    let stages = node::Stages::default();
    node::start(&node_args, &stages).await?;
    info!(api = %args.api, "sluice dev is up; Ctrl-C stops it");
    node::wait_for_signal().await;
    info!("shutting down");
    stages.shut_down().await;
    Ok(())
}
