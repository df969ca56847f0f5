//! The command-line definitions of `nassync` and of the mount helper, in
//! one place: the binaries parse with them, and the man pages and shell
//! completions are generated from them (`nassync generate-assets`).

use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command, CommandFactory, Parser, Subcommand};

use crate::options::OPTIONS;

/// Every mount option with its default, for `--help` and the man pages.
pub fn options_help() -> String {
    let mut s = String::from("Mount options (-o, comma-separated; see docs/OPTIONS.md):\n");
    for (name, default, what) in OPTIONS {
        s.push_str(&format!("  {name:<24} {what} [default: {default}]\n"));
    }
    s.push_str(
        "  defaults, auto, noauto, user, users, nofail, _netdev, comment=..., x-*\n\
         \x20                          accepted and ignored (for mount, fstab and systemd)\n\n\
         Exit status: 0 mounted and ready; 1 bad command line or option; 32 mount failure.",
    );
    s
}

#[derive(Parser, Debug)]
#[command(
    name = "nassync",
    version,
    about = "A local, cached view of a NAS share over FUSE",
    long_about = "nassync presents a NAS share (normally the kernel NFS mount of it) as a \
                  local directory: reads come from a block cache in memory and on local disk, \
                  metadata is cached under NFS-like time limits and revalidated at open."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount SOURCE (a directory, normally the NAS's NFS mount, or the NFS share
    /// itself: nfs://HOST/EXPORT or HOST:/EXPORT) at MOUNTPOINT.
    ///
    /// Returns once the mount is ready (exit 0), or prints why it failed
    /// (exit 1 for a bad option, 32 for a mount failure) with nothing left
    /// mounted.
    #[command(after_long_help = options_help())]
    Mount {
        source: PathBuf,
        mountpoint: PathBuf,
        /// Comma-separated mount options, e.g. cache_size=20G,actimeo=3 (see below)
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay attached to the terminal and log to stderr (for systemd).
        #[arg(short = 'f', long)]
        foreground: bool,
        /// Skip unknown options with a warning instead of refusing them
        /// (mount's -s). Bad values of known options are still refused.
        #[arg(long)]
        sloppy: bool,
        /// Check the source, mount point and options, then exit without
        /// mounting (mount's -f).
        #[arg(long)]
        check: bool,
    },
    /// Unmount MOUNTPOINT and wait for its daemon to exit.
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if files are open; finish when they are closed.
        #[arg(short = 'l', long)]
        lazy: bool,
    },
    /// Show the counters of the mount at MOUNTPOINT (cache hits and misses,
    /// NAS bytes read and written, operations).
    Stats { mountpoint: PathBuf },
    /// Show what is not on the NAS yet (files, bytes, age of the oldest
    /// change, errors and retries) and the conflicts found, for the mount
    /// at MOUNTPOINT.
    Status { mountpoint: PathBuf },
    /// Write back everything pending now, and return when it is on the
    /// NAS: for every nassync mount, or only for files under PATH. Shows a
    /// progress bar on a terminal.
    Flush { path: Option<PathBuf> },
    /// Make files available offline: fetch each PATH (a file, or a
    /// directory and everything under it) whole into the disk cache and
    /// keep it there regardless of eviction; pinned files changed on the
    /// NAS are fetched again (pin_refresh). Shows a progress bar on a
    /// terminal; `nassync status` lists pins and how much of each is cached.
    Pin {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Undo `nassync pin PATH`: the files stay cached until evicted.
    Unpin {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

/// `mount.fuse.nassync SOURCE DIR [-sfnv] [-o OPTIONS]`, as mount(8) calls it.
pub fn helper_command() -> Command {
    Command::new("mount.fuse.nassync")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Mount helper for nassync: lets mount(8) and /etc/fstab mount type fuse.nassync")
        .long_about(
            "mount(8) runs this helper for `mount -t fuse.nassync SOURCE DIR` and for fstab \
             lines of type fuse.nassync. It hands the mount to `nassync mount`, which returns \
             once the mount is ready, so that systemd orders units correctly.",
        )
        .arg(Arg::new("source").required(true).help("The NAS share: a directory (normally the NAS's NFS mount), nfs://HOST/EXPORT or HOST:/EXPORT"))
        .arg(Arg::new("dir").required(true).help("The mount point"))
        .arg(
            Arg::new("options")
                .short('o')
                .action(ArgAction::Append)
                .value_name("OPTIONS")
                .help("Comma-separated mount options (see below)"),
        )
        .arg(Arg::new("sloppy").short('s').action(ArgAction::SetTrue).help("Ignore unknown options"))
        .arg(Arg::new("fake").short('f').action(ArgAction::SetTrue).help("Check everything, mount nothing"))
        .arg(Arg::new("nomtab").short('n').action(ArgAction::SetTrue).help("Accepted for mount(8); there is no mtab to write"))
        .arg(Arg::new("verbose").short('v').action(ArgAction::SetTrue).help("Say what is run"))
        .after_long_help(format!(
            "{}\n\nExit status follows mount(8): 0 success, 1 incorrect invocation or option, 32 mount failure.",
            options_help()
        ))
}

/// `umount.fuse.nassync DIR [-flnrv] [-N NS] [-t TYPE]`, as umount(8) calls
/// it: unmounts and waits for the daemon to finish (the stop path that
/// lets systemd unmount the NAS only after nassync is done with it).
pub fn umount_helper_command() -> Command {
    Command::new("umount.fuse.nassync")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Unmount helper for nassync: umount(8) runs it for type fuse.nassync")
        .arg(Arg::new("dir").required(true).help("The mount point"))
        .arg(
            Arg::new("lazy")
                .short('l')
                .action(ArgAction::SetTrue)
                .help("Detach even if busy"),
        )
        .arg(
            Arg::new("force")
                .short('f')
                .action(ArgAction::SetTrue)
                .help("Accepted; same as a plain unmount"),
        )
        .arg(
            Arg::new("nomtab")
                .short('n')
                .action(ArgAction::SetTrue)
                .help("Accepted; there is no mtab"),
        )
        .arg(
            Arg::new("readonly")
                .short('r')
                .action(ArgAction::SetTrue)
                .help("Accepted; ignored"),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .action(ArgAction::SetTrue)
                .help("Say what is run"),
        )
        .arg(
            Arg::new("namespace")
                .short('N')
                .value_name("NS")
                .help("Accepted; ignored"),
        )
        .arg(
            Arg::new("type")
                .short('t')
                .value_name("TYPE")
                .help("Accepted; ignored"),
        )
}

/// Writes man pages (nassync.1, nassync-SUBCOMMAND.1, mount.fuse.nassync.8)
/// and bash and zsh completions into `dir`.
pub fn generate_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir.join("man"))?;
    std::fs::create_dir_all(dir.join("completions"))?;
    let cmd = Cli::command();
    let write_man = |cmd: Command, name: String, section: &str| -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd).section(section);
        let mut out = Vec::new();
        man.render(&mut out)?;
        std::fs::write(dir.join("man").join(format!("{name}.{section}")), out)
    };
    write_man(cmd.clone(), "nassync".into(), "1")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("nassync-{}", sub.get_name());
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        write_man(sub.clone().name(leaked), name, "1")?;
    }
    write_man(helper_command(), "mount.fuse.nassync".into(), "8")?;
    write_man(umount_helper_command(), "umount.fuse.nassync".into(), "8")?;
    let mut c = Cli::command();
    for (shell, file) in [(Shell::Bash, "nassync.bash"), (Shell::Zsh, "_nassync")] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut c, "nassync", &mut out);
        std::fs::write(dir.join("completions").join(file), out)?;
    }
    Ok(())
}

