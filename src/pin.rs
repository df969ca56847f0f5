//! Making files available offline: `nassync pin PATH` fetches a file or a
//! directory tree whole into the disk cache and keeps it from eviction;
//! `nassync unpin PATH` lets it go. Pins are kept in the disk cache's index
//! (by path from the share's root), so they outlive the mount, and are
//! refreshed in the background while the NAS answers: a pinned file
//! changed on the NAS, or a file new under a pinned directory, is fetched
//! again.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use crate::backend::{Attr, Backend, BackendError, FileKind, OpenMode};
use crate::data::{FetchFn, FileData};
use crate::error::{FsError, FsResult};
use crate::fs::{Core, ROOT};

/// Where a pin stands, for progress reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct PinProgress {
    pub files: u64,
    pub bytes: u64,
    pub total_files: u64,
    pub total_bytes: u64,
}

/// A regular file under a pin.
struct Item<B: Backend> {
    ino: u64,
    node: B::Node,
    attr: Attr,
}

/// The normal form of a pin's path: components from the share's root,
/// joined by "/", without "." or empty components ("" is the whole share).
pub fn normalize(rel: &OsStr) -> FsResult<Vec<u8>> {
    let mut parts = Vec::new();
    for c in rel.as_bytes().split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(FsError::Invalid("\"..\" in a pin path")),
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

/// The regular files at or under `path`, as the NAS has them now. Every
/// name on the way and under it is adopted by the core, and every listing
/// recorded, so that the tree can be walked while the NAS is offline.
fn walk<B: Backend>(core: &Core<B>, path: &[u8]) -> FsResult<Vec<Item<B>>> {
    let b = &**core.backend();
    let (mut node, mut attr) = b.root()?;
    let mut ino = ROOT;
    for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
        let name = OsStr::from_bytes(c);
        (node, attr) = b.lookup(&node, name)?;
        ino = core.adopt(ino, name, node.clone(), attr, None)?;
    }
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    match attr.kind {
        FileKind::File => out.push(Item { ino, node, attr }),
        FileKind::Dir => dirs.push((ino, node)),
        _ => return Err(FsError::Invalid("only files and directories can be pinned")),
    }
    while let Some((dir_ino, dir)) = dirs.pop() {
        let mut listing = Vec::new();
        for e in b.readdir(&dir)? {
            let (node, attr) = match b.lookup(&dir, &e.name) {
                Ok(found) => found,
                Err(e) if e.raw_errno() == libc::ENOENT => continue, // gone meanwhile
                Err(e) => return Err(e.into()),
            };
            let target = match attr.kind {
                FileKind::Symlink => b.readlink(&node).ok(),
                _ => None,
            };
            let ino = core.adopt(dir_ino, &e.name, node.clone(), attr, target)?;
            listing.push((e.name, ino, attr.kind));
            match attr.kind {
                FileKind::File => out.push(Item { ino, node, attr }),
                FileKind::Dir => dirs.push((ino, node)),
                _ => {}
            }
        }
        core.adopt_listing(dir_ino, listing);
    }
    Ok(out)
}

/// Pins `rel` (a path from the share's root): records the pin, then
/// fetches every block not cached yet. `progress` is called as it goes and
/// stops the fetching when it returns false (the pin stays recorded and is
/// completed by the next refresh).
pub fn pin<B: Backend>(
    core: &Core<B>,
    rel: &OsStr,
    progress: &mut dyn FnMut(PinProgress) -> bool,
) -> FsResult<PinProgress> {
    pin_as(core, rel, progress, false)
}

