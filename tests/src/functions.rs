//! Function bundles for sandbox tests: the `sluice-testfns` binaries (built with the public
//! `lambda_runtime` crate) copied into a directory as `bootstrap`.

use std::path::{Path, PathBuf};

/// The directory cargo puts this workspace's binaries in (`target/<profile>`).
///
/// # Panics
/// When the test executable's location is unknown.
#[must_use]
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .find(|d| d.join("sluice-agent").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "sluice-agent is not built next to {}: run the suite with `cargo test --workspace` \
                 (scripts/test.sh does), which builds every binary",
                exe.display()
            )
        })
}

/// A bundle directory holding one `bootstrap`; removed on drop.
pub struct Bundle {
    dir: PathBuf,
}

/// The directory every test bundle is made under; nodes the harness starts allow `Code.Path`
/// there (`--code-path-root`, through `SLUICE_CODE_PATH_ROOTS`).
#[must_use]
pub fn bundle_root() -> PathBuf {
    std::env::temp_dir()
}

impl Bundle {
    /// A bundle whose `bootstrap` is the workspace binary `bin` (e.g. `fn-echo`).
    ///
    /// # Panics
    /// When the binary is missing or the directory cannot be written.
    #[must_use]
    pub fn of(bin: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let src = bin_dir().join(bin);
        assert!(
            src.is_file(),
            "{} is not built (cargo test --workspace builds it)",
            src.display()
        );
        let dir = bundle_root().join(format!(
            "sluice-bundle-{bin}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create bundle dir");
        // Sandboxes run as an unprivileged host UID: the bundle must be world-readable.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod bundle dir");
        let dst = dir.join("bootstrap");
        std::fs::copy(&src, &dst).expect("copy bootstrap");
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
            .expect("chmod bootstrap");
        Self { dir }
    }

    /// The bundle directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