/// The nassync mount holding `p`, and `p` relative to its root.
fn inside_mount(p: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let canon = p
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let (m, rel) = crate::mountinfo::nassync_mount_of(&canon)
        .ok_or_else(|| anyhow::anyhow!("{} is not inside a nassync mount", p.display()))?;
    Ok((m.mountpoint, rel))
}

/// `nassync pin PATH...`.
pub fn pin(paths: &[PathBuf]) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    for p in paths {
        let (mp, rel) = inside_mount(p)?;
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(p.display().to_string());
            b
        });
        let mut done = None;
        let mut error = None;
        let cmd = format!("pin {}", rel.display());
        crate::control::request_lines(&mp, cmd.trim_end(), None, &mut |line| {
            let mut w = line.split(' ');
            let verb = w.next();
            let n: Vec<u64> = w.filter_map(|x| x.parse().ok()).collect();
            match (verb, n.as_slice()) {
                (Some("progress"), [f, b, tf, tb]) => {
                    if let Some(bar) = &bar {
                        bar.set_length(*tb);
                        bar.set_position(*b);
                        bar.set_message(format!("{f}/{tf} files"));
                    }
                }
                (Some("done"), [f, b]) => done = Some((*f, *b)),
                _ => error = Some(line.strip_prefix("error ").unwrap_or(line).to_string()),
            }
        })?;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        match (done, error) {
            (Some((f, b)), _) => {
                if tty {
                    eprintln!("{}: pinned, {f} files, {b} bytes", p.display());
                }
            }
            (None, Some(e)) => anyhow::bail!("{}: {e}", p.display()),
            (None, None) => anyhow::bail!("{}: the daemon stopped answering", p.display()),
        }
    }
    Ok(())
}

