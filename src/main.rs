//! The `nassync` command.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nassync::mount;

#[derive(Parser)]
#[command(
    name = "nassync",
    version,
    about = "A local, cached view of a NAS share over FUSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount SOURCE (a directory, normally the NAS's NFS mount) at MOUNTPOINT.
    ///
    /// Returns once the mount is ready (exit 0), or prints why it failed
    /// (exit 1 for a bad option, 32 for a mount failure) with nothing left
    /// mounted. Options are described in docs/OPTIONS.md.
    Mount {
        source: PathBuf,
        mountpoint: PathBuf,
        /// Comma-separated mount options, e.g. cache_size=20G,actimeo=3
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
}

fn init_logging(level: Option<log::LevelFilter>) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(l) = level {
        b.filter_level(l);
    }
    b.format_timestamp_millis().init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Mount {
            source,
            mountpoint,
            options,
            foreground,
            sloppy,
            check,
        } => {
            let plan = match mount::plan(&source, &mountpoint, &options, sloppy) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("nassync: {:#}", e.error);
                    return ExitCode::from(e.status as u8);
                }
            };
            if check {
                return ExitCode::SUCCESS;
            }
            let result = if foreground {
                init_logging(plan.options.log_level);
                mount::run_foreground(plan)
            } else {
                let mut args: Vec<OsString> =
                    vec!["mount".into(), source.into(), mountpoint.into()];
                for o in &options {
                    args.push("-o".into());
                    args.push(o.into());
                }
                if sloppy {
                    args.push("--sloppy".into());
                }
                mount::mount_detached(&plan, &args)
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nassync: {:#}", e.error);
                    ExitCode::from(e.status as u8)
                }
            }
        }
        Cmd::Umount { mountpoint, lazy } => match mount::umount(&mountpoint, lazy) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nassync: {e:#}");
                ExitCode::from(mount::EXIT_MOUNT_FAILURE as u8)
            }
        },
        Cmd::Stats { mountpoint } => {
            let mp = mountpoint.canonicalize().unwrap_or(mountpoint);
            match nassync::control::request(&mp, "stats") {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nassync: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
