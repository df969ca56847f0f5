//! The `nassync` command.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use nassync::cli::{Cli, Cmd};
use nassync::mount;

fn init_logging(level: Option<log::LevelFilter>) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(l) = level {
        b.filter_level(l);
    }
    b.format_timestamp_millis().init();
}

fn main() -> ExitCode {
    return_big_blocks_to_the_system();
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
        Cmd::GenerateAssets { dir } => match nassync::cli::generate_assets(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nassync: {}: {e}", dir.display());
                ExitCode::from(1)
            }
        },
        Cmd::Status { mountpoint } => {
            let mp = mountpoint.canonicalize().unwrap_or(mountpoint);
            match nassync::control::request(&mp, "status") {
                Ok(text) => print_reply(&text),
                Err(e) => {
                    eprintln!("nassync: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Pin { paths } => match nassync::cli::pin(&paths) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nassync: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Unpin { paths } => match nassync::cli::unpin(&paths) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nassync: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Flush { path } => match nassync::cli::flush(path.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nassync: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Stats { mountpoint } => {
            let mp = mountpoint.canonicalize().unwrap_or(mountpoint);
            match nassync::control::request(&mp, "stats") {
                Ok(text) => print_reply(&text),
                Err(e) => {
                    eprintln!("nassync: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Cache blocks (128 KiB to several MiB) come and go all the time. glibc
/// raises its mmap threshold after the first such block is freed and then
/// serves them from heap arenas that never shrink: the daemon kept about
/// 70 MiB more than `mem_cache_size` after a 1 GiB read (bench/run
/// seqread). A fixed threshold maps each block on its own, and freeing it
/// gives the memory back at once.
fn return_big_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Prints a reply of the daemon.
fn print_reply(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // `nassync status | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nassync: {e}");
            ExitCode::from(1)
        }
    }
}
