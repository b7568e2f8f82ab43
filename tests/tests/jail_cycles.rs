//! No sandbox, mount, cgroup or process is left behind by booting and killing jails. Its own
//! test binary, so that no other test's sandboxes run meanwhile.

use std::sync::Arc;
use std::time::Duration;

use sluice_tests::functions::Bundle;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::{FunctionSpec, InvokeOutcome, Sandbox};

fn host_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .count()
}

/// Live (non-zombie) processes running as a sandbox UID (100000..160000), and zombies whose
/// parent is this test process (which would be ours to reap).
fn sandbox_processes() -> (usize, usize) {
    let me = std::process::id().to_string();
    let (mut live, mut our_zombies) = (0, 0);
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
        };
        let zombie = field("State:").starts_with('Z');
        let uid = field("Uid:")
            .split_whitespace()
            .next()
            .and_then(|u| u.parse::<u32>().ok());
        if zombie && field("PPid:") == me {
            our_zombies += 1;
        } else if !zombie && uid.is_some_and(|u| (100_000..160_000).contains(&u)) {
            live += 1;
        }
    }
    (live, our_zombies)
}

#[tokio::test]
async fn nothing_is_left_behind_after_200_boot_kill_cycles() {
    let backend = JailBackend::new(JailConfig::detect()).expect("jail backend");
    let bundle = Bundle::of("fn-echo");
    let spec = Arc::new(FunctionSpec::new("cycles", bundle.path()));
    let me = std::process::id();
    let ours = |path: &str| -> usize {
        std::fs::read_dir(path)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("sb-{me}-"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let mounts_before = host_mounts();
    let before_processes = sandbox_processes();
    for i in 0..200 {
        let mut sb = Sandbox::boot(
            &backend,
            i,
            Arc::clone(&spec),
            Duration::from_secs(10),
            None,
        )
        .await
        .expect("boot");
        if i % 2 == 0 {
            assert!(matches!(
                sb.invoke("r", b"{}".to_vec(), "").await,
                InvokeOutcome::Response(_)
            ));
        }
        sb.destroy().await;
    }
    // SIGKILLed processes take a moment to exit.
    let mut left = sandbox_processes();
    for _ in 0..100 {
        if left == before_processes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = sandbox_processes();
    }
    assert_eq!(
        left, before_processes,
        "sandbox processes (live, our zombies) left behind"
    );
    assert_eq!(
        host_mounts(),
        mounts_before,
        "mounts left behind on the host"
    );
    assert_eq!(ours("/run/sluice/jail"), 0, "root mount points left behind");
    for controller in ["memory", "cpu", "pids"] {
        assert_eq!(
            ours(&format!("/sys/fs/cgroup/{controller}/sluice")),
            0,
            "{controller} cgroups left behind"
        );
    }
}
