//! The mount's entry in /run/mount/utab, libmount's table of what the
//! kernel does not keep about a mount.
//!
//! Why: umount(8) finds the type of a mount with statfs(2), which says only
//! "fuse", unless utab has an entry for the mount point; only then does it
//! read mountinfo, see "fuse.nassync" and run umount.fuse.nassync, which
//! waits until the daemon has written back what is pending and exited.
//! mount(8) writes an entry only when it is given options such as `_netdev`
//! or `x-*`, so a root mount writes its own (with those options, or
//! `x-nassync` when there are none). umount(8) removes the entry; the
//! daemon removes a stale one when it was unmounted some other way.
//!
//! The format and the locking are libmount's: one line per mount of
//! `KEY=VALUE` fields with spaces escaped in octal, changed under flock(2)
//! of `utab.lock` by writing a new file and renaming it over the old.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Where libmount keeps utab on Linux.
pub const RUN_MOUNT: &str = "/run/mount";

/// What an entry says when the mount had no option for utab.
const MARKER: &str = "x-nassync";

/// libmount's escaping: space, tab, newline and backslash in octal.
fn mangle(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ').find_map(|f| f.strip_prefix(key))
}

/// Holds utab.lock while alive.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(dir: &Path) -> io::Result<Lock> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("utab.lock"))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Lock { _file: f })
    }
}

fn read(dir: &Path) -> io::Result<Vec<String>> {
    match fs::read_to_string(dir.join("utab")) {
        Ok(t) => Ok(t.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn write(dir: &Path, lines: &[String]) -> io::Result<()> {
    let tmp = dir.join(format!("utab.nassync.{}", std::process::id()));
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        for l in lines {
            writeln!(f, "{l}")?;
        }
        f.sync_all()?;
        fs::rename(&tmp, dir.join("utab"))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Adds an entry for `target` in `dir`'s utab unless there is one already
/// (mount(8) may be about to write its own; it keeps ours then). Returns
/// whether it wrote one.
pub fn register_in(
    dir: &Path,
    source: &str,
    target: &Path,
    options: &[String],
) -> io::Result<bool> {
    fs::create_dir_all(dir)?;
    let _lock = Lock::take(dir)?;
    let mut lines = read(dir)?;
    let t = mangle(&target.to_string_lossy());
    if lines
        .iter()
        .any(|l| field(l, "TARGET=") == Some(t.as_str()))
    {
        return Ok(false);
    }
    let opts = if options.is_empty() {
        MARKER.to_string()
    } else {
        options.join(",")
    };
    lines.push(format!(
        "SRC={} TARGET={t} ROOT=/ OPTS={}",
        mangle(source),
        mangle(&opts)
    ));
    write(dir, &lines)?;
    Ok(true)
}

/// Removes the entries for `target` in `dir`'s utab, if nothing is mounted
/// there any more (a new mount there has its own entry).
pub fn unregister_in(dir: &Path, target: &Path) -> io::Result<()> {
    if !dir.join("utab").exists() || crate::mountinfo::mounted_at(target).is_some() {
        return Ok(());
    }
    let _lock = Lock::take(dir)?;
    let lines = read(dir)?;
    let t = mangle(&target.to_string_lossy());
    let kept: Vec<String> = lines
        .iter()
        .filter(|l| field(l, "TARGET=") != Some(t.as_str()))
        .cloned()
        .collect();
    if kept.len() != lines.len() {
        write(dir, &kept)?;
    }
    Ok(())
}

/// [`register_in`] /run/mount, as root only (a user's mount(8) with the
/// `user` option writes its own entry; users cannot write there).
pub fn register(source: &str, target: &Path, options: &[String]) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    if let Err(e) = register_in(Path::new(RUN_MOUNT), source, target, options) {
        log::warn!(
            "cannot record the mount in {RUN_MOUNT}/utab ({e}): umount(8) will not wait \
             for pending write-back; `nassync umount` does"
        );
    }
}

pub fn unregister(target: &Path) {
    if nix::unistd::geteuid().is_root() {
        if let Err(e) = unregister_in(Path::new(RUN_MOUNT), target) {
            log::warn!("cannot update {RUN_MOUNT}/utab: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_added_once_escaped_and_removed() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("utab"),
            "SRC=a TARGET=/other ROOT=/ OPTS=x-y\n",
        )
        .unwrap();
        let t = Path::new("/never/mounted here");
        assert!(register_in(d.path(), "/nas share", t, &[]).unwrap());
        assert!(!register_in(d.path(), "/nas share", t, &["_netdev".into()]).unwrap());
        let text = fs::read_to_string(d.path().join("utab")).unwrap();
        assert_eq!(
            text,
            "SRC=a TARGET=/other ROOT=/ OPTS=x-y\n\
             SRC=/nas\\040share TARGET=/never/mounted\\040here ROOT=/ OPTS=x-nassync\n"
        );
        unregister_in(d.path(), t).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("utab")).unwrap(),
            "SRC=a TARGET=/other ROOT=/ OPTS=x-y\n"
        );
        let t2 = Path::new("/x");
        register_in(
            d.path(),
            "s",
            t2,
            &["_netdev".into(), "x-systemd.automount".into()],
        )
        .unwrap();
        assert!(
            fs::read_to_string(d.path().join("utab"))
                .unwrap()
                .ends_with("TARGET=/x ROOT=/ OPTS=_netdev,x-systemd.automount\n")
        );
    }

    #[test]
    fn a_mounted_target_keeps_its_entry() {
        let d = tempfile::tempdir().unwrap();
        register_in(d.path(), "proc", Path::new("/proc"), &[]).unwrap();
        unregister_in(d.path(), Path::new("/proc")).unwrap();
        assert!(
            fs::read_to_string(d.path().join("utab"))
                .unwrap()
                .contains("TARGET=/proc ")
        );
    }
}
