//! The fault suite's function and what the node logs say it ran.
//!
//! The function is `bootstrap.pl` beside this file (its header gives the protocol): it prints one
//! `FAULTR` line per record it ran and one `FAULTI` line per successful invocation with its start
//! and end on the host's uptime clock. The node logs each line (target `function`), prefixed by
//! its timestamp; [`read_invocations`] turns the logs of every node into [`Invocation`]s, merged
//! by the function's start times.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ledger::{Invocation, RecordId};

/// The function's source.
const BOOTSTRAP: &str = include_str!("bootstrap.pl");

/// A bundle directory holding the function as `bootstrap`; removed on drop.
pub struct FaultFunction {
    dir: PathBuf,
}

impl FaultFunction {
    /// Writes the bundle.
    ///
    /// # Panics
    /// When the directory cannot be written.
    #[must_use]
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sluice-fault-fn-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the bundle");
        let bootstrap = dir.join("bootstrap");
        std::fs::write(&bootstrap, BOOTSTRAP).expect("write bootstrap");
        // Sandboxes run as an unprivileged host uid.
        for (path, mode) in [(&dir, 0o755), (&bootstrap, 0o755)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .expect("chmod the bundle");
        }
        Self { dir }
    }

    /// The bundle directory (`Code.Path`).
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Default for FaultFunction {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FaultFunction {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One node's log lines that came from the function, as `(timestamp, invocation)`.
fn parse_log(node: usize, text: &str) -> Vec<(String, Invocation)> {
    let mut open: HashMap<String, Invocation> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let stamp = line.split_whitespace().next().unwrap_or_default();
        if let Some(rest) = after(line, "FAULTR ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            let (Some(inv), Some(p), Some(o)) = (w.first(), w.get(1), w.get(2)) else {
                continue;
            };
            let Some(id) = w.get(3..).and_then(|v| RecordId::parse(&v.join(" "))) else {
                continue;
            };
            let entry = open.entry((*inv).to_owned()).or_insert_with(|| {
                order.push((*inv).to_owned());
                Invocation {
                    node,
                    start_cs: 0,
                    end_cs: 0,
                    records: Vec::new(),
                }
            });
            entry.records.push((p.parse().ok(), o.parse().ok(), id));
        } else if let Some(rest) = after(line, "FAULTI ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            let Some(inv) = w.first() else { continue };
            let mut done = open.remove(*inv).unwrap_or(Invocation {
                node,
                start_cs: 0,
                end_cs: 0,
                records: Vec::new(),
            });
            order.retain(|o| o != inv);
            done.start_cs = w.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            done.end_cs = w.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
            out.push((stamp.to_owned(), done));
        }
    }
    // Lines of an invocation whose end line was never logged (the node died between them): the
    // function ran those records and succeeded, so they count, without a time.
    for inv in order {
        if let Some(i) = open.remove(&inv) {
            out.push((String::from("~"), i));
        }
    }
    out
}

/// The text after `marker`, past any escape codes in front of it.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// Every invocation the nodes logged, ordered by start (those without an end line first).
/// `logs` are `(node index, log file)`; a missing file counts as empty.
#[must_use]
pub fn read_invocations(logs: &[(usize, PathBuf)]) -> Vec<Invocation> {
    let mut all: Vec<(String, usize, usize, Invocation)> = Vec::new();
    for (node, path) in logs {
        let text = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        for (i, (stamp, inv)) in parse_log(*node, &text).into_iter().enumerate() {
            all.push((stamp, *node, i, inv));
        }
    }
    // By the function's own start and end (on the host's clock): a node may log a sandbox's
    // lines late, so log times can put a partition's batches out of order. Ties (one tick) fall
    // back to log time.
    all.sort_by(|a, b| {
        (a.3.start_cs, a.3.end_cs, &a.0, a.1, a.2).cmp(&(b.3.start_cs, b.3.end_cs, &b.0, b.1, b.2))
    });
    all.into_iter().map(|(_, _, _, inv)| inv).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_become_invocations_in_start_order() {
        let a = "2026-01-01T00:00:01.000001Z  INFO FAULTR x.1 3 10 k1 0 function=f request_id=r\n\
                 2026-01-01T00:00:01.000002Z  INFO FAULTR x.1 3 11 k1 1 function=f request_id=r\n\
                 2026-01-01T00:00:01.000003Z  INFO FAULTI x.1 100 104 function=f request_id=r\n\
                 2026-01-01T00:00:03.000000Z  INFO FAULTR x.2 a - a7 9 function=f request_id=s\n";
        let b = "2026-01-01T00:00:02.000000Z  INFO FAULTR y.1 3 12 k1 2 function=f\n\
                 2026-01-01T00:00:02.000001Z  WARN something else\n\
                 2026-01-01T00:00:02.000002Z  INFO FAULTI y.1 200 201 function=f\n";
        let dir = std::env::temp_dir().join(format!("fault-log-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a"), a).expect("a");
        std::fs::write(dir.join("b"), b).expect("b");
        let got = read_invocations(&[(0, dir.join("a")), (1, dir.join("b")), (2, dir.join("c"))]);
        let _ = std::fs::remove_dir_all(&dir);
        let seqs: Vec<Vec<u64>> = got
            .iter()
            .map(|i| i.records.iter().map(|r| r.2.seq).collect())
            .collect();
        // The event's end line was never logged: it counts, without a time, first.
        assert_eq!(seqs, vec![vec![9], vec![0, 1], vec![2]]);
        assert_eq!((got[0].records[0].0, got[0].end_cs), (None, 0));
        assert_eq!((got[1].node, got[1].start_cs, got[1].end_cs), (0, 100, 104));
        assert_eq!(
            got[1].records[1],
            (Some(3), Some(11), RecordId::new("k1", 1))
        );
    }
}
