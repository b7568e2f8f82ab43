//! The fault suite (issue 13): real nodes, tansu and redis-server as processes on loopback, real
//! faults, a ledger of every record and Event invoke, and the checker's figures per case.
//!
//! Each case prints one table row (`Report::row`) and fails on any broken guarantee. Sizes are
//! for 2 cores; `SLUICE_FAULT_SCALE` and `SLUICE_FAULT_CYCLES` make them bigger
//! (`scripts/soak.sh`). The cases run one at a time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::fault::checker::{check, Bounds, Report};
use sluice_tests::fault::cluster::Cluster;
use sluice_tests::fault::ledger::Ledger;
use sluice_tests::fault::offsets::{end_offsets, CommitSampler};
use sluice_tests::fault::{cycles, event_ids, scaled, stream_ids, uptime_cs};
use sluice_tests::kafka::unique_name;
use sluice_tests::node::FAST_RETRIES;

/// One case at a time: each runs several nodes and sandboxes on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Partitions of every case's mapped topic.
const PARTITIONS: i32 = 8;
/// Keys the records are spread over.
const KEYS: usize = 64;
/// The mappings' BatchSize.
const BATCH: usize = 10;
/// How often committed offsets are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How often the pollers commit (the runtime's interval): records finished since the last
/// commit are redelivered after a crash.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// A mapped topic of a case, with its sampler.
struct Stream {
    topic: String,
    group: String,
    failed: String,
    sampler: CommitSampler,
}

impl Stream {
    /// Creates the topic and the mapping (`extra` on top of the suite's settings) and starts
    /// sampling the group's commits.
    async fn map(cluster: &Cluster, extra: Value) -> Self {
        let topic = unique_name("fault-in");
        let mut settings = json!({
            "BatchSize": BATCH, "MaximumBatchingWindowInSeconds": 0,
            "MaximumRetryAttempts": 2, "BisectBatchOnFunctionError": true,
        });
        if let (Some(s), Some(x)) = (settings.as_object_mut(), extra.as_object()) {
            s.extend(x.clone());
        }
        let (group, failed) = cluster.create_mapping(&topic, PARTITIONS, settings).await;
        // Start from a balanced fleet: the hand-overs of nodes joining are T07's subject.
        let queue = cluster.async_topic();
        let parts = PARTITIONS as usize;
        let settled = cluster
            .settle(&[(&topic, parts), (&queue, parts)], Duration::from_secs(60))
            .await;
        assert!(settled, "the nodes never shared the partitions evenly");
        let sampler =
            CommitSampler::start(&cluster.kafka, &group, &topic, PARTITIONS, SAMPLE_EVERY);
        Self {
            topic,
            group,
            failed,
            sampler,
        }
    }

    async fn ends(&self, cluster: &Cluster) -> BTreeMap<i32, i64> {
        end_offsets(&cluster.kafka, &self.topic, PARTITIONS).await
    }
}

/// What a case measured besides the checker's figures.
struct Run {
    ledger: Ledger,
    ends: BTreeMap<i32, i64>,
    drained_in: Option<Duration>,
    events_done: bool,
}

/// Waits for the stream to drain and the events to reach their destinations, then reads the
/// logs, destinations and commit samples into the ledger.
async fn finish(
    cluster: &Cluster,
    stream: Stream,
    events: Option<&(String, String)>,
    mut ledger: Ledger,
    timeout: Duration,
) -> Run {
    let ends = stream.ends(cluster).await;
    let drained_in = cluster
        .wait_drained(&stream.group, &stream.topic, &ends, timeout)
        .await;
    let events_done = match events {
        Some(t) => cluster.wait_events(&ledger, t, timeout).await,
        None => true,
    };
    // A last sample after the drain.
    tokio::time::sleep(SAMPLE_EVERY * 2).await;
    ledger.commits(stream.sampler.finish());
    cluster
        .collect(&mut ledger, events, &[&stream.failed])
        .await;
    Run {
        ledger,
        ends,
        drained_in,
        events_done,
    }
}

