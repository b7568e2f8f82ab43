//! The jailed-process backend: the agent jails itself (see `sluice_agent::jail`); the host
//! creates the sandbox's cgroups, writes its user-namespace ID maps (two host ids per sandbox: one
//! for the agent, one for the function), and tears it all down.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use sluice_agent::jail::{
    JailSpec, Rlimits, FUNCTION_GID, FUNCTION_UID, SYNC_MAPPED, SYNC_UNSHARED,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::cgroup::{Cgroup, CgroupMode, Limits};
use crate::sandbox::{BootError, Channel, FunctionSpec, Isolation, SandboxBackend};

static NEXT_JAIL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Lambda gives a function one vCPU per 1769 MiB.
const MIB_PER_VCPU: u64 = 1769;

/// Lambda's limit on a sandbox's processes and threads: the pids cgroup where there is one, and
/// the function uid's `RLIMIT_NPROC` always.
const MAX_PROCESSES: u64 = 1024;

/// Settings of the jail backend.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The `sluice-agent` executable.
    pub agent: PathBuf,
    /// Where per-sandbox root mount points are made (empty directories).
    pub run_dir: PathBuf,
    /// Host directories visible read-only in every sandbox (never `/etc`: the sandbox gets a
    /// generated one).
    pub ro_binds: Vec<PathBuf>,
    /// First host UID/GID sandboxes are mapped to. Sandbox `id` gets the pair
    /// `uid_base + 2 * (id % (uid_count / 2))` (its agent) and the id after it (its function).
    pub uid_base: u32,
    /// How many host UIDs to rotate through (at least 2).
    pub uid_count: u32,
    /// Name servers in each sandbox's `/etc/resolv.conf`.
    pub nameservers: Vec<std::net::IpAddr>,
    /// Largest `/tmp` a sandbox may have, MiB: each gets its function's EphemeralStorage
    /// (512–10240, default 512), capped here.
    pub tmp_size_mb: u64,
    /// Install the seccomp filter.
    pub seccomp: bool,
    /// Which cgroups to use.
    pub cgroups: CgroupMode,
    /// Smallest CPU share, millicores (Lambda's share for 128 MiB would be 72).
    pub min_cpu_millicores: u64,
}

impl JailConfig {
    /// Defaults: the agent next to the running executable (or `SLUICE_AGENT`), roots under
    /// `/run/sluice/jail`, cgroups detected.
    #[must_use]
    pub fn detect() -> Self {
        Self {
            agent: find_agent(),
            run_dir: PathBuf::from("/run/sluice/jail"),
            ro_binds: ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            uid_base: 100_000,
            uid_count: 60_000,
            nameservers: host_nameservers(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
            tmp_size_mb: 10_240,
            seccomp: true,
            cgroups: CgroupMode::detect(),
            min_cpu_millicores: 250,
        }
    }
}

/// The name servers of a `resolv.conf`, less loopback ones (a resolver listening on the host's
/// loopback, such as systemd-resolved's stub, cannot be reached from a sandbox's own network).
fn host_nameservers(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// Finds `sluice-agent`: `$SLUICE_AGENT`, else beside the running executable (or its parent
/// directory, for test binaries under `target/*/deps`), else on `PATH`.
#[must_use]
pub fn find_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_AGENT") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("sluice-agent");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("sluice-agent")
}

/// The jail backend.
#[derive(Debug, Clone)]
pub struct JailBackend {
    config: JailConfig,
}

impl JailBackend {
    /// A backend with `config`.
    ///
    /// # Errors
    /// When the agent is missing, the run directory cannot be created, or fewer than two host
    /// UIDs are configured.
    pub fn new(config: JailConfig) -> Result<Self, BootError> {
        if config.uid_count < 2 {
            return Err(BootError::Setup(format!(
                "uid_count must be at least 2 (a sandbox maps its agent and its function to two host UIDs), got {}",
                config.uid_count
            )));
        }
        if !config.agent.is_file() {
            return Err(BootError::Setup(format!(
                "the guest agent {} does not exist (build it with `cargo build -p sluice-agent`, or set SLUICE_AGENT)",
                config.agent.display()
            )));
        }
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| BootError::Setup(format!("create {}: {e}", config.run_dir.display())))?;
        Ok(Self { config })
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> &JailConfig {
        &self.config
    }
}

struct Jail {
    child: Child,
    cgroup: Option<Cgroup>,
    root_dir: PathBuf,
}

#[async_trait]
impl Isolation for Jail {
    async fn destroy(mut self: Box<Self>) {
        // Stage 1 dies → stage 2 (PID 1 of the namespace) gets SIGKILL (its parent-death signal),
        // and with it every process of the namespace.
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        if let Some(cg) = self.cgroup.take() {
            cg.destroy(Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_dir(&self.root_dir);
    }

    fn out_of_memory(&self) -> bool {
        self.cgroup.as_ref().is_some_and(Cgroup::oom_killed)
    }

    fn memory_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(Cgroup::memory_bytes)
    }
}

/// The host ids of sandbox `id`: its agent's, and its function's.
fn host_ids(config: &JailConfig, id: u64) -> (u32, u32) {
    let pair = u32::try_from(id % u64::from(config.uid_count / 2)).unwrap_or(0);
    let agent = config.uid_base + 2 * pair;
    (agent, agent + 1)
}

/// Maps the agent (0) and the function ([`FUNCTION_UID`]) to two host ids, for users and groups.
/// Nothing else is mapped: host files appear as the overflow id.
fn write_id_maps(pid: u32, (agent, function): (u32, u32)) -> std::io::Result<()> {
    let proc = Path::new("/proc").join(pid.to_string());
    std::fs::write(
        proc.join("uid_map"),
        format!("0 {agent} 1\n{FUNCTION_UID} {function} 1\n"),
    )?;
    std::fs::write(proc.join("setgroups"), "deny")?;
    std::fs::write(
        proc.join("gid_map"),
        format!("0 {agent} 1\n{FUNCTION_GID} {function} 1\n"),
    )
}

#[async_trait]
impl SandboxBackend for JailBackend {
    fn name(&self) -> &'static str {
        "jail"
    }

