//! `sluice node`: one stateless node. Durable state is in Kafka, coordination state in Redis.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use clap::{Args, ValueEnum};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;

use sluice_core::events::EventProducer;
use sluice_core::invoke::Invoker;
use sluice_core::kafka::KafkaSettings;
use sluice_core::store::{ConfigStore, ConfigStoreConfig};
use sluice_destinations::DestinationWriter;
use sluice_fleet::invoker::{AccountIdentity, ClusterInvoker, ClusterParts};
use sluice_fleet::registry::WorkerRegistry;
use sluice_fleet::role::{start_worker as start_worker_role, WorkerRoleConfig, WorkerRoleParts};
use sluice_fleet::worker_manager::IdleIndex;
use sluice_ingest::{AccountSettings, ApiState};
use sluice_leasing::ConcurrencyCounter;
use sluice_pollers::async_poller::{AsyncPoller, AsyncPollerConfig};
use sluice_pollers::stream::{StreamConfig, StreamTracker};
use sluice_workers::service::WorkerService;
use sluice_workers::PoolConfig;

use crate::worker::{self, SandboxKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// A node's jobs. Every node runs the same binary; roles pick what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The Lambda-compatible API (control and Invoke) and `/metrics`.
    Frontend,
    /// Async-queue and stream pollers.
    Poller,
    /// Sandboxes that run functions.
    Worker,
}

