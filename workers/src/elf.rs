//! What a function's ELF executable needs, read from its headers without running anything.
//!
//! `ldd` must never be run on a function's files: it may execute them (its man page says so),
//! with the worker's privileges. The micro-VM backend needs the shared libraries a bundle's
//! executables name, so it reads their `PT_INTERP` and `DT_NEEDED` entries here and looks the
//! names up in the host's library directories; only those host files, never the bundle's, are
//! then resolved further.

use std::path::{Path, PathBuf};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
/// Headers and dynamic sections of real executables are small; anything past this is refused.
const MAX_READ: usize = 64 * 1024 * 1024;

/// The program interpreter and the `DT_NEEDED` names of a 64-bit little-endian ELF file; `None`
/// for anything else (a script, a malformed file).
#[must_use]
pub fn needed(bytes: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| {
        Some(u16::from_le_bytes(
            bytes.get(o..o.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |o: usize| {
        Some(u32::from_le_bytes(
            bytes.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |o: usize| {
        Some(u64::from_le_bytes(
            bytes.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 56 {
        return None;
    }
    let mut loads = Vec::new(); // (vaddr, offset, filesz)
    let (mut interp, mut dynamic) = (None, None);
    for i in 0..phnum {
        let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let (kind, offset, vaddr, filesz) = (
            u32_at(h)?,
            u64_at(h.checked_add(8)?)?,
            u64_at(h.checked_add(16)?)?,
            u64_at(h.checked_add(32)?)?,
        );
        match kind {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            PT_INTERP => {
                let (o, n) = (usize::try_from(offset).ok()?, usize::try_from(filesz).ok()?);
                let raw = bytes.get(o..o.checked_add(n)?)?;
                let raw = raw.split(|&b| b == 0).next()?;
                interp = Some(String::from_utf8_lossy(raw).into_owned());
            }
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else {
        return Some((interp, Vec::new())); // statically linked
    };
    let (dyn_off, dyn_size) = (
        usize::try_from(dyn_off).ok()?,
        usize::try_from(dyn_size).ok()?,
    );
    let mut names = Vec::new();
    let mut strtab_vaddr = None;
    for e in (dyn_off..dyn_off.checked_add(dyn_size)?).step_by(16) {
        let (tag, val) = (u64_at(e)?, u64_at(e.checked_add(8)?)?);
        match tag {
            0 => break,
            DT_NEEDED => names.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            _ => {}
        }
    }
    let strtab_vaddr = strtab_vaddr?;
    let (seg_vaddr, seg_off, _) = *loads
        .iter()
        .find(|(v, _, n)| strtab_vaddr >= *v && strtab_vaddr < v.saturating_add(*n))?;
    let strtab = usize::try_from((strtab_vaddr - seg_vaddr).checked_add(seg_off)?).ok()?;
    let needed = names
        .into_iter()
        .filter_map(|n| {
            let start = strtab.checked_add(usize::try_from(n).ok()?)?;
            let raw = bytes.get(start..)?.split(|&b| b == 0).next()?;
            Some(String::from_utf8_lossy(raw).into_owned())
        })
        .collect();
    Some((interp, needed))
}

/// Host directories a bare library name is looked up in (Debian's multiarch layout first).
const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The host files `exe` needs: its interpreter and its `DT_NEEDED` libraries found in the host's
/// library directories, and theirs, transitively. The names come from `exe`'s headers; a name
/// with a `/` or one not found in those directories is skipped, so a bundle cannot pull in an
/// arbitrary host file.
#[must_use]
pub fn host_libraries(exe: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut queue = vec![exe.to_path_buf()];
    while let Some(file) = queue.pop() {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if !meta.is_file() || usize::try_from(meta.len()).map_or(true, |n| n > MAX_READ) {
            continue;
        }
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Some((interp, needed)) = needed(&bytes) else {
            continue;
        };
        let mut found = Vec::new();
        if let Some(i) = interp.filter(|i| {
            i.starts_with('/') && LIBRARY_DIRS.iter().any(|d| Path::new(i).starts_with(d))
        }) {
            found.push(PathBuf::from(i));
        }
        for name in needed.iter().filter(|n| !n.contains('/') && !n.is_empty()) {
            if let Some(p) = LIBRARY_DIRS
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
            {
                found.push(p);
            }
        }
        for p in found {
            if !out.contains(&p) {
                out.push(p.clone());
                queue.push(p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_host_executable_needs_libc_and_its_interpreter() {
        let ls = Path::new("/bin/ls");
        let bytes = std::fs::read(ls).expect("read /bin/ls");
        let (interp, needed) = needed(&bytes).expect("an ELF file");
        assert!(
            interp.is_some_and(|i| i.contains("ld-linux")),
            "interpreter"
        );
        assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
        let libs = host_libraries(ls);
        assert!(libs.iter().any(|p| p.ends_with("libc.so.6")), "{libs:?}");
    }

    #[test]
    fn scripts_and_garbage_need_nothing_and_run_nothing() {
        assert!(needed(b"#!/bin/sh\necho hi\n").is_none());
        assert!(needed(&[0x7f, b'E', b'L', b'F', 2, 1]).is_none());
        let mut bogus = b"\x7fELF\x02\x01".to_vec();
        bogus.resize(64, 0xff);
        assert!(
            needed(&bogus).is_none(),
            "absurd header offsets are refused"
        );
    }
}