/// `nassync unpin PATH...`.
pub fn unpin(paths: &[PathBuf]) -> anyhow::Result<()> {
    for p in paths {
        let (mp, rel) = inside_mount(p)?;
        let cmd = format!("unpin {}", rel.display());
        let reply = crate::control::request(&mp, cmd.trim_end())?;
        if reply.trim_end() != "done" {
            let e = reply.trim_end();
            anyhow::bail!("{}: {}", p.display(), e.strip_prefix("error ").unwrap_or(e));
        }
    }
    Ok(())
}

/// `nassync flush [PATH]`.
pub fn flush(path: Option<&Path>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let targets: Vec<(PathBuf, PathBuf)> = match path {
        Some(p) => vec![inside_mount(p)?],
        None => crate::mountinfo::nassync_mounts()
            .into_iter()
            .map(|m| (m.mountpoint, PathBuf::new()))
            .collect(),
    };
    let tty = std::io::stderr().is_terminal();
    for (mp, rel) in targets {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(mp.display().to_string());
            b
        });
        let mut total = 0u64;
        let mut left = None;
        let mut error = None;
        let cmd = format!("flush {}", rel.display());
        crate::control::request_lines(&mp, cmd.trim_end(), None, &mut |line| {
            let mut w = line.split(' ');
            let (verb, files, bytes) = (w.next(), w.next(), w.next());
            let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            match verb {
                Some("progress") => {
                    let (f, b) = (num(files), num(bytes));
                    total = total.max(b);
                    if let Some(bar) = &bar {
                        bar.set_length(total);
                        bar.set_position(total - b);
                        bar.set_message(format!("{f} files left"));
                    }
                }
                Some("done") => left = Some((num(files), num(bytes))),
                _ => error = Some(line.to_string()),
            }
        })?;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        match (left, error) {
            (Some((0, _)), _) => {}
            (Some(_), Some(e)) => {
                let e = e.strip_prefix("error ").unwrap_or(&e);
                anyhow::bail!("{}: {e}", mp.display())
            }
            (Some((f, b)), None) => {
                anyhow::bail!("{}: {f} files ({b} bytes) still pending", mp.display())
            }
            (None, Some(e)) => anyhow::bail!("{}: {e}", mp.display()),
            (None, None) => anyhow::bail!("{}: the daemon stopped answering", mp.display()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
        helper_command().debug_assert();
        umount_helper_command().debug_assert();
    }

    #[test]
    fn every_option_is_documented() {
        let doc = include_str!("../docs/OPTIONS.md");
        for (names, _, _) in OPTIONS {
            for name in names.split(", ") {
                let key = name.split('=').next().unwrap();
                assert!(
                    doc.contains(&format!("`{key}")),
                    "{key} is missing from docs/OPTIONS.md"
                );
            }
        }
    }

    #[test]
    fn helper_parses_mount_style_arguments() {
        let m = helper_command()
            .try_get_matches_from([
                "mount.fuse.nassync",
                "/mnt/nas",
                "/home/me/nas",
                "-o",
                "rw,cache_size=20G",
                "-nv",
            ])
            .unwrap();
        assert_eq!(m.get_one::<String>("source").unwrap(), "/mnt/nas");
        assert!(m.get_flag("verbose") && !m.get_flag("fake"));
        assert!(
            helper_command()
                .try_get_matches_from(["mount.fuse.nassync", "only-one"])
                .is_err()
        );
    }

    #[test]
    fn assets_are_generated() {
        let dir = tempfile::tempdir().unwrap();
        generate_assets(dir.path()).unwrap();
        for f in [
            "man/nassync.1",
            "man/nassync-mount.1",
            "man/mount.fuse.nassync.8",
            "completions/nassync.bash",
            "completions/_nassync",
        ] {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(text.len() > 100, "{f}");
        }
        let man = std::fs::read_to_string(dir.path().join("man/nassync-mount.1")).unwrap();
        assert!(
            man.contains("cache_size"),
            "the mount page lists the options"
        );
    }
}
