//! A hostile function tries to get out of its jail; every attempt must be refused.
//!
//! The function is `workers/testfns/probe/bootstrap.pl` (see its header for why it is Perl): a
//! custom runtime that, on each invocation, makes every escape attempt in its own child process
//! and reports what it got. Each test prints the whole table (attempt → result); run with
//! `--nocapture` to see it when the tests pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_workers::cgroup::CgroupMode;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::{FunctionSpec, InvokeOutcome, Sandbox};

/// The `/tmp` size the probe runs with: small, so that filling it is quick.
const TMP_CAP_MB: u64 = 64;

/// One probe at a time: fork bombs on a 2-core host are enough one by one.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A bundle whose `bootstrap` is the probe; removed on drop.
struct ProbeBundle(PathBuf);

impl ProbeBundle {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../workers/testfns/probe/bootstrap.pl");
        let dir = std::env::temp_dir().join(format!(
            "sluice-bundle-probe-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create bundle dir");
        // Sandboxes run as unprivileged host UIDs: the bundle must be world-readable.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let dst = dir.join("bootstrap");
        std::fs::copy(&src, &dst)
            .unwrap_or_else(|e| panic!("copy the probe from {}: {e}", src.display()));
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(dir)
    }
}

impl Drop for ProbeBundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct Attempt {
    name: String,
    escaped: bool,
    got: String,
    errno: Option<String>,
}

/// Boots the probe on `config`, runs it once with `event`, and returns its table.
async fn probe(config: JailConfig, event: Value) -> Vec<Attempt> {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = JailBackend::new(config).expect("jail backend");
    let bundle = ProbeBundle::new();
    let mut spec = FunctionSpec::new("probe", &bundle.0);
    spec.memory_mb = 1024;
    spec.timeout = Duration::from_secs(240);
    let mut sb = Sandbox::boot(
        &backend,
        rand::random::<u32>().into(),
        Arc::new(spec),
        Duration::from_secs(10),
        None,
    )
    .await
    .expect("boot the probe (it needs /usr/bin/perl on the host)");
    let out = sb
        .invoke("req-probe", event.to_string().into_bytes(), "")
        .await;
    sb.destroy().await;
    let InvokeOutcome::Response(body) = out else {
        panic!("the probe did not answer: {out:?}")
    };
    let table: Vec<Value> = serde_json::from_slice(&body).expect("the probe's JSON table");
    table
        .iter()
        .map(|a| Attempt {
            name: a["attempt"].as_str().expect("attempt").to_owned(),
            escaped: a["escaped"].as_bool().expect("escaped"),
            got: a["got"].as_str().expect("got").to_owned(),
            errno: a["errno"].as_str().map(str::to_owned),
        })
        .collect()
}

fn print_table(title: &str, table: &[Attempt]) {
    println!("\n{title}\n");
    println!("| attempt | result |");
    println!("|---|---|");
    for a in table {
        let verdict = if a.escaped { "**ESCAPED**" } else { "refused" };
        println!("| {} | {verdict}: {} |", a.name, a.got.replace('|', "\\|"));
    }
}

fn find<'a>(table: &'a [Attempt], name: &str) -> &'a Attempt {
    table
        .iter()
        .find(|a| a.name.starts_with(name))
        .unwrap_or_else(|| panic!("the probe made no attempt named {name}: {table:?}"))
}

fn escaped<'a>(table: &'a [Attempt], except: &[&str]) -> Vec<&'a Attempt> {
    table
        .iter()
        .filter(|a| a.escaped && !except.iter().any(|e| a.name.starts_with(e)))
        .collect()
}

fn event(map_cap_mb: Option<u64>) -> Value {
    let mut e = serde_json::json!({ "tmp_cap_mb": TMP_CAP_MB, "fork_cap": 1500 });
    if let Some(mb) = map_cap_mb {
        e["map_cap_mb"] = mb.into();
    }
    e
}

fn config() -> JailConfig {
    let mut c = JailConfig::detect();
    c.tmp_size_mb = TMP_CAP_MB;
    c
}

#[tokio::test]
async fn every_escape_attempt_is_refused() {
    let table = probe(config(), event(None)).await;
    print_table("Jail probe (cgroups as detected, seccomp on)", &table);
    assert!(table.len() >= 17, "{table:?}");
    let out = escaped(&table, &[]);
    assert!(out.is_empty(), "attempts that got out: {out:#?}");
    // How they are refused matters where a libc or the kernel could hide the filter: x32 numbers
    // must stop at the filter (this host's kernel has no x32 ABI and would say ENOSYS itself),
    // and clone3 must fail with ENOSYS so that libcs fall back to clone.
    assert_eq!(find(&table, "x32").errno.as_deref(), Some("EPERM"));
    assert_eq!(find(&table, "clone3").errno.as_deref(), Some("ENOSYS"));
}

#[tokio::test]
async fn without_cgroups_processes_and_memory_are_still_bounded() {
    let mut c = config();
    c.cgroups = CgroupMode::None;
    let table = probe(c, event(Some(32 * 1024))).await;
    print_table("Jail probe without cgroups (rlimits only)", &table);
    let out = escaped(&table, &[]);
    assert!(out.is_empty(), "attempts that got out: {out:#?}");
    find(&table, "map memory");
}

/// With the seccomp policy off, what does not depend on it still holds: the function's uid and
/// empty capability sets, the agent's separate uid and undumpability, the nested-namespace limit,
/// the generated `/etc`, and the process and `/tmp` bounds. Only the attempts that nothing but the
/// filter refuses get through (x32 numbers, which this host's kernel rejects anyway, and
/// `io_uring_setup`, which unprivileged users may make).
#[tokio::test]
async fn without_seccomp_the_other_walls_still_hold() {
    let mut c = config();
    c.seccomp = false;
    let table = probe(c, event(None)).await;
    print_table("Jail probe without seccomp", &table);
    let out = escaped(&table, &["x32", "io_uring_setup"]);
    assert!(out.is_empty(), "attempts that got out: {out:#?}");
    assert!(
        find(&table, "CapEff").got.contains("filters=0"),
        "seccomp was off: {:?}",
        find(&table, "CapEff")
    );
}

/// The probe can tell a `/tmp` past its cap: told the cap is a quarter of what the jail gives, it
/// reports the fill as an escape (every other attempt has been seen to escape on the jail before
/// this change, or cannot escape on this host; see the attempt texts).
#[tokio::test]
async fn the_probe_notices_a_tmp_larger_than_promised() {
    let mut e = event(None);
    e["tmp_cap_mb"] = (TMP_CAP_MB / 4).into();
    let table = probe(config(), e).await;
    let fill = find(&table, "fill /tmp");
    assert!(fill.escaped, "{fill:?}");
}