impl Run {
    fn report(&self, case: &str, duplicates: u64, stall: Duration) -> Report {
        let r = check(
            case,
            &self.ledger,
            &Bounds {
                duplicates,
                stall,
                end_offsets: self.ends.clone(),
                partition_concurrency: 1,
            },
        );
        eprintln!(
            "{case}: drained {:?} after the last produce or fault; events all in destinations: {}",
            self.drained_in, self.events_done
        );
        r
    }
}

/// Starts `nodes` nodes with the fast flags plus `extra`, and the function.
async fn cluster(nodes: usize, sleep_ms: u64, extra: &[&str]) -> Cluster {
    let flags = [FAST_RETRIES, extra].concat();
    let c = Cluster::start(nodes, &flags);
    c.create_function(sleep_ms).await;
    c
}

/// Ingest under way: the Event invokes' ledger and the task producing the stream's records.
struct Ingest {
    ledger: Ledger,
    events_refused: usize,
    producing: tokio::task::JoinHandle<(Ledger, usize)>,
}

/// Invokes `events` Events, then starts producing `records` records in the background, so that
/// the case's faults land while records come in and are processed.
async fn ingest(c: &Cluster, stream: &Stream, records: usize, events: usize) -> Ingest {
    let mut ledger = Ledger::new();
    let events_refused = c.events(event_ids(events), &mut ledger).await;
    let producing = c.produce_in_background(&stream.topic, stream_ids(records, KEYS), |_| false);
    Ingest {
        ledger,
        events_refused,
        producing,
    }
}

impl Ingest {
    /// Waits for the producer; the whole ledger and how many Events and records got no
    /// acknowledgement.
    async fn done(self) -> (Ledger, usize, usize) {
        let (produced, refused) = self.producing.await.expect("the producing task");
        let mut ledger = self.ledger;
        ledger.merge(produced);
        (ledger, self.events_refused, refused)
    }

    /// [`Ingest::done`], asserting that everything was acknowledged.
    async fn all_acked(self) -> Ledger {
        let (ledger, events, records) = self.done().await;
        assert_eq!(
            (events, records),
            (0, 0),
            "every Event gets 202, every record an ack"
        );
        ledger
    }
}

/// The duplicates `faults` crashes may cause: each of the partitions may redeliver its batch in
/// flight and what it finished since its last commit (one batch per `sleep_ms` invocation).
fn redelivery_bound(faults: usize, sleep_ms: u64) -> u64 {
    let uncommitted = (COMMIT_INTERVAL.as_millis() as u64).div_ceil(sleep_ms.max(1));
    faults as u64 * PARTITIONS as u64 * BATCH as u64 * (1 + uncommitted)
}

/// A case under way on 2 nodes: the cluster, the Event destinations (MaximumRetryAttempts 2),
/// the mapped stream and the ingest, started in that order.
struct Case {
    c: Cluster,
    topics: (String, String),
    stream: Stream,
    ingest: Ingest,
    started: Instant,
}

impl Case {
    /// Starts the case; its function takes `sleep_ms` per invocation; `records` and `events`
    /// are scaled.
    async fn start(sleep_ms: u64, records: usize, events: usize) -> Self {
        let started = Instant::now();
        let c = cluster(2, sleep_ms, &[]).await;
        let topics = c.event_destinations(2).await;
        let stream = Stream::map(&c, json!({})).await;
        let ingest = ingest(&c, &stream, scaled(records), scaled(events)).await;
        Self {
            c,
            topics,
            stream,
            ingest,
            started,
        }
    }

    /// Waits until everything was acknowledged and the run drained (or `timeout`).
    async fn finish(self, timeout: Duration) -> (Cluster, Run, Instant) {
        let ledger = self.ingest.all_acked().await;
        let run = finish(&self.c, self.stream, Some(&self.topics), ledger, timeout).await;
        (self.c, run, self.started)
    }
}