    async fn launch(
        &self,
        id: u64,
        spec: &FunctionSpec,
    ) -> Result<(Pin<Box<dyn Channel>>, Box<dyn Isolation>), BootError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| BootError::Setup(format!("{what}: {e}"));
        // Unique on this host for the life of this process, whatever ids callers use.
        let seq = NEXT_JAIL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sb-{}-{seq}", std::process::id());
        let root_dir = self.config.run_dir.join(&name);
        std::fs::create_dir_all(&root_dir).map_err(|e| setup("create the root mount point", &e))?;
        let memory_bytes = spec.memory_mb * 1024 * 1024;
        let cgroup = Cgroup::create(
            &self.config.cgroups,
            &name,
            Limits {
                memory_bytes,
                cpu_millicores: (spec.memory_mb * 1000 / MIB_PER_VCPU)
                    .max(self.config.min_cpu_millicores),
                pids: MAX_PROCESSES,
            },
        )
        .map_err(|e| setup("create the sandbox's cgroups", &e))?;
        let jail_spec = JailSpec {
            root_dir: root_dir.clone(),
            task_dir: spec.task_dir.clone(),
            ro_binds: self.config.ro_binds.clone(),
            cgroup_procs: cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default(),
            // The function's EphemeralStorage, never more than the host allows.
            tmp_size_mb: spec.ephemeral_storage_mb.min(self.config.tmp_size_mb),
            nameservers: self.config.nameservers.clone(),
            rlimits: Rlimits {
                nofile: 1024,
                // Without a memory cgroup the address-space limit is the only memory bound; it is
                // looser (it counts mappings, not use), so give it headroom over the function's memory.
                address_space_bytes: cgroup.is_none().then_some(memory_bytes * 4 + (1 << 30)),
                file_size_bytes: spec.ephemeral_storage_mb.min(self.config.tmp_size_mb)
                    * 1024
                    * 1024,
                processes: MAX_PROCESSES,
            },
            seccomp: self.config.seccomp,
        };
        let json =
            serde_json::to_string(&jail_spec).map_err(|e| setup("encode the jail spec", &e))?;
        let (host_end, agent_end) =
            StdUnixStream::pair().map_err(|e| setup("create the agent channel", &e))?;
        let child = Command::new(&self.config.agent)
            .arg("jail")
            .arg(json)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(agent_end)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn();
        let mut jail = Jail {
            child: match child {
                Ok(c) => c,
                Err(e) => {
                    if let Some(cg) = cgroup {
                        cg.destroy(Duration::from_secs(1)).await;
                    }
                    let _ = std::fs::remove_dir(&root_dir);
                    return Err(setup("start the agent", &e));
                }
            },
            cgroup,
            root_dir,
        };
        let handshake = async {
            host_end.set_nonblocking(true)?;
            let mut stream = tokio::net::UnixStream::from_std(host_end)?;
            let mut b = [0u8; 1];
            stream.read_exact(&mut b).await?;
            if b[0] != SYNC_UNSHARED {
                return Err(std::io::Error::other(format!(
                    "unexpected handshake byte {}",
                    b[0]
                )));
            }
            let pid = jail
                .child
                .id()
                .ok_or_else(|| std::io::Error::other("stage 1 exited"))?;
            write_id_maps(pid, host_ids(&self.config, id))?;
            stream.write_all(&[SYNC_MAPPED]).await?;
            Ok::<_, std::io::Error>(stream)
        };
        match tokio::time::timeout(Duration::from_secs(10), handshake).await {
            Ok(Ok(stream)) => Ok((Box::pin(stream), Box::new(jail))),
            Ok(Err(e)) => {
                let status = jail.child.try_wait().ok().flatten();
                Box::new(jail).destroy().await;
                Err(BootError::Setup(format!(
                    "jail handshake: {e} (agent status {status:?})"
                )))
            }
            Err(_) => {
                Box::new(jail).destroy().await;
                Err(BootError::Setup("jail handshake timed out".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sandbox_gets_two_host_ids_of_its_own() {
        let mut config = JailConfig::detect();
        config.uid_base = 100_000;
        config.uid_count = 6;
        assert_eq!(host_ids(&config, 0), (100_000, 100_001));
        assert_eq!(host_ids(&config, 1), (100_002, 100_003));
        assert_eq!(host_ids(&config, 2), (100_004, 100_005));
        assert_eq!(host_ids(&config, 3), (100_000, 100_001), "rotates");
    }

    #[test]
    fn loopback_name_servers_are_left_out() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\n\
                    nameserver 2001:db8::1\noptions edns0\n";
        assert_eq!(
            host_nameservers(conf),
            vec![
                "10.0.0.2".parse::<std::net::IpAddr>().expect("literal"),
                "2001:db8::1".parse().expect("literal"),
            ]
        );
    }
}
