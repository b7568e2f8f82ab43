//! A `cpio` newc archive writer for the guest's initramfs (the agent as `/init`, the bundle).

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir(String),
    /// A regular file with its permission bits.
    File {
        /// Path inside the archive (no leading `/`).
        path: String,
        /// Permission bits (e.g. 0o755).
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
}

fn push_entry(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8]) {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, data.len(), 0, 0, 0, 0, 0
    );
    out.extend(header.as_bytes());
    out.extend(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The archive of `entries` (uncompressed; the kernel unpacks it as is).
#[must_use]
pub fn build(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match e {
            Entry::Dir(path) => push_entry(&mut out, ino, 0o040_755, 2, path, &[]),
            Entry::File { path, mode, data } => {
                push_entry(&mut out, ino, 0o100_000 | (mode & 0o7777), 1, path, data);
            }
        }
    }
    push_entry(&mut out, 0, 0, 1, "TRAILER!!!", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let a = build(&[
            Entry::Dir("dev".into()),
            Entry::File {
                path: "init".into(),
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
        ]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
        // The file header: mode 0100755, size 10.
        assert!(text.contains("000081ed"), "{text}");
        assert!(text.contains("0000000a"));
    }
}
