//! The helpers that mount(8) and umount(8) run for type `fuse.nassync`;
//! one binary, installed as both names:
//!
//! - `mount.fuse.nassync SOURCE DIR [-sfnv] [-o OPTIONS]` hands the mount
//!   to `nassync mount`, which returns once the mount is ready (so systemd
//!   orders units correctly) and exits with mount's conventions: 1 for a bad
//!   invocation or option, 32 for a mount failure.
//! - `umount.fuse.nassync DIR [-lfnrv]` runs `nassync umount`, which
//!   returns only once the daemon has finished and exited, so that what is
//!   mounted under it (the NAS's NFS mount) is stopped after it.
//!
//! The command lines are defined with nassync's (`nassync::cli`), from
//! which the man pages are generated.

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

fn parse(cmd: clap::Command, name: &str) -> Result<clap::ArgMatches, ExitCode> {
    match cmd.try_get_matches() {
        Ok(m) => Ok(m),
        Err(e) if e.use_stderr() => {
            eprint!("{name}: {e}");
            Err(ExitCode::from(1))
        }
        Err(e) => {
            let _ = e.print(); // --help, --version
            Err(ExitCode::SUCCESS)
        }
    }
}

fn run(mut cmd: Command, name: &str, verbose: bool) -> ExitCode {
    if verbose {
        eprintln!("{name}: running {cmd:?}");
    }
    let err = cmd.exec();
    eprintln!("{name}: cannot run nassync: {err}");
    ExitCode::from(32)
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if invoked_as.starts_with("umount") {
        let name = "umount.fuse.nassync";
        let m = match parse(nassync::cli::umount_helper_command(), name) {
            Ok(m) => m,
            Err(code) => return code,
        };
        let dir = m.get_one::<String>("dir").expect("required");
        let mut cmd = Command::new(nassync());
        cmd.arg("umount").arg(dir);
        if m.get_flag("lazy") {
            cmd.arg("--lazy");
        }
        if m.get_flag("verbose") {
            eprintln!("{name}: running {cmd:?}");
        }
        let err = cmd.exec();
        // Without nassync a mount must still come down: unmount it directly
        // (without waiting for the daemon).
        eprintln!("{name}: cannot run nassync ({err}); unmounting {dir} directly");
        let flags = if m.get_flag("lazy") {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        return match nix::mount::umount2(dir.as_str(), flags) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {dir}: {e}");
                ExitCode::from(32)
            }
        };
    }
    let name = "mount.fuse.nassync";
    let m = match parse(nassync::cli::helper_command(), name) {
        Ok(m) => m,
        Err(code) => return code,
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
    run(cmd, name, m.get_flag("verbose"))
}