/// A node's configuration: every setting of `sluice node`, from its flag, its `SLUICE_*`
/// variable or its key in the `--config` file (see `crate::config`), checked by
/// `crate::config::validate` before anything starts. Every path the node writes comes from here.
#[derive(Debug, Clone, Args)]
pub struct NodeConfig {
    /// Kafka bootstrap servers (any Kafka-compatible cluster).
    #[arg(long, env = "SLUICE_KAFKA", default_value = "127.0.0.1:9092")]
    pub kafka: String,
    /// Redis URL (leases, concurrency slots, worker registry).
    #[arg(long, env = "SLUICE_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Address `/metrics` and `/healthz` listen on, and with the frontend role the Lambda API.
    #[arg(long, env = "SLUICE_API", default_value = "127.0.0.1:9000")]
    pub api: SocketAddr,
    /// Roles this node runs, comma-separated.
    #[arg(
        long,
        env = "SLUICE_ROLES",
        value_delimiter = ',',
        default_value = "frontend,poller,worker"
    )]
    pub roles: Vec<Role>,
    /// This node's name in logs, metrics and Redis (default: host name and process id).
    #[arg(long, env = "SLUICE_NODE_ID")]
    pub node_id: Option<String>,
    /// Prefix of every topic Sluice creates (the configuration topic is `<prefix>config`).
    #[arg(long, env = "SLUICE_TOPIC_PREFIX", default_value = "sluice.")]
    pub topic_prefix: String,
    /// Prefix of every Redis key Sluice writes.
    #[arg(long, env = "SLUICE_REDIS_PREFIX", default_value = "sluice:")]
    pub redis_prefix: String,
    /// Account concurrency limit (Lambda's default is 1000).
    #[arg(long, env = "SLUICE_ACCOUNT_CONCURRENCY", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
    pub account_concurrency: u32,
    /// Region shown in ARNs.
    #[arg(long, env = "SLUICE_REGION", default_value = "us-east-1")]
    pub region: String,
    /// How functions are isolated (worker role): a KVM micro-VM where hardware virtualization
    /// allows it, else a jailed process.
    #[arg(long, env = "SLUICE_SANDBOX", value_enum, default_value = "auto")]
    pub sandbox: SandboxKind,
    /// Memory all of this node's sandboxes may use together, MiB.
    #[arg(long, env = "SLUICE_MEMORY_BUDGET_MB", default_value_t = 4096)]
    pub memory_budget_mb: u64,
    /// Waits before retrying an async event after a function error (Lambda: 60s,120s; the count
    /// caps MaximumRetryAttempts).
    #[arg(long, env = "SLUICE_ASYNC_RETRY_DELAYS", value_delimiter = ',', default_value = "60s,120s", value_parser = parse_duration)]
    pub async_retry_delays: Vec<Duration>,
    /// First back-off of a throttled async event; it doubles up to --throttle-backoff-max.
    #[arg(long, env = "SLUICE_THROTTLE_BACKOFF_MIN", default_value = "1s", value_parser = parse_duration)]
    pub throttle_backoff_min: Duration,
    /// TTL of the Redis leases that give each poller its partitions: a dead node's partitions move
    /// to the others after this long.
    #[arg(long, env = "SLUICE_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// An access key the API accepts, `ACCESS_KEY_ID:SECRET` (repeatable). With any set, every
    /// request must be signed with AWS Signature V4 (as the AWS SDKs and CLI do); unsigned or
    /// wrongly signed requests get 403. With none, requests are not checked.
    #[arg(
        long = "access-key",
        env = "SLUICE_ACCESS_KEYS",
        value_delimiter = ',',
        value_name = "ID:SECRET"
    )]
    pub access_keys: Vec<String>,
    /// Longest back-off of a throttled async event.
    #[arg(long, env = "SLUICE_THROTTLE_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub throttle_backoff_max: Duration,
    /// How often, in seconds, the pollers send a partition's unchanged committed offset again,
    /// so that Kafka never expires a quiet consumer group's offsets (`offsets.retention.minutes`,
    /// 7 days by default). Hidden from `--help`: only tests need it shorter than the hour.
    #[arg(long, env = "SLUICE_COMMIT_REFRESH_SECS", default_value_t = 3600, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub commit_refresh_secs: u64,
    /// How long, in hours, the logs topic (`<prefix>logs`) keeps each invocation's log
    /// (`sluice logs FUNCTION` reads it).
    #[arg(long, env = "SLUICE_LOG_RETENTION_HOURS", default_value_t = 168,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub log_retention_hours: u64,
    /// Fault injection for tests: this node's configuration view applies each record only this
    /// many milliseconds after it was written, so the view lags the log on demand. Hidden from
    /// `--help`; 0 (the default) in production.
    #[arg(
        long,
        env = "SLUICE_FAULT_CONFIG_VIEW_LAG_MS",
        default_value_t = 0,
        hide = true
    )]
    pub fault_config_view_lag_ms: u64,
    /// Address the worker API listens on (worker role): other nodes send invocations there.
    /// Port 0 picks a free port. Use a routable address when nodes run on different hosts.
    #[arg(long, env = "SLUICE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    pub worker_listen: SocketAddr,
    /// Address other nodes use to reach this worker (default: the address it listens on).
    #[arg(long, env = "SLUICE_WORKER_ADVERTISE", value_name = "HOST:PORT")]
    pub worker_advertise: Option<String>,
    /// How long a worker's registration lives without a heartbeat (it heartbeats five times per
    /// TTL): a dead worker stops being offered warm sandboxes or new ones after this long.
    #[arg(long, env = "SLUICE_WORKER_TTL", default_value = "5s", value_parser = parse_duration)]
    pub worker_ttl: Duration,
    /// A shared secret between the nodes: workers run only invocations that carry it, and every
    /// node sends it. Set the same value on every node whenever the worker API is reachable from
    /// outside the cluster's private network.
    #[arg(
        long,
        env = "SLUICE_WORKER_TOKEN",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub worker_token: Option<String>,
    /// Idle sandboxes are destroyed after this long (provisioned ones are kept).
    #[arg(long, env = "SLUICE_SANDBOX_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub sandbox_idle_timeout: Duration,
    /// How long a function's init may take (Lambda: 10 s); past it the invocation fails with
    /// `Sandbox.Timedout`, counted as a function error.
    #[arg(long, env = "SLUICE_INIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub init_timeout: Duration,
    /// Where the worker role unpacks code kept in Kafka (`Code.ZipFile`). One node per
    /// directory: a node holds a lock on it while it runs, and a second node refuses to start
    /// on it.
    #[arg(
        long,
        env = "SLUICE_CODE_CACHE_DIR",
        default_value = "/var/cache/sluice/code"
    )]
    pub code_cache_dir: std::path::PathBuf,
    /// Size bound of the code cache, MiB: least recently used bundles are removed past it, but
    /// never one a live sandbox runs from or an invocation in progress has fetched.
    #[arg(long, env = "SLUICE_CODE_CACHE_MAX_MB", default_value_t = 10_240)]
    pub code_cache_max_mb: u64,
    /// A directory under which `Code.Path` may name function bundles (repeatable; the variable
    /// takes a comma-separated list). Symlinks are resolved first, so none leads out of a root.
    /// With none, `Code.Path` is refused and functions come as `Code.ZipFile`.
    #[arg(
        long = "code-path-root",
        env = "SLUICE_CODE_PATH_ROOTS",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub code_path_roots: Vec<std::path::PathBuf>,
    /// Where the node keeps what lives only while it runs (the jails' directories), default
    /// `/run/sluice/<node id>`: each node on a host needs its own.
    #[arg(long, env = "SLUICE_RUN_DIR", value_name = "DIR")]
    pub run_dir: Option<std::path::PathBuf>,
    /// A TOML file of settings, one key per flag without its dashes (`lease-ttl = "10s"`,
    /// `roles = ["poller", "worker"]`). Flags and `SLUICE_*` variables override it; an unknown
    /// key is an error.
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// An extra librdkafka property for every Kafka client, `KEY=VALUE` (repeatable), e.g.
    /// `message.max.bytes=1048588` for a cluster whose brokers allow less than Sluice's 8 MiB.
    #[arg(long = "kafka-property", env = "SLUICE_KAFKA_PROPERTIES", value_delimiter = ',', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