/// [`pin`]; a `refresh` does nothing for a pin removed since it started.
fn pin_as<B: Backend>(
    core: &Core<B>,
    rel: &OsStr,
    progress: &mut dyn FnMut(PinProgress) -> bool,
    refresh: bool,
) -> FsResult<PinProgress> {
    let data = core.data_cache().clone();
    let Some(disk) = data.disk() else {
        return Err(FsError::Invalid(
            "pinning needs the disk cache (cache_size is 0)",
        ));
    };
    let path = normalize(rel)?;
    let backend = core.backend();
    let pinning = core.pin_lock();
    if refresh && !disk.pins()?.iter().any(|p| p.path == path) {
        return Ok(PinProgress::default()); // unpinned meanwhile
    }
    let items = match walk(core, &path) {
        Ok(items) => items,
        Err(e) => {
            release_locked(core); // what the walk adopted, unless pinned before
            return Err(e);
        }
    };
    let files: Vec<(u64, u64)> = items.iter().map(|i| (i.ino, i.attr.size)).collect();
    let mut p = PinProgress {
        total_files: items.len() as u64,
        total_bytes: items.iter().map(|i| i.attr.size).sum(),
        ..Default::default()
    };
    if let Err(e) = disk.pin(&path, &files) {
        drop(items);
        release_locked(core); // the walk adopted the tree for nothing
        return Err(e.into());
    }
    drop(pinning);
    let bs = data.block_size();
    for item in &items {
        let (ino, v) = (item.ino, item.attr.validator());
        let fd = match core.file_data(ino) {
            Some(fd) => {
                let dirty = core
                    .writeback()
                    .is_some_and(|wb| wb.is_dirty(item.attr.ino));
                if dirty && fd.cached() != Some(v) {
                    // Pending changes over a base the NAS no longer has:
                    // write-back sorts that out (a conflict); nothing to
                    // fetch for it.
                    log::info!("pin: {ino} has pending changes over another version; skipped");
                    p.files += 1;
                    p.bytes += item.attr.size;
                    continue;
                }
                fd
            }
            None => Arc::new(FileData::default()),
        };
        data.revalidate(ino, &fd, &v)?;
        let file = Arc::new(backend.open(
            &item.node,
            OpenMode {
                read: true,
                write: false,
                append: false,
                truncate: false,
            },
        )?);
        let b2 = backend.clone();
        let fetch: FetchFn = Arc::new(move |idx: u64| {
            let mut buf = vec![0u8; bs as usize];
            let n = b2.read(&file, idx * bs, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        });
        let mut off = 0;
        while off < item.attr.size {
            let n = bs.min(item.attr.size - off);
            let got = data.read(ino, &fd, off, n as u32, &fetch)?;
            if got.is_empty() {
                break; // shorter than it said: changed meanwhile
            }
            off += got.len() as u64;
            p.bytes += got.len() as u64;
            if !progress(p) {
                return Err(BackendError::errno("pin", libc::EINTR).into());
            }
        }
        p.bytes += item.attr.size.saturating_sub(off);
        p.files += 1;
        if !progress(p) {
            return Err(BackendError::errno("pin", libc::EINTR).into());
        }
    }
    Ok(p)
}

/// Removes the pin `rel`; its blocks become ordinary cache.
pub fn unpin<B: Backend>(core: &Core<B>, rel: &OsStr) -> FsResult<()> {
    let Some(disk) = core.data_cache().disk() else {
        return Err(FsError::Invalid("no disk cache, so nothing is pinned"));
    };
    let path = normalize(rel)?;
    let _pinning = core.pin_lock();
    if !disk.unpin(&path)? {
        return Err(FsError::Invalid("not pinned"));
    }
    release_locked(core);
    Ok(())
}

/// Whether `path` is a pin, under one, or on the way to one.
fn covered(pins: &[Vec<u8>], path: &[u8]) -> bool {
    let under = |a: &[u8], b: &[u8]| {
        b.is_empty() || a == b || (a.starts_with(b) && a.get(b.len()) == Some(&b'/'))
    };
    pins.iter()
        .any(|p| under(path, p) || under(p.as_slice(), path))
}

/// Lets the core forget what it kept for pins that are gone, or for names
/// that are (unlinked or renamed on the NAS or through the mount).
fn release<B: Backend>(core: &Core<B>) {
    let _pinning = core.pin_lock();
    release_locked(core);
}

fn release_locked<B: Backend>(core: &Core<B>) {
    let Some(disk) = core.data_cache().disk() else {
        return;
    };
    let pins: Vec<Vec<u8>> = match disk.pins() {
        Ok(p) => p.into_iter().map(|p| p.path).collect(),
        Err(e) => {
            log::warn!("pins: {e}");
            return;
        }
    };
    let n = core.release_kept(&|path| covered(&pins, path));
    if n > 0 {
        log::debug!("pins: {n} inodes no longer kept");
    }
}

/// Fetches what the pins are missing (a file changed on the NAS, a file
/// new under a pinned directory). Errors are logged, not returned.
pub fn refresh<B: Backend>(core: &Core<B>) {
    let Some(disk) = core.data_cache().disk() else {
        return;
    };
    let pins = match disk.pins() {
        Ok(p) => p,
        Err(e) => {
            log::warn!("pins: {e}");
            return;
        }
    };
    for crate::cache::disk::PinInfo { path, .. } in pins {
        if !core.backend().online() {
            return;
        }
        let name = String::from_utf8_lossy(&path).into_owned();
        match pin_as(core, OsStr::from_bytes(&path), &mut |_| true, true) {
            Ok(p) => log::debug!("pin /{name}: {} files, {} bytes", p.files, p.bytes),
            Err(e) => log::warn!("pin /{name}: cannot refresh it: {e}"),
        }
    }
    release(core);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_have_one_spelling() {
        assert_eq!(normalize(OsStr::new("/a//b/./c/")).unwrap(), b"a/b/c");
        assert_eq!(normalize(OsStr::new("")).unwrap(), b"");
        assert_eq!(normalize(OsStr::new("/")).unwrap(), b"");
        assert!(normalize(OsStr::new("a/../b")).is_err());
    }

    #[test]
    fn a_path_is_covered_under_a_pin_and_on_the_way_to_one() {
        let pins = vec![b"music/jazz".to_vec(), b"docs".to_vec()];
        for yes in ["music", "music/jazz", "music/jazz/a.flac", "docs/x/y"] {
            assert!(covered(&pins, yes.as_bytes()), "{yes}");
        }
        for no in ["musical", "music/rock", "music/jazzy", "doc", "docsx/a"] {
            assert!(!covered(&pins, no.as_bytes()), "{no}");
        }
        assert!(covered(&[Vec::new()], b"anything/at/all"));
        assert!(covered(&pins, b""), "the root is on the way to every pin");
    }
}
