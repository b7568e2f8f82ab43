//! The in-memory materialisation of the configuration topic, and the rule that decides every
//! record the same way on every node.
//!
//! # The rule, and why it holds on a compacted log
//! A record is accepted when it is based on the object's current revision **or a later one**
//! (`base_revision >= current`), and refused when it is based on an earlier one. On the full log
//! a later base never occurs (writers base their records on a caught-up view), so this is the
//! plain optimistic rule. On a compacted log it is what keeps the verdicts: every write has its
//! own record key, and a record is only ever removed by a tombstone written after it was
//! superseded (a successor was accepted) or refused, so what the cleaner leaves is a
//! subsequence of the log that still holds every object's last accepted record. A successor
//! whose predecessor was cleaned away is based on a revision above the fresh view's, and is
//! accepted; a refused record that was not cleaned yet is either refused again (its base is
//! below the winner that precedes it) or, where it precedes the next winner, applied and then
//! replaced by that winner. Either way each object ends at the same revision and content as on
//! every node that read the full log.

use std::collections::{BTreeMap, BTreeSet};

use super::record::{ConfigObject, ConfigRecord, ObjectKey, ObjectKind};

/// An object with the revision that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// Revision number, 1 for the first write of the object; increases by one per write.
    pub revision: u64,
    /// When that revision was written, Unix milliseconds.
    pub modified_ms: i64,
    /// The object.
    pub object: T,
}

impl<T> Versioned<T> {
    /// Converts the object, keeping revision and time; `None` when `f` declines it.
    pub fn try_map<U>(self, f: impl FnOnce(T) -> Option<U>) -> Option<Versioned<U>> {
        Some(Versioned {
            revision: self.revision,
            modified_ms: self.modified_ms,
            object: f(self.object)?,
        })
    }
}

/// What the view made of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the object is now at this revision.
    Applied {
        /// The new revision.
        revision: u64,
    },
    /// Refused: it was based on a revision that is no longer current.
    Conflict {
        /// The revision the object had when the record arrived.
        current: u64,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    revision: u64,
    modified_ms: i64,
    /// `None` once deleted; the revision is kept so that a re-creation continues the count.
    object: Option<ConfigObject>,
    /// The record key of the accepted record (never tombstoned while it is the current one).
    record_key: String,
    /// Record keys of this object's superseded and refused records that no tombstone has
    /// removed yet: the next writer tombstones them so that compaction can drop them.
    stale: BTreeSet<String>,
}

/// The materialised configuration: every object's latest accepted revision.
#[derive(Debug, Default)]
pub struct View {
    entries: BTreeMap<ObjectKey, Entry>,
    /// The offset of the next record to read.
    next_offset: i64,
    conflicts: u64,
}

impl View {
    /// Applies the record at `offset`, stored under `record_key` (records must come in log order).
    pub fn apply(
        &mut self,
        record_key: &str,
        key: ObjectKey,
        record: &ConfigRecord,
        offset: i64,
    ) -> Outcome {
        self.next_offset = offset + 1;
        let current = self.entries.get(&key).map_or(0, |e| e.revision);
        let kind_matches = record.object.as_ref().is_none_or(|o| o.kind() == key.kind);
        if record.base_revision < current
            || record.revision != record.base_revision + 1
            || !kind_matches
        {
            self.conflicts += 1;
            if let Some(entry) = self.entries.get_mut(&key) {
                if entry.record_key != record_key {
                    entry.stale.insert(record_key.to_owned());
                }
            }
            return Outcome::Conflict { current };
        }
        let entry = self.entries.entry(key).or_insert_with(|| Entry {
            revision: 0,
            modified_ms: 0,
            object: None,
            record_key: String::new(),
            stale: BTreeSet::new(),
        });
        let previous = std::mem::replace(&mut entry.record_key, record_key.to_owned());
        if !previous.is_empty() && previous != record_key {
            entry.stale.insert(previous);
        }
        entry.stale.remove(record_key);
        entry.revision = record.revision;
        entry.modified_ms = record.written_at_ms;
        entry.object.clone_from(&record.object);
        Outcome::Applied {
            revision: record.revision,
        }
    }

    /// Notes the tombstone at `offset` for `record_key` (of object `key`): the record it names
    /// is gone from the log once the cleaner runs.
    pub fn tombstone(&mut self, record_key: &str, key: &ObjectKey, offset: i64) {
        self.next_offset = offset + 1;
        if let Some(entry) = self.entries.get_mut(key) {
            entry.stale.remove(record_key);
        }
    }

