//! The fault suite's harness (issue 13): Sluice under crashes, pauses, restarts and poison,
//! measured with a ledger and a checker, after Kafka's at-least-once contract and Jepsen's queue
//! checker.
//!
//! - [`cluster`]: one case's world — a private redis-server, the broker (the shared test broker,
//!   or a private tansu the case may SIGKILL and restart on its sqlite data), real `sluice node`
//!   processes ([`node::FaultNode`]: SIGKILL, SIGSTOP/SIGCONT, SIGTERM, restart) and the fault
//!   function ([`function`]), which reports every record it runs in the node's log.
//! - [`ledger`]: per `(key, seq)`, acknowledged at ingest, invoked, written to a destination,
//!   and the committed offsets sampled during the run ([`offsets::CommitSampler`]).
//! - [`checker`]: lost, duplicates against the case's bound, per-key inversions, stalled
//!   partitions, commits that moved backwards, peak concurrency; one table row per run.
//!
//! The cases are `tests/tests/faults.rs`. Sizes scale with `SLUICE_FAULT_SCALE` (records and
//! events, default 1) and `SLUICE_FAULT_CYCLES` (fault repetitions), which `scripts/soak.sh`
//! raises.

pub mod checker;
pub mod cluster;
pub mod function;
pub mod ledger;
pub mod node;
pub mod offsets;

use ledger::RecordId;

/// `n` scaled by `SLUICE_FAULT_SCALE` (a positive number, default 1); at least 1 unless `n` is 0.
#[must_use]
pub fn scaled(n: usize) -> usize {
    let scale = std::env::var("SLUICE_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let scaled = ((n as f64) * scale).round() as usize;
    if n == 0 {
        0
    } else {
        scaled.max(1)
    }
}

/// How many times a case repeats its fault: `SLUICE_FAULT_CYCLES`, else `default`.
#[must_use]
pub fn cycles(default: usize) -> usize {
    std::env::var("SLUICE_FAULT_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|c| *c > 0)
        .unwrap_or(default)
}

/// `records` ids over `keys` keys (`k00`…), round robin, so each key's records have
/// consecutive sequence numbers in produce order.
#[must_use]
pub fn stream_ids(records: usize, keys: usize) -> Vec<RecordId> {
    (0..records)
        .map(|i| RecordId::new(&format!("k{:02}", i % keys), (i / keys) as u64))
        .collect()
}

/// `n` ids for Event invokes, under the key `ev`.
#[must_use]
pub fn event_ids(n: usize) -> Vec<RecordId> {
    (0..n).map(|i| RecordId::new("ev", i as u64)).collect()
}

/// The host's uptime in 1/100 s, the clock the fault function reports invocations on.
///
/// # Panics
/// When `/proc/uptime` cannot be read.
#[must_use]
pub fn uptime_cs() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").expect("read /proc/uptime");
    let first = text.split_whitespace().next().unwrap_or_default();
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    secs.parse::<u64>().unwrap_or(0) * 100 + frac.parse::<u64>().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_number_each_key_in_order() {
        let ids = stream_ids(5, 2);
        let got: Vec<(String, u64)> = ids.into_iter().map(|i| (i.key, i.seq)).collect();
        let want = [("k00", 0), ("k01", 0), ("k00", 1), ("k01", 1), ("k00", 2)];
        assert_eq!(
            got,
            want.iter()
                .map(|(k, s)| ((*k).to_owned(), *s))
                .collect::<Vec<_>>()
        );
    }
}
