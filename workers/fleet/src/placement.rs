//! The placement service: which worker boots a new sandbox.
//!
//! Power of two choices over the workers that have room: two random candidates, the less loaded
//! one first (free memory without evicting anything, then fewer busy sandboxes, then more free
//! memory), then the rest of the workers with room, best first, as fallbacks when a worker turns
//! the request down (the registry is a few hundred milliseconds old; each worker's pool enforces
//! its budget exactly and refuses what does not fit). A worker without room is never chosen; when
//! no worker has room the caller throttles.

use std::cmp::Reverse;

use rand::seq::index::sample;
use rand::Rng;

use crate::registry::WorkerInfo;

/// The order in which to try workers for a new sandbox of `need_mb`, skipping the ids in
/// `exclude`; empty when no worker has room.
#[must_use]
pub fn candidates<'a>(
    workers: &'a [WorkerInfo],
    need_mb: u64,
    exclude: &[String],
    rng: &mut impl Rng,
) -> Vec<&'a WorkerInfo> {
    let mut fit: Vec<&WorkerInfo> = workers
        .iter()
        .filter(|w| w.room_mb() >= need_mb && !exclude.contains(&w.id))
        .collect();
    let score = |w: &WorkerInfo| {
        (
            Reverse(w.free_mb() >= need_mb),
            w.busy,
            Reverse(w.free_mb()),
        )
    };
    if fit.len() <= 2 {
        fit.sort_by_key(|w| score(w));
        return fit;
    }
    let picked = sample(rng, fit.len(), 2);
    let (a, b) = (fit[picked.index(0)], fit[picked.index(1)]);
    let (first, second) = if score(b) < score(a) { (b, a) } else { (a, b) };
    fit.retain(|w| w.id != first.id && w.id != second.id);
    fit.sort_by_key(|w| score(w));
    let mut out = vec![first, second];
    out.extend(fit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn worker(id: &str, budget: u64, used: u64, reclaimable: u64, busy: u64) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            addr: format!("{id}:1"),
            backend: "jail".into(),
            budget_mb: budget,
            used_mb: used,
            reclaimable_mb: reclaimable,
            busy,
            idle: 0,
            provisioned: Default::default(),
            heartbeat_ms: 0,
        }
    }

    #[test]
    fn a_worker_without_room_is_never_chosen() {
        let ws = vec![worker("full", 512, 512, 0, 4), worker("ok", 512, 256, 0, 2)];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let c = candidates(&ws, 128, &[], &mut rng);
            assert_eq!(c.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["ok"]);
        }
        assert!(candidates(&ws, 512, &[], &mut rng).is_empty());
    }

    #[test]
    fn idle_sandboxes_count_as_room_but_free_memory_comes_first() {
        let ws = vec![
            worker("evicts", 512, 512, 256, 0),
            worker("free", 512, 300, 0, 3),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let c = candidates(&ws, 128, &[], &mut rng);
        assert_eq!(
            c.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
            ["free", "evicts"]
        );
    }

    #[test]
    fn the_less_loaded_of_two_random_candidates_goes_first() {
        let ws: Vec<WorkerInfo> = (0..8)
            .map(|i| worker(&format!("w{i}"), 4096, 128 * i, 0, i))
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let c = candidates(&ws, 128, &[], &mut rng);
            assert_eq!(c.len(), 8, "every worker with room is a fallback");
            assert!(c[0].busy <= c[1].busy);
            firsts.insert(c[0].id.clone());
        }
        assert!(firsts.len() > 1, "random choices spread the load");
        assert!(!firsts.contains("w7"), "the busiest never wins a pair");
    }

    #[test]
    fn excluded_workers_are_skipped() {
        let ws = vec![worker("a", 512, 0, 0, 0), worker("b", 512, 0, 0, 0)];
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let c = candidates(&ws, 128, &["a".to_owned()], &mut rng);
        assert_eq!(c.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["b"]);
    }
}