impl Run {
    /// Prints how the case went, then fails on a broken guarantee or a run that did not drain.
    fn conclude(&self, r: &Report, started: Instant, what: &str) {
        eprintln!("{} ran {:?}{what}", r.case, started.elapsed());
        r.assert_holds();
        assert!(
            self.drained_in.is_some() && self.events_done,
            "the run drained"
        );
    }
}

/// How long each invocation takes in the fault cases, so that faults find batches in flight.
const SLEEP_MS: u64 = 100;

/// T01, no fault: records over 8 partitions on 2 nodes plus Event invokes. 0 lost, 0 duplicates,
/// 0 inversions; every partition drained within 10 s of the last produce without a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t01_no_fault() {
    let _serial = SERIAL.lock().await;
    let (_c, run, started) = Case::start(0, 4000, 1000)
        .await
        .finish(Duration::from_secs(120))
        .await;
    let r = run.report("T01", 0, Duration::from_secs(10));
    run.conclude(&r, started, "");
    assert!(
        run.drained_in.is_some_and(|d| d <= Duration::from_secs(10)),
        "drained within 10 s of the last produce"
    );
}

/// T02: a poller node SIGKILLed mid-batch and restarted, several times. 0 lost; duplicates
/// within [`redelivery_bound`].
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t02_sigkill_a_poller_mid_batch() {
    let _serial = SERIAL.lock().await;
    let mut case = Case::start(SLEEP_MS, 4000, 300).await;
    let kills = cycles(3);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_secs(2)).await;
        case.c.nodes[1].kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        case.c.nodes[1].start_again();
    }
    let (_c, run, started) = case.finish(Duration::from_secs(180)).await;
    // A kill hands the node's partitions over after the lease TTL (3 s) and back after restart.
    let bound = redelivery_bound(kills, SLEEP_MS);
    let r = run.report("T02", bound, Duration::from_secs(20));
    run.conclude(&r, started, &format!(" with {kills} kills"));
}

/// T07: SIGTERM each node in turn (rolling restarts). 0 lost, 0 duplicates: a clean stop
/// commits what it finished and releases its leases; each node exits within its 14 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t07_rolling_sigterm() {
    let _serial = SERIAL.lock().await;
    let mut case = Case::start(SLEEP_MS, 4000, 300).await;
    let mut exits = Vec::new();
    for step in 0..cycles(2) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let node = &mut case.c.nodes[step % 2];
        exits.push(node.terminate(Duration::from_secs(20)));
        node.start_again();
    }
    let (_c, run, started) = case.finish(Duration::from_secs(180)).await;
    let r = run.report("T07", 0, Duration::from_secs(20));
    run.conclude(&r, started, &format!("; exits after SIGTERM: {exits:?}"));
    assert!(
        exits
            .iter()
            .all(|e| e.is_some_and(|d| d <= Duration::from_secs(14))),
        "every node exits within its 14 s deadline: {exits:?}"
    )
}

/// T03: a node frozen (SIGSTOP) for three lease TTLs under load, then resumed. Its partitions
/// move to the other node; once resumed, nothing runs a record below what the new owners had
/// committed by then (a stale batch of the frozen poller), and no committed offset ever
/// decreases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t03_sigstop_past_the_lease_ttl() {
    let _serial = SERIAL.lock().await;
    let case = Case::start(SLEEP_MS, 4000, 0).await;
    let (c, stream) = (&case.c, &case.stream);
    let mut windows = Vec::new();
    let mut moved = 0;
    for _ in 0..cycles(1) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let taken = c.nodes[0].partitions_taken(&stream.topic);
        c.nodes[1].stop();
        tokio::time::sleep(Duration::from_secs(9)).await;
        moved += c.nodes[0].partitions_taken(&stream.topic) - taken;
        let at_resume = stream.sampler.latest();
        let resumed_cs = uptime_cs();
        c.nodes[1].cont();
        windows.push((resumed_cs, at_resume));
    }
    let (_c, run, started) = case.finish(Duration::from_secs(180)).await;
    // Invocations run on any node's worker, so the log does not say which poller sent them; but
    // no poller that holds a partition runs it below its committed offset, so an invocation that
    // starts after the resume below the offset committed at the resume is the frozen node's.
    let stale: usize = windows
        .iter()
        .map(|(resumed, at_resume)| {
            run.ledger
                .invocations
                .iter()
                .filter(|i| i.start_cs >= *resumed)
                .flat_map(|i| i.records.iter())
                .filter(|(p, o, _)| match (p, o) {
                    (Some(p), Some(o)) => at_resume.get(p).is_some_and(|c| o < c),
                    _ => false,
                })
                .count()
        })
        .sum();
    let r = run.report(
        "T03",
        redelivery_bound(windows.len(), SLEEP_MS),
        Duration::from_secs(20),
    );
    run.conclude(
        &r,
        started,
        &format!("; partitions taken over from the frozen node: {moved}; stale invocations after resume: {stale}"),
    );
    assert!(
        moved > 0,
        "the frozen node's partitions moved (else the case tested nothing)"
    );
    assert_eq!(
        stale, 0,
        "a resumed node runs no records of partitions it lost"
    );
}

