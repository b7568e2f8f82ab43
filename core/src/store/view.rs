//! The in-memory materialisation of the configuration topic, and the rule that decides every
//! record the same way on every node.

use std::collections::BTreeMap;

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
    /// Applies the record at `offset` (records must come in log order).
    pub fn apply(&mut self, key: ObjectKey, record: &ConfigRecord, offset: i64) -> Outcome {
        self.next_offset = offset + 1;
        let current = self.entries.get(&key).map_or(0, |e| e.revision);
        let kind_matches = record.object.as_ref().is_none_or(|o| o.kind() == key.kind);
        if record.base_revision != current || record.revision != current + 1 || !kind_matches {
            self.conflicts += 1;
            return Outcome::Conflict { current };
        }
        self.entries.insert(
            key,
            Entry {
                revision: record.revision,
                modified_ms: record.written_at_ms,
                object: record.object.clone(),
            },
        );
        Outcome::Applied {
            revision: record.revision,
        }
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

    #[test]
    fn second_write_on_the_same_base_is_a_conflict() {
        let mut view = View::default();
        let key = ObjectKey::function("f");
        assert_eq!(
            view.apply(key.clone(), &record(0, Some(function("f", 128))), 0),
            Outcome::Applied { revision: 1 }
        );
        assert_eq!(
            view.apply(key.clone(), &record(1, Some(function("f", 256))), 1),
            Outcome::Applied { revision: 2 }
        );
        // A writer that read revision 1 lost the race: refused, and the winner stays.
        assert_eq!(
            view.apply(key.clone(), &record(1, Some(function("f", 512))), 2),
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
        view.apply(key.clone(), &record(0, Some(function("f", 128))), 0);
        assert_eq!(
            view.apply(key.clone(), &record(1, None), 1),
            Outcome::Applied { revision: 2 }
        );
        assert!(view.get(&key).is_none());
        assert!(view.list(ObjectKind::Function).is_empty());
        assert_eq!(view.revision(&key), 2);
        // A stale create based on "absent" (0) is refused; one based on the deletion applies.
        assert_eq!(
            view.apply(key.clone(), &record(0, Some(function("f", 1))), 2),
            Outcome::Conflict { current: 2 }
        );
        assert_eq!(
            view.apply(key.clone(), &record(2, Some(function("f", 1))), 3),
            Outcome::Applied { revision: 3 }
        );
    }

    #[test]
    fn an_object_under_the_wrong_kind_is_refused() {
        let mut view = View::default();
        let key = ObjectKey::event_invoke_config("f");
        assert!(matches!(
            view.apply(key, &record(0, Some(function("f", 128))), 0),
            Outcome::Conflict { .. }
        ));
    }
}
