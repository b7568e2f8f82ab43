//! A fair share of a node's async slots per function.
//!
//! One pool shared by every function lets a slow function hold all of a node's slots. Here a
//! function may use slots freely while the pool has room, but once the pool is busy (fewer than
//! `reserve` slots free) each function is held to `(capacity - reserve) / active functions`; an
//! event over its share is handed back to the queue (by the caller) instead of waiting, so the
//! reserve is always there for the functions that have nothing running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The per-function counts of one node's async slots.
#[derive(Debug)]
pub(crate) struct FairShare {
    capacity: usize,
    reserve: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    by_function: HashMap<String, usize>,
    total: usize,
}

/// A function's use of one slot; released on drop.
#[derive(Debug)]
pub(crate) struct SharePermit {
    function: String,
    state: Arc<Mutex<State>>,
}

impl FairShare {
    /// Shares of `capacity` slots, `reserve` of them kept for functions with none.
    pub(crate) fn new(capacity: usize, reserve: usize) -> Self {
        Self {
            capacity,
            reserve: reserve.min(capacity.saturating_sub(1)),
            state: Arc::default(),
        }
    }

    /// A slot for `function`, or `None` when it is over its share of a busy pool.
    pub(crate) fn try_acquire(&self, function: &str) -> Option<SharePermit> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = s.by_function.get(function).copied().unwrap_or(0);
        let busy = s.total + self.reserve >= self.capacity;
        if busy {
            let active = s.by_function.len() + usize::from(mine == 0);
            let share = ((self.capacity - self.reserve) / active.max(1)).max(1);
            if mine >= share {
                return None;
            }
        }
        *s.by_function.entry(function.to_owned()).or_insert(0) += 1;
        s.total += 1;
        Some(SharePermit {
            function: function.to_owned(),
            state: Arc::clone(&self.state),
        })
    }
}

impl Drop for SharePermit {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_function.get_mut(&self.function) {
            *n -= 1;
            if *n == 0 {
                s.by_function.remove(&self.function);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_function_alone_uses_all_but_the_reserve() {
        let f = FairShare::new(8, 2);
        let held: Vec<_> = (0..6)
            .map(|_| f.try_acquire("slow").expect("room"))
            .collect();
        assert!(f.try_acquire("slow").is_none(), "the reserve is kept");
        assert!(
            f.try_acquire("fast").is_some(),
            "a newcomer gets a reserved slot"
        );
        drop(held);
        assert!(f.try_acquire("slow").is_some());
    }

    #[test]
    fn a_busy_pool_holds_each_function_to_its_share() {
        let f = FairShare::new(8, 2);
        let slow: Vec<_> = (0..6)
            .map(|_| f.try_acquire("slow").expect("room"))
            .collect();
        let fast = f.try_acquire("fast").expect("reserve");
        assert!(
            f.try_acquire("slow").is_none(),
            "two functions share 6: slow is over 3"
        );
        drop(slow);
        let slow: Vec<_> = (0..5)
            .map(|_| f.try_acquire("slow").expect("room"))
            .collect();
        assert!(
            f.try_acquire("slow").is_none(),
            "busy again: slow is over its share"
        );
        let fast2 = f.try_acquire("fast").expect("fast is under its share");
        drop((slow, fast, fast2));
    }

    #[test]
    fn released_slots_forget_the_function() {
        let f = FairShare::new(2, 1);
        drop(f.try_acquire("a").expect("room"));
        let s = f.state.lock().expect("lock");
        assert_eq!(s.total, 0);
        assert!(s.by_function.is_empty());
    }
}