/// Parses `KEY=VALUE`.
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Parses `250ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 30s, 5m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

impl NodeConfig {
    /// The run directory: `--run-dir`, or `/run/sluice/<node id>`.
    #[must_use]
    pub fn run_dir(&self, node_id: &str) -> std::path::PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| std::path::Path::new("/run/sluice").join(node_id))
    }

    fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

pub async fn run(args: NodeConfig) -> anyhow::Result<()> {
    init_tracing();
    crate::config::validate(&args)?;
    let stages = Stages::default();
    start(&args, &stages).await?;
    wait_for_signal().await;
    info!("shutting down");
    stages.shut_down().await;
    Ok(())
}

/// How long the intake stage may take to stop: the API finishes the requests it has, and the
/// pollers drain (5 s), commit (2 s) and release their leases (1 s).
pub const INTAKE_DEADLINE: Duration = Duration::from_secs(9);
/// How long the worker stage may take after intake: deregister from the fleet, stop the worker
/// API, destroy the sandboxes.
pub const WORKER_DEADLINE: Duration = Duration::from_secs(4);
/// How long the last stage may take: the configuration store's tail.
pub const STORE_DEADLINE: Duration = Duration::from_secs(1);

/// A node's tasks in shutdown order, each stage with its own token and tracker: intake (the
/// API and the pollers, which drain, commit and release leases themselves), then the worker role
/// (which keeps running until the pollers' in-flight invocations are done), then the
/// configuration store. Each stage's deadline ends before the next one's: the node is gone
/// within their sum (14 s), whatever a stage does.
#[derive(Default)]
pub struct Stages {
    /// The API and the pollers.
    pub intake: Stage,
    /// The pool, the worker API, the heartbeat, the idle index and the fleet view.
    pub workers: Stage,
    /// The configuration store.
    pub store: Stage,
}

/// One shutdown stage.
#[derive(Default)]
pub struct Stage {
    /// Fires when the stage is to stop.
    pub cancel: CancellationToken,
    /// Its tasks.
    pub tasks: TaskTracker,
}

impl Stage {
    async fn stop(&self, name: &str, deadline: Duration) {
        let started = std::time::Instant::now();
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                stage = name,
                ?deadline,
                "shutdown stage did not finish within its deadline; going on"
            );
        } else {
            info!(stage = name, took = ?started.elapsed(), "shutdown stage done");
        }
    }
}

impl Stages {
    /// Stops the stages in order, each within its deadline.
    pub async fn shut_down(&self) {
        self.intake.stop("intake", INTAKE_DEADLINE).await;
        self.workers.stop("workers", WORKER_DEADLINE).await;
        self.store.stop("store", STORE_DEADLINE).await;
    }
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Starts the node's roles, each task in its shutdown stage (see [`Stages`]).
pub async fn start(args: &NodeConfig, stages: &Stages) -> anyhow::Result<()> {
    let node_id = args.node_id();
    let code_path_roots = sluice_core::code::CodePathRoots::new(args.code_path_roots.clone())
        .context("--code-path-root (SLUICE_CODE_PATH_ROOTS)")?;
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("install the Prometheus metrics recorder")?;
    let roles: Vec<String> = args
        .roles
        .iter()
        .map(|r| format!("{r:?}").to_lowercase())
        .collect();
    metrics::gauge!("sluice_node_info", "node" => node_id.clone(), "roles" => roles.join(","))
        .set(1.0);

    let redis_client = redis::Client::open(args.redis.as_str())
        .with_context(|| format!("bad Redis URL {:?}", args.redis))?;
    let redis = tokio::time::timeout(
        Duration::from_secs(10),
        redis::aio::ConnectionManager::new(redis_client),
    )
    .await
    .map_err(|_| anyhow::anyhow!("Redis at {} did not answer within 10 s", args.redis))?
    .with_context(|| format!("connect to Redis at {}", args.redis))?;

    let mut kafka = KafkaSettings::new(&args.kafka);
    kafka.properties.clone_from(&args.kafka_properties);
    let mut store_cfg = ConfigStoreConfig::new(&node_id);
    store_cfg.topic = format!("{}config", args.topic_prefix);
    store_cfg.redis_prefix.clone_from(&args.redis_prefix);
    store_cfg.view_lag = Duration::from_millis(args.fault_config_view_lag_ms);
    let store = ConfigStore::open(
        &kafka,
        store_cfg,
        Some(redis.clone()),
        stages.store.cancel.child_token(),
    )
    .await
    .with_context(|| format!("open the configuration store on Kafka at {}", args.kafka))?;
    info!(node = %node_id, functions = store.functions().len(), "configuration loaded");

    let account = AccountSettings {
        region: args.region.clone(),
        concurrency_limit: args.account_concurrency,
        ..AccountSettings::default()
    };
    let events = EventProducer::new(&kafka).context("create the Kafka producer")?;
    let async_cfg = AsyncPollerConfig {
        retry_delays: args.async_retry_delays.clone(),
        throttle_backoff_min: args.throttle_backoff_min,
        throttle_backoff_max: args.throttle_backoff_max,
        lease_ttl: args.lease_ttl,
        redis_prefix: args.redis_prefix.clone(),
        commit_refresh: Duration::from_secs(args.commit_refresh_secs),
        ..AsyncPollerConfig::new(&args.topic_prefix, &account.function_arn(""))
    };

    let identity = AccountIdentity {
        region: account.region.clone(),
        account_id: account.account_id.clone(),
        concurrency_limit: account.concurrency_limit,
    };
    let registry = WorkerRegistry::new(redis.clone(), args.redis_prefix.clone(), args.worker_ttl);
    let index = IdleIndex::new(
        redis.clone(),
        args.redis_prefix.clone(),
        registry.worker_key_prefix(),
    );
    let pool_config = PoolConfig {
        memory_budget_mb: args.memory_budget_mb,
        idle_timeout: args.sandbox_idle_timeout,
        init_timeout: args.init_timeout,
    };
    // Code written by ZipFile must never expire: create the code topic, or correct one made by
    // an older node (the broker's default retention).
    let code_topic = format!("{}code", args.topic_prefix);
    if let Err(e) = sluice_core::code::ensure_code_topic(&kafka, &code_topic).await {
        tracing::error!(topic = %code_topic, error = %e,
            "the code topic may expire code; set cleanup.policy=compact and retention.ms=-1 on it");
    }
    let init_timeout = pool_config.init_timeout;
    let local = if args.roles.contains(&Role::Worker) {
        Some(
            start_worker(
                args,
                &node_id,
                pool_config,
                (&store, &kafka, &identity),
                (&registry, &index),
                &stages.workers,
            )
            .await?,
        )
    } else {
        None
    };
    let counter = ConcurrencyCounter::new(
        redis.clone(),
        args.redis_prefix.clone(),
        Duration::from_secs(30),
    )
    .context("set up concurrency counting")?;
    let cluster = ClusterInvoker::new(ClusterParts {
        store: store.clone(),
        counter,
        account: identity,
        registry,
        index,
        local,
        init_timeout,
        worker_token: args.worker_token.clone(),
    })
    .context("set up the worker client")?;
    if let Err(e) = cluster.refresh_fleet().await {
        tracing::warn!(error = %e, "could not read the worker registry yet");
    }
    stages
        .workers
        .tasks
        .spawn(cluster.clone().run_fleet_refresh(
            Duration::from_millis(500),
            stages.workers.cancel.child_token(),
        ));
    let invoker: Arc<dyn Invoker> = Arc::new(cluster);

    if args.roles.contains(&Role::Poller) {
        let destinations = DestinationWriter::new(kafka.clone(), events.producer().clone(), 1);
        let poller = AsyncPoller::new(
            async_cfg.clone(),
            kafka.clone(),
            store.clone(),
            Arc::clone(&invoker),
            events.clone(),
            destinations,
            redis.clone(),
            node_id.clone(),
        );
        poller
            .ensure_topics()
            .await
            .context("create the async queue topics")?;
        let streams = StreamTracker::new(
            StreamConfig {
                node_id: node_id.clone(),
                redis_prefix: args.redis_prefix.clone(),
                lease_ttl: args.lease_ttl,
                function_arn_prefix: account.function_arn(""),
            },
            kafka.clone(),
            store.clone(),
            Arc::clone(&invoker),
            DestinationWriter::new(kafka.clone(), events.producer().clone(), 1),
            redis.clone(),
        )
        .with_commit_refresh(Duration::from_secs(args.commit_refresh_secs));
        stages
            .intake
            .tasks
            .spawn(streams.run(stages.intake.cancel.child_token()));
        let cancel = stages.intake.cancel.child_token();
        stages.intake.tasks.spawn(async move {
            if let Err(e) = poller.run(cancel).await {
                tracing::error!(error = %e, "async poller stopped");
            }
        });
    }

    // Every node serves `/metrics` and `/healthz` on --api; the frontend role adds the Lambda API.
    let mut app = ops_router(metrics, store.clone());
    if args.roles.contains(&Role::Frontend) {
        let state = ApiState {
            store: store.clone(),
            account: account.clone(),
            invoker: Some(invoker),
            events: Some(events.clone()),
            async_topic: async_cfg.queue_topic.clone(),
            kafka: Some(kafka.clone()),
            code_topic: format!("{}code", args.topic_prefix),
            topic_prefix: args.topic_prefix.clone(),
            credentials: sluice_ingest::sigv4::Credentials::parse(&args.access_keys)
                .map_err(anyhow::Error::msg)?,
        };
        app = sluice_ingest::router(state)
            .layer(axum::Extension(code_path_roots))
            .merge(app);
    }
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| {
            format!(
                "listen on {} (is another node using it? pass --api)",
                args.api
            )
        })?;
    info!(addr = %args.api, lambda_api = args.roles.contains(&Role::Frontend), "API listening");
    sluice_ingest::serve(
        listener,
        app,
        stages.intake.cancel.clone(),
        &stages.intake.tasks,
    );
    Ok(())
}

/// Starts the worker role (`sluice_fleet::role`) with this node's settings; the code cache's
/// directory is locked for the node's life.
async fn start_worker(
    args: &NodeConfig,
    node_id: &str,
    pool_config: PoolConfig,
    (store, kafka, identity): (&ConfigStore, &KafkaSettings, &AccountIdentity),
    (registry, index): (&WorkerRegistry, &IdleIndex),
    stage: &Stage,
) -> anyhow::Result<WorkerService> {
    let (cancel, tracker) = (&stage.cancel, &stage.tasks);
    let cache_lock = lock_dir(
        &args.code_cache_dir,
        "--code-cache-dir (SLUICE_CODE_CACHE_DIR)",
    )?;
    // Held until the worker stage stops: no other node on this host evicts from this cache.
    let held = cancel.clone();
    tracker.spawn(async move {
        held.cancelled().await;
        drop(cache_lock);
    });
    let cfg = WorkerRoleConfig {
        node_id: node_id.to_owned(),
        backend: worker::backend(args.sandbox, &args.run_dir(node_id))?,
        pool: pool_config,
        code_cache: sluice_core::code::CodeCache::new(
            &args.code_cache_dir,
            args.code_cache_max_mb.saturating_mul(1024 * 1024),
        ),
        listen: args.worker_listen,
        advertise: args.worker_advertise.clone(),
        token: args.worker_token.clone(),
        ttl: args.worker_ttl,
        code_path_roots: sluice_core::code::CodePathRoots::new(args.code_path_roots.clone())
            .context("--code-path-root (SLUICE_CODE_PATH_ROOTS)")?,
        logs: Some((
            format!("{}logs", args.topic_prefix),
            Duration::from_secs(args.log_retention_hours.saturating_mul(3600)),
        )),
    };
    let parts = WorkerRoleParts {
        store,
        kafka,
        identity,
        registry,
        index,
    };
    Ok(start_worker_role(cfg, parts, cancel, tracker).await?)
}

/// Creates `dir` and takes an exclusive lock on `<dir>/.lock` for this process, so that two
/// nodes never share it; `setting` names the flag in the error.
fn lock_dir(
    dir: &std::path::Path,
    setting: &str,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {setting} {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "{setting} {} is in use by another node on this host ({e}); give each node its own",
            dir.display()
        )
    })
}

fn ops_router(metrics: PrometheusHandle, store: ConfigStore) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let store = store.clone();
                async move {
                    metrics::gauge!("sluice_config_functions").set(store.functions().len() as f64);
                    metrics::gauge!("sluice_config_view_offset")
                        .set(*store.changes().borrow() as f64);
                    metrics.render()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}
