//! Per-sandbox cgroups: memory, CPU and PID limits, out-of-memory detection, and cleanup.
//!
//! cgroup v2 is used where its controllers are enabled; otherwise cgroup v1 hierarchies
//! (`memory`, `cpu`, `pids`) when mounted; otherwise none (the jail falls back to rlimits).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// Unified hierarchy with memory, cpu and pids controllers, under this parent.
    V2(PathBuf),
    /// Legacy per-controller hierarchies; the root of the mount (`/sys/fs/cgroup`).
    V1(PathBuf),
    /// No usable cgroups.
    None,
}

impl CgroupMode {
    /// Detects what the host offers, creating Sluice's parent group (`sluice`).
    #[must_use]
    pub fn detect() -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let v2_controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if ["memory", "cpu", "pids"]
            .iter()
            .all(|c| v2_controllers.split_whitespace().any(|x| x == *c))
        {
            let parent = root.join("sluice");
            if std::fs::create_dir_all(&parent).is_ok()
                && std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids").is_ok()
                && std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids")
                    .is_ok()
            {
                return CgroupMode::V2(parent);
            }
        }
        if ["memory", "cpu", "pids"]
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").exists())
            && ["memory", "cpu", "pids"]
                .iter()
                .all(|c| std::fs::create_dir_all(root.join(c).join("sluice")).is_ok())
        {
            return CgroupMode::V1(root.to_path_buf());
        }
        CgroupMode::None
    }

    /// A short name for logs and metrics.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            CgroupMode::V2(_) => "v2",
            CgroupMode::V1(_) => "v1",
            CgroupMode::None => "none",
        }
    }
}

/// Limits for one sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory (and memory+swap) limit, bytes.
    pub memory_bytes: u64,
    /// CPU share, in millicores (1000 = one core).
    pub cpu_millicores: u64,
    /// Most processes and threads.
    pub pids: u64,
}

/// One sandbox's cgroups.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    mode: CgroupMode,
}

const CFS_PERIOD_US: u64 = 100_000;

impl Cgroup {
    /// Creates the sandbox's groups and sets their limits.
    ///
    /// # Errors
    /// When a group cannot be created or a limit written.
    pub fn create(mode: &CgroupMode, name: &str, limits: Limits) -> std::io::Result<Option<Self>> {
        let quota = (CFS_PERIOD_US * limits.cpu_millicores / 1000).max(1000);
        match mode {
            CgroupMode::None => Ok(None),
            CgroupMode::V2(parent) => {
                let dir = parent.join(name);
                std::fs::create_dir_all(&dir)?;
                let cg = Cgroup {
                    dirs: vec![dir.clone()],
                    mode: mode.clone(),
                };
                std::fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                std::fs::write(dir.join("pids.max"), limits.pids.to_string())?;
                std::fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"))?;
                Ok(Some(cg))
            }
            CgroupMode::V1(root) => {
                let mem = root.join("memory/sluice").join(name);
                let cpu = root.join("cpu/sluice").join(name);
                let pids = root.join("pids/sluice").join(name);
                for d in [&mem, &cpu, &pids] {
                    std::fs::create_dir_all(d)?;
                }
                let cg = Cgroup {
                    dirs: vec![mem.clone(), cpu.clone(), pids.clone()],
                    mode: mode.clone(),
                };
                std::fs::write(
                    mem.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                let _ = std::fs::write(
                    mem.join("memory.memsw.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                );
                let _ = std::fs::write(mem.join("memory.swappiness"), "0");
                std::fs::write(pids.join("pids.max"), limits.pids.to_string())?;
                std::fs::write(cpu.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string())?;
                std::fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
                Ok(Some(cg))
            }
        }
    }

    /// The `cgroup.procs` files a process writes its PID into to join.
    #[must_use]
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// PIDs in the sandbox (from the memory group, which every process of the sandbox joins).
    #[must_use]
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.memory_dir().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Whether the kernel's OOM killer has killed a process of the sandbox.
    #[must_use]
    pub fn oom_killed(&self) -> bool {
        let file = match self.mode {
            CgroupMode::V2(_) => "memory.events",
            _ => "memory.oom_control",
        };
        std::fs::read_to_string(self.memory_dir().join(file))
            .unwrap_or_default()
            .lines()
            .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
    }

    /// Memory charged to the sandbox now, bytes.
    #[must_use]
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match self.mode {
            CgroupMode::V2(_) => "memory.current",
            _ => "memory.usage_in_bytes",
        };
        std::fs::read_to_string(self.memory_dir().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills every process in the sandbox and removes the groups, waiting up to `timeout` for
    /// the processes to go.
    pub async fn destroy(self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pids = self.pids();
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let removed = self
                .dirs
                .iter()
                .all(|d| !d.exists() || std::fs::remove_dir(d).is_ok());
            if removed {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(dirs = ?self.dirs, "sandbox cgroup still busy; leaving it");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
