//! `mount.fuse.nassync SOURCE DIR [-sfnv] [-o OPTIONS]`: the helper that
//! mount(8) runs for `mount -t fuse.nassync` and fstab lines of that type.
//! It hands the mount to `nassync mount`, which returns once the mount is
//! ready (so systemd orders units correctly) and exits with mount's
//! conventions: 1 for a bad invocation or option, 32 for a mount failure.
//! Its command line is defined with nassync's (`nassync::cli`), from which
//! its man page is generated.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// The nassync binary: $NASSYNC_BIN, beside this helper, or on the PATH.
fn nassync() -> PathBuf {
    if let Some(p) = std::env::var_os("NASSYNC_BIN") {
        return PathBuf::from(p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.parent().map(|d| d.join("nassync")));
    for candidate in beside
        .into_iter()
        .chain(["/usr/bin/nassync", "/usr/local/bin/nassync"].map(PathBuf::from))
    {
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from("nassync")
}

fn main() -> ExitCode {
    let m = match nassync::cli::helper_command().try_get_matches() {
        Ok(m) => m,
        Err(e) if e.use_stderr() => {
            eprint!("mount.fuse.nassync: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let mut cmd = Command::new(nassync());
    cmd.arg("mount")
        .arg(m.get_one::<String>("source").expect("required"))
        .arg(m.get_one::<String>("dir").expect("required"));
    for o in m.get_many::<String>("options").into_iter().flatten() {
        cmd.arg("-o").arg(o);
    }
    if m.get_flag("sloppy") {
        cmd.arg("--sloppy");
    }
    if m.get_flag("fake") {
        cmd.arg("--check");
    }
    if m.get_flag("verbose") {
        eprintln!("mount.fuse.nassync: running {cmd:?}");
    }
    let err = cmd.exec();
    eprintln!("mount.fuse.nassync: cannot run nassync: {err}");
    ExitCode::from(32)
}
