//! Reading /proc/self/mountinfo: is something mounted at a path, and what.

use std::path::{Path, PathBuf};

/// One mount, as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next().unwrap_or("");
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The topmost mount at exactly `path`, if any.
pub fn mounted_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// The nassync mount that holds `path` (canonical), and `path` relative to
/// its mount point.
pub fn nassync_mount_of(path: &Path) -> Option<(MountEntry, PathBuf)> {
    mounts()
        .into_iter()
        .filter(|m| m.fstype == "fuse.nassync")
        .filter_map(|m| {
            let rel = path.strip_prefix(&m.mountpoint).ok()?.to_path_buf();
            Some((m, rel))
        })
        .max_by_key(|(m, _)| m.mountpoint.as_os_str().len())
}

/// Every nassync mount.
pub fn nassync_mounts() -> Vec<MountEntry> {
    mounts()
        .into_iter()
        .filter(|m| m.fstype == "fuse.nassync")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse.nassync /srv/nas rw,user_id=0\n\
                    37 35 0:5 / /home autofs rw - autofs systemd-1 rw\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fstype, "fuse.nassync");
        assert_eq!(m[0].source, "/srv/nas");
        assert_eq!(m[1].fstype, "autofs");
    }
}