/// T08: redis-server SIGKILLed and restarted empty, at once and then after two lease TTLs.
/// Leases, slots and the worker registry are gone; the nodes re-acquire and re-register. 0 lost;
/// no two invocations of one partition at once; dispatch resumes within TTL + 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "finding (intermittent since the hand-over drain): after Redis restarts empty, some partitions are first invoked again up to 13-17 s later (bound: lease TTL + 5 s = 8 s; 3 of 3 runs before d047ddd, 1 of 3 after)"]
async fn t08_redis_restarted_empty() {
    let _serial = SERIAL.lock().await;
    let mut case = Case::start(SLEEP_MS, 4000, 300).await;
    let mut restarts = Vec::new();
    for down in [Duration::ZERO, Duration::from_secs(6)] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        case.c.redis.kill();
        tokio::time::sleep(down).await;
        case.c.redis.restart();
        restarts.push(uptime_cs());
    }
    let (_c, run, started) = case.finish(Duration::from_secs(180)).await;
    // Dispatch resumes: per restart, the latest of the partitions' first invocations after it
    // (of the partitions that still had records to run).
    let resumed: Vec<Option<u64>> = restarts
        .iter()
        .map(|at| {
            let mut first: BTreeMap<i32, u64> = BTreeMap::new();
            for i in run
                .ledger
                .invocations
                .iter()
                .filter(|i| i.end_cs > 0 && i.start_cs >= *at)
            {
                for p in i.records.iter().filter_map(|r| r.0) {
                    let ms = (i.start_cs - at) * 10;
                    first
                        .entry(p)
                        .and_modify(|m| *m = (*m).min(ms))
                        .or_insert(ms);
                }
            }
            first.into_values().max()
        })
        .collect();
    let r = run.report(
        "T08",
        redelivery_bound(restarts.len(), SLEEP_MS),
        Duration::from_secs(20),
    );
    run.conclude(
        &r,
        started,
        &format!(
            "; every busy partition invoked again after each restart within (ms): {resumed:?}"
        ),
    );
    assert!(
        resumed.iter().all(|r| r.is_some_and(|ms| ms <= 8_000)),
        "dispatch resumes within TTL + 5 s: {resumed:?}"
    );
}

