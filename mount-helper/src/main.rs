//! `mount.fuse.nassync SOURCE DIR [-sfnv] [-o OPTIONS]`: the helper that
//! mount(8) runs for `mount -t fuse.nassync` and fstab lines of that type.
//! It hands the mount to `nassync mount`, which returns once the mount is
//! ready (so systemd orders units correctly) and exits with mount's
//! conventions: 1 for a bad invocation or option, 32 for a mount failure.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: mount.fuse.nassync SOURCE DIR [-sfnv] [-o OPTIONS]";

#[derive(Debug, Default, PartialEq)]
struct Invocation {
    source: OsString,
    dir: OsString,
    options: Vec<String>,
    sloppy: bool,
    fake: bool,
    verbose: bool,
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, String> {
    let mut inv = Invocation::default();
    let mut positional = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "-o" {
            let o = args.next().ok_or("-o needs a value")?;
            inv.options.push(o.to_string_lossy().into_owned());
        } else if let Some(o) = s.strip_prefix("-o") {
            inv.options.push(o.to_string());
        } else if s.starts_with('-') && s.len() > 1 {
            for c in s[1..].chars() {
                match c {
                    's' => inv.sloppy = true,
                    'f' => inv.fake = true,
                    'n' => {} // no mtab: the kernel keeps /proc/self/mountinfo
                    'v' => inv.verbose = true,
                    other => return Err(format!("unknown flag -{other}")),
                }
            }
        } else {
            positional.push(a);
        }
    }
    let [source, dir]: [OsString; 2] = positional
        .try_into()
        .map_err(|_| "expected SOURCE and DIR".to_string())?;
    inv.source = source;
    inv.dir = dir;
    Ok(inv)
}

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
    let inv = match parse(std::env::args_os().skip(1)) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("mount.fuse.nassync: {e}\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    let mut cmd = Command::new(nassync());
    cmd.arg("mount").arg(&inv.source).arg(&inv.dir);
    for o in &inv.options {
        cmd.arg("-o").arg(o);
    }
    if inv.sloppy {
        cmd.arg("--sloppy");
    }
    if inv.fake {
        cmd.arg("--check");
    }
    if inv.verbose {
        eprintln!("mount.fuse.nassync: running {cmd:?}");
    }
    let err = cmd.exec();
    eprintln!("mount.fuse.nassync: cannot run nassync: {err}");
    ExitCode::from(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_style_arguments() {
        let i = parse(args(&[
            "/mnt/nas",
            "/home/me/nas",
            "-o",
            "rw,cache_size=20G",
            "-nv",
        ]))
        .unwrap();
        assert_eq!(i.source, "/mnt/nas");
        assert_eq!(i.dir, "/home/me/nas");
        assert_eq!(i.options, vec!["rw,cache_size=20G"]);
        assert!(i.verbose && !i.fake && !i.sloppy);
        let i = parse(args(&["-s", "-f", "a", "b", "-oro"])).unwrap();
        assert!(i.sloppy && i.fake);
        assert_eq!(i.options, vec!["ro"]);
    }

    #[test]
    fn bad_invocations() {
        assert!(parse(args(&["only-one"])).is_err());
        assert!(parse(args(&["a", "b", "c"])).is_err());
        assert!(parse(args(&["a", "b", "-x"])).is_err());
        assert!(parse(args(&["a", "b", "-o"])).is_err());
    }
}
