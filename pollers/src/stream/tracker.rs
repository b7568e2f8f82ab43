//! The stream tracker: one mapping poller per enabled mapping, restarted when its configuration
//! changes and stopped when it is disabled or deleted; it also settles Lambda's mapping states.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sluice_core::invoke::Invoker;
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::{EventSourceMappingConfig, EventSourceMappingState, MappingState};
use sluice_core::store::{ConfigObject, ConfigStore, Expected, ObjectKey};
use sluice_destinations::DestinationWriter;
use tokio_util::sync::CancellationToken;

use super::poller::MappingPoller;
use super::StreamConfig;

/// Runs the mappings of the fleet's share on this node.
#[derive(Clone)]
pub struct StreamTracker {
    pub(super) cfg: Arc<StreamConfig>,
    pub(super) kafka: KafkaSettings,
    store: ConfigStore,
    pub(super) invoker: Arc<dyn Invoker>,
    pub(super) destinations: DestinationWriter,
    pub(super) redis: ConnectionManager,
    /// How often a partition's unchanged commit is sent again.
    pub(super) commit_refresh: Duration,
}

struct Running {
    config: EventSourceMappingConfig,
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl StreamTracker {
    /// A tracker; nothing runs until [`StreamTracker::run`].
    #[must_use]
    pub fn new(
        cfg: StreamConfig,
        kafka: KafkaSettings,
        store: ConfigStore,
        invoker: Arc<dyn Invoker>,
        destinations: DestinationWriter,
        redis: ConnectionManager,
    ) -> Self {
        Self {
            cfg: Arc::new(cfg),
            kafka,
            store,
            invoker,
            destinations,
            redis,
            commit_refresh: crate::runtime::COMMIT_REFRESH,
        }
    }

    /// The same tracker with its mappings' unchanged commits sent again every `every` (default
    /// 1 h), so that Kafka never expires the offsets of a quiet partition.
    #[must_use]
    pub fn with_commit_refresh(mut self, every: Duration) -> Self {
        self.commit_refresh = every;
        self
    }

    /// Keeps this node's mapping pollers in line with the configuration until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut changes = self.store.changes();
        loop {
            let mappings = self.store.event_source_mappings();
            let wanted: HashMap<String, EventSourceMappingState> = mappings
                .iter()
                .filter(|m| m.object.config.enabled)
                .map(|m| (m.object.uuid.clone(), m.object.clone()))
                .collect();
            let stale: Vec<String> = running
                .iter()
                .filter(|(uuid, r)| wanted.get(*uuid).is_none_or(|m| m.config != r.config))
                .map(|(u, _)| u.clone())
                .collect();
            for uuid in stale {
                if let Some(r) = running.remove(&uuid) {
                    r.cancel.cancel();
                    let _ = r.handle.await;
                    tracing::info!(mapping = %uuid, "mapping poller stopped");
                }
            }
            for (uuid, m) in &wanted {
                if running.contains_key(uuid) {
                    continue;
                }
                let token = cancel.child_token();
                let poller = MappingPoller::new(self.clone(), m.clone());
                let t2 = token.clone();
                let handle = tokio::spawn(async move {
                    if let Err(e) = poller.run(t2).await {
                        tracing::error!(error = %e, "mapping poller failed");
                    }
                });
                tracing::info!(mapping = %uuid, topic = ?m.config.topics, function = %m.config.function_name, "mapping poller started");
                running.insert(
                    uuid.clone(),
                    Running {
                        config: m.config.clone(),
                        cancel: token,
                        handle,
                    },
                );
            }
            self.settle_states(&mappings).await;
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = changes.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        for (_, r) in running {
            r.cancel.cancel();
            let _ = r.handle.await;
        }
    }

    /// Moves transitional states on; a conflict means another node did it first.
    async fn settle_states(
        &self,
        mappings: &[sluice_core::store::Versioned<EventSourceMappingState>],
    ) {
        for m in mappings {
            let next = match m.object.state {
                MappingState::Creating | MappingState::Enabling | MappingState::Updating => {
                    MappingState::Enabled
                }
                MappingState::Disabling => MappingState::Disabled,
                _ => continue,
            };
            let mut obj = m.object.clone();
            obj.state = next;
            let key = ObjectKey::event_source_mapping(&obj.uuid);
            let _ = self
                .store
                .write(
                    &key,
                    Some(ConfigObject::EventSourceMapping(Box::new(obj))),
                    Expected::Revision(m.revision),
                )
                .await;
        }
    }
}