/// T12: 1 record in 1,000 poisoned, MaximumRetryAttempts 2, bisection on. Processed ∪ on-failure
/// = input; the poison records, and only they, are in the failure topic, each record carrying
/// its topic, partition, offset, attempts and reason; no partition stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t12_poison_one_in_a_thousand() {
    use sluice_destinations::StreamFailureRecord;
    use sluice_tests::fault::ledger::RecordId;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let c = cluster(2, 0, &[]).await;
    let stream = Stream::map(&c, json!({})).await;
    let (failed, topic) = (stream.failed.clone(), stream.topic.clone());
    let mut ledger = Ledger::new();
    let ids = stream_ids(scaled(4000), KEYS);
    let poison: std::collections::BTreeSet<RecordId> =
        ids.iter().skip(500).step_by(1000).cloned().collect();
    let refused = c
        .produce(&stream.topic, ids, |id| poison.contains(id), &mut ledger)
        .await;
    assert_eq!(refused, 0, "every record is acknowledged");
    let run = finish(&c, stream, None, ledger, Duration::from_secs(180)).await;
    let r = run.report("T12", 0, Duration::from_secs(15));
    let mut in_failure = std::collections::BTreeSet::new();
    let mut bad = Vec::new();
    for raw in c.read_topic(&failed).await {
        let rec: StreamFailureRecord = serde_json::from_slice(&raw).expect("a failure record");
        for fr in rec.records().unwrap_or_default() {
            let id = RecordId::parse(&String::from_utf8_lossy(&fr.value)).expect("an id");
            let acked = run.ledger.entries.get(&id).and_then(|e| e.acked.flatten());
            if fr.topic != topic
                || acked != Some((fr.partition, fr.offset))
                || rec.request_context.approximate_invoke_count != 3
                || rec.request_context.condition.is_empty()
            {
                bad.push((
                    id.clone(),
                    fr.partition,
                    fr.offset,
                    rec.request_context.clone(),
                ));
            }
            in_failure.insert(id);
        }
    }
    eprintln!(
        "T12 ran {:?}; {} poison, {} in the failure topic",
        started.elapsed(),
        poison.len(),
        in_failure.len()
    );
    r.assert_holds();
    assert!(run.drained_in.is_some(), "the run drained");
    assert_eq!(
        in_failure, poison,
        "exactly the poison records are in the failure topic"
    );
    assert!(bad.is_empty(), "failure records name their record: {bad:?}");
}

/// T16: the broker SIGKILLed while Event invokes and stream records are coming in, restarted on
/// its sqlite data. Every 202 and every acknowledged record is delivered; the nodes recover
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "finding (intermittent): in 1 of 5 runs 152 of 500 Events that got 202 around the broker restart were never invoked (no destination record after 240 s)"]
async fn t16_broker_killed_under_ingest() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut c = cluster(2, SLEEP_MS, &[]).await;
    let mut broker = c.broker.take().expect("a private broker");
    let topics = c.event_destinations(2).await;
    let stream = Stream::map(&c, json!({})).await;
    let producing = ingest(&c, &stream, scaled(4000), 0).await;
    let fault = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(3));
        broker.kill();
        std::thread::sleep(Duration::from_secs(3));
        broker.restart();
        broker
    });
    // Events go on through the outage: what gets no 202 is not in the ledger.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ledger = Ledger::new();
    let refused_events = c.events(event_ids(scaled(500)), &mut ledger).await;
    let broker = fault.await.expect("the fault task");
    let (produced, _, refused_records) = producing.done().await;
    ledger.merge(produced);
    let run = finish(&c, stream, Some(&topics), ledger, Duration::from_secs(240)).await;
    let r = run.report(
        "T16",
        redelivery_bound(1, SLEEP_MS),
        Duration::from_secs(60),
    );
    eprintln!(
        "T16 ran {:?}; not acknowledged during the outage: {refused_events} events, {refused_records} records",
        started.elapsed()
    );
    // Where the lost Events are: still in the async queue (the pollers passed them by) or not
    // (the broker lost what it acknowledged).
    if !r.lost.is_empty() {
        let queued: std::collections::BTreeSet<_> = c
            .read_topic(&c.async_topic())
            .await
            .iter()
            .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
            .filter_map(|v| sluice_tests::fault::ledger::RecordId::parse(v["fault"].as_str()?))
            .collect();
        let in_queue = r.lost.iter().filter(|id| queued.contains(*id)).count();
        eprintln!(
            "T16: of {} lost, {in_queue} are in the async queue topic ({} events there)",
            r.lost.len(),
            queued.len()
        );
    }
    r.assert_holds();
    assert!(
        run.drained_in.is_some() && run.events_done,
        "the run drained"
    );
    drop(broker);
}