    /// The record keys of `key`'s superseded and refused records still in the log (never the
    /// current one): what a writer tombstones after its own write was decided.
    #[must_use]
    pub fn stale(&self, key: &ObjectKey) -> Vec<String> {
        self.entries
            .get(key)
            .map(|e| e.stale.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Notes that the record at `offset` could not be decoded (it is skipped on every node alike).
    pub fn skip(&mut self, offset: i64) {
        self.next_offset = offset + 1;
    }

    /// The offset of the next record the view will read.
    #[must_use]
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Records refused as conflicts since the view started.
    #[must_use]
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// The current revision of `key`: 0 when it never existed; a deleted object keeps its last
    /// revision.
    #[must_use]
    pub fn revision(&self, key: &ObjectKey) -> u64 {
        self.entries.get(key).map_or(0, |e| e.revision)
    }

    /// The live object at `key`.
    #[must_use]
    pub fn get(&self, key: &ObjectKey) -> Option<Versioned<ConfigObject>> {
        let e = self.entries.get(key)?;
        Some(Versioned {
            revision: e.revision,
            modified_ms: e.modified_ms,
            object: e.object.clone()?,
        })
    }

    /// Every live object of one kind, ordered by name.
    #[must_use]
    pub fn list(&self, kind: ObjectKind) -> Vec<(String, Versioned<ConfigObject>)> {
        self.entries
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .filter_map(|(k, e)| {
                let object = e.object.clone()?;
                Some((
                    k.name.clone(),
                    Versioned {
                        revision: e.revision,
                        modified_ms: e.modified_ms,
                        object,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FunctionConfig;

    fn function(name: &str, memory: i64) -> ConfigObject {
        ConfigObject::Function(FunctionConfig {
            memory_size: memory,
            ..FunctionConfig::from_path(name, "/x")
        })
    }

    fn record(base: u64, object: Option<ConfigObject>) -> ConfigRecord {
        ConfigRecord {
            revision: base + 1,
            base_revision: base,
            write_id: uuid::Uuid::new_v4(),
            writer: "test".into(),
            written_at_ms: 0,
            object,
        }
    }

    /// Applies `r` under its own per-write key, as the store writes it.
    fn put(view: &mut View, key: &ObjectKey, r: &ConfigRecord, offset: i64) -> Outcome {
        view.apply(&key.record_key(r.write_id), key.clone(), r, offset)
    }

    #[test]
    fn second_write_on_the_same_base_is_a_conflict() {
        let mut view = View::default();
        let key = ObjectKey::function("f");
        assert_eq!(
            put(&mut view, &key, &record(0, Some(function("f", 128))), 0),
            Outcome::Applied { revision: 1 }
        );
        assert_eq!(
            put(&mut view, &key, &record(1, Some(function("f", 256))), 1),
            Outcome::Applied { revision: 2 }
        );
        // A writer that read revision 1 lost the race: refused, and the winner stays.
        assert_eq!(
            put(&mut view, &key, &record(1, Some(function("f", 512))), 2),
            Outcome::Conflict { current: 2 }
        );
        let got = view.get(&key).expect("present");
        assert_eq!(got.revision, 2);
        assert_eq!(got.object, function("f", 256));
        assert_eq!(view.conflicts(), 1);
        assert_eq!(view.next_offset(), 3);
    }

    #[test]
    fn delete_keeps_the_revision_count() {
        let mut view = View::default();
        let key = ObjectKey::function("f");
        put(&mut view, &key, &record(0, Some(function("f", 128))), 0);
        assert_eq!(
            put(&mut view, &key, &record(1, None), 1),
            Outcome::Applied { revision: 2 }
        );
        assert!(view.get(&key).is_none());
        assert!(view.list(ObjectKind::Function).is_empty());
        assert_eq!(view.revision(&key), 2);
        // A stale create based on "absent" (0) is refused; one based on the deletion applies.
        assert_eq!(
            put(&mut view, &key, &record(0, Some(function("f", 1))), 2),
            Outcome::Conflict { current: 2 }
        );
        assert_eq!(
            put(&mut view, &key, &record(2, Some(function("f", 1))), 3),
            Outcome::Applied { revision: 3 }
        );
    }

    #[test]
    fn an_object_under_the_wrong_kind_is_refused() {
        let mut view = View::default();
        let key = ObjectKey::event_invoke_config("f");
        assert!(matches!(
            put(&mut view, &key, &record(0, Some(function("f", 128))), 0),
            Outcome::Conflict { .. }
        ));
    }

    #[test]
    fn superseded_and_refused_records_are_stale_until_tombstoned() {
        let mut view = View::default();
        let key = ObjectKey::function("f");
        let (w1, w2, loser) = (
            record(0, Some(function("f", 1))),
            record(1, Some(function("f", 2))),
            record(1, Some(function("f", 3))),
        );
        put(&mut view, &key, &w1, 0);
        assert!(
            view.stale(&key).is_empty(),
            "the current record is never stale"
        );
        put(&mut view, &key, &w2, 1);
        put(&mut view, &key, &loser, 2);
        let mut want = vec![key.record_key(w1.write_id), key.record_key(loser.write_id)];
        want.sort();
        assert_eq!(view.stale(&key), want);
        view.tombstone(&key.record_key(w1.write_id), &key, 3);
        assert_eq!(view.stale(&key), [key.record_key(loser.write_id)]);
        assert_eq!(view.next_offset(), 4);
        // Legacy per-object keys: a successor under the same key never marks it stale.
        let legacy = ObjectKey::function("old");
        view.apply(
            "function/old",
            legacy.clone(),
            &record(0, Some(function("old", 1))),
            4,
        );
        view.apply(
            "function/old",
            legacy.clone(),
            &record(1, Some(function("old", 2))),
            5,
        );
        assert!(view.stale(&legacy).is_empty());
    }

    #[test]
    fn a_successor_whose_predecessor_was_compacted_away_applies() {
        let mut view = View::default();
        let key = ObjectKey::function("f");
        assert_eq!(
            put(&mut view, &key, &record(4, Some(function("f", 9))), 0),
            Outcome::Applied { revision: 5 }
        );
        assert_eq!(view.revision(&key), 5);
    }

    /// A tiny deterministic generator, so the model test needs no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    type Log = Vec<(String, Option<ConfigRecord>)>;

    /// Writers racing on three objects: each bases its record on a revision it saw (sometimes
    /// stale, so it loses), sometimes deletes, sometimes crashes before tombstoning; every writer
    /// that lives tombstones the object's stale records after its record was decided, as
    /// `ConfigStore::write` does.
    fn random_log(seed: u64) -> (Log, View) {
        let mut rng = Lcg(seed);
        let keys = [
            ObjectKey::function("a"),
            ObjectKey::function("b"),
            ObjectKey::event_source_mapping("m"),
        ];
        let mut view = View::default();
        let mut log: Log = Vec::new();
        for step in 0..60 {
            let key = &keys[usize::try_from(rng.below(3)).expect("small")];
            let current = view.revision(key);
            let base = if current > 0 && rng.below(4) == 0 {
                current - 1 - rng.below(current)
            } else {
                current
            };
            let object = if rng.below(6) == 0 {
                None
            } else {
                let memory = i64::from(step);
                Some(match key.kind {
                    ObjectKind::Function => function(&key.name, memory),
                    _ => ConfigObject::EventInvokeConfig(
                        serde_json::from_value(serde_json::json!({
                            "MaximumRetryAttempts": memory % 3
                        }))
                        .expect("eic"),
                    ),
                })
            };
            let object = match (&object, key.kind) {
                (Some(_), ObjectKind::EventSourceMapping) => None,
                _ => object,
            };
            let r = record(base, object);
            let rk = key.record_key(r.write_id);
            let offset = i64::try_from(log.len()).expect("small");
            put(&mut view, key, &r, offset);
            log.push((rk, Some(r)));
            if rng.below(5) != 0 {
                for stale in view.stale(key) {
                    let offset = i64::try_from(log.len()).expect("small");
                    view.tombstone(&stale, key, offset);
                    log.push((stale, None));
                }
            }
        }
        (log, view)
    }

    /// What Kafka's cleaner leaves: the last record of each key, in log order, minus keys whose
    /// last record is a tombstone.
    fn compact(log: &Log) -> Log {
        let mut last = std::collections::HashMap::new();
        for (i, (k, _)) in log.iter().enumerate() {
            last.insert(k.clone(), i);
        }
        log.iter()
            .enumerate()
            .filter(|(i, (k, r))| last[k] == *i && r.is_some())
            .map(|(_, e)| e.clone())
            .collect()
    }

    fn replay(log: &Log) -> View {
        let mut view = View::default();
        for (i, (rk, r)) in log.iter().enumerate() {
            let (key, _) = ObjectKey::from_record_key(rk).expect("key");
            let offset = i64::try_from(i).expect("small");
            match r {
                Some(r) => {
                    view.apply(rk, key, r, offset);
                }
                None => view.tombstone(rk, &key, offset),
            }
        }
        view
    }

    #[test]
    fn a_view_of_the_compacted_log_equals_the_view_of_the_full_log() {
        for seed in 0..300 {
            let (log, live) = random_log(seed);
            let compacted = compact(&log);
            let fresh = replay(&compacted);
            for key in [
                ObjectKey::function("a"),
                ObjectKey::function("b"),
                ObjectKey::event_source_mapping("m"),
            ] {
                assert_eq!(
                    fresh.get(&key),
                    live.get(&key),
                    "seed {seed}: {key} differs ({} of {} records kept)",
                    compacted.len(),
                    log.len()
                );
                if live.get(&key).is_some() {
                    assert_eq!(
                        fresh.revision(&key),
                        live.revision(&key),
                        "seed {seed}: {key}"
                    );
                }
            }
            // The same verdicts for records written after the fresh node joined.
            assert_eq!(
                replay(&log).revision(&ObjectKey::function("a")),
                live.revision(&ObjectKey::function("a"))
            );
        }
    }
}
