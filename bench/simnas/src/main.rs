//! simnas: a simulated NAS. A FUSE passthrough of a backing directory that
//! adds per-round-trip latency and a shared bandwidth limit, counts
//! operations and bytes, and can be frozen or made to fail on command through
//! a unix control socket. See README.md.

mod fs;
mod sim;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio, exit};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use fuser::{Config, MountOption, Session, SessionACL};
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, umount2};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::Mode;

use crate::sim::Sim;

/// Set by a daemonizing parent: fd of the pipe on which to report readiness.
const READY_ENV: &str = "SIMNAS_READY_FD";

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    /// 0.5 ms per round trip, 110 MB/s (gigabit Ethernet)
    Lan,
    /// 3 ms per round trip, 12 MB/s
    Wifi,
    /// no latency, unlimited bandwidth
    None,
}

#[derive(Parser)]
#[command(
    name = "simnas",
    version,
    about = "Simulated NAS: FUSE passthrough with injected latency, bandwidth limit, counters and faults",
    after_help = "Control client: simnas ctl SOCKET COMMAND...\n\
                  Commands: stats | reset | freeze | thaw | fail EIO|ENOSPC|EACCES|ESTALE|off | \
                  latency MS | bandwidth MBPS"
)]
struct Cli {
    /// Directory to serve
    backing: PathBuf,
    /// Where to mount it
    mountpoint: PathBuf,
    /// Network profile; --latency-ms / --bandwidth-mbps override its parts
    #[arg(long, value_enum, default_value = "none")]
    profile: Profile,
    /// Latency added to every round trip, in milliseconds
    #[arg(long, allow_negative_numbers = true)]
    latency_ms: Option<f64>,
    /// Shared link bandwidth in MB/s (10^6 bytes/s); 0 = unlimited
    #[arg(long, allow_negative_numbers = true)]
    bandwidth_mbps: Option<f64>,
    /// Unix socket path for the control protocol
    #[arg(long)]
    control: Option<PathBuf>,
    /// FUSE worker threads, i.e. how many round trips can be in flight at once
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Entry/attribute cache TTL handed to the kernel, in seconds
    #[arg(long, default_value_t = 1.0)]
    attr_ttl: f64,
    /// Stay attached; otherwise detach once the mount is ready
    #[arg(long)]
    foreground: bool,
    /// When detaching, send the daemon's stderr here (default /dev/null)
    #[arg(long)]
    log: Option<PathBuf>,
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "ctl") {
        exit(ctl(&args[2..]));
    }
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(&cli) {
        eprintln!("simnas: {e:#}");
        exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let (mut latency, mut bandwidth) = match cli.profile {
        Profile::Lan => (0.5, 110.0),
        Profile::Wifi => (3.0, 12.0),
        Profile::None => (0.0, 0.0),
    };
    latency = cli.latency_ms.unwrap_or(latency);
    bandwidth = cli.bandwidth_mbps.unwrap_or(bandwidth);
    for (flag, v) in [
        ("--latency-ms", latency),
        ("--bandwidth-mbps", bandwidth),
        ("--attr-ttl", cli.attr_ttl),
    ] {
        if !(v.is_finite() && (0.0..1e9).contains(&v)) {
            bail!("{flag} must be a number >= 0");
        }
    }
    if cli.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if !cli.foreground {
        return daemonize(cli);
    }
    let mut ready = take_ready_fd();
    let daemonized = ready.is_some();
    let r = serve(cli, latency, bandwidth, &mut ready, daemonized);
    if let (Err(e), Some(f)) = (&r, ready.as_mut()) {
        let _ = writeln!(f, "err {e:#}");
    }
    r
}

fn take_ready_fd() -> Option<File> {
    let fd: RawFd = std::env::var(READY_ENV).ok()?.parse().ok()?;
    // SAFETY: single-threaded at this point.
    unsafe { std::env::remove_var(READY_ENV) };
    // Keep it out of anything we spawn (fusermount3), or the parent never sees EOF.
    if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Re-exec ourselves with --foreground in a new session and wait until the
/// child reports on a pipe that the mount is up (or why it failed).
fn daemonize(cli: &Cli) -> Result<()> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let stderr = match &cli.log {
        Some(p) => Stdio::from(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("log file {}", p.display()))?,
        ),
        None => Stdio::null(),
    };
    let wfd = wr.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().context("current_exe")?);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env(READY_ENV, wfd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(wfd, libc::F_SETFD, 0) < 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().context("starting the simnas daemon")?;
    drop(cmd);
    drop(wr);
    let mut msg = String::new();
    let _ = rd.read_to_string(&mut msg);
    if msg.starts_with("ok") {
        return Ok(());
    }
    let status = child.wait()?;
    match msg.strip_prefix("err ") {
        Some(m) => bail!("{}", m.trim_end()),
        None => bail!("daemon exited before the mount was ready ({status}); see --log"),
    }
}

fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "user_allow_other"))
}

fn serve(
    cli: &Cli,
    latency: f64,
    bandwidth: f64,
    ready: &mut Option<File>,
    daemonized: bool,
) -> Result<()> {
    let backing = cli
        .backing
        .canonicalize()
        .with_context(|| format!("backing dir {}", cli.backing.display()))?;
    if !backing.is_dir() {
        bail!("backing {} is not a directory", backing.display());
    }
    let mountpoint = cli
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", cli.mountpoint.display()))?;

    // Signals are taken synchronously by a dedicated thread; every thread
    // spawned from here on inherits the blocked mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;

    let sim = Arc::new(Sim::new(latency, bandwidth));
    let control = match &cli.control {
        Some(p) => Some(control_listen(p, sim.clone())?),
        None => None,
    };
    let r = mount_and_run(
        cli,
        &backing,
        &mountpoint,
        sim,
        signals,
        control.clone(),
        ready,
        daemonized,
    );
    if let Some(p) = &control {
        let _ = std::fs::remove_file(p);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn mount_and_run(
    cli: &Cli,
    backing: &Path,
    mountpoint: &Path,
    sim: Arc<Sim>,
    signals: SigSet,
    control: Option<PathBuf>,
    ready: &mut Option<File>,
    daemonized: bool,
) -> Result<()> {
    // SAFETY: plain syscalls. Modes arrive already masked by the kernel, so no
    // umask of our own; fine timer slack so sub-millisecond latencies are honoured.
    unsafe {
        libc::umask(0);
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let fs = fs::SimFs::new(backing, sim.clone(), Duration::from_secs_f64(cli.attr_ttl))?;
    let mut cfg = Config::default();
    cfg.n_threads = Some(cli.threads);
    cfg.clone_fd = true;
    cfg.mount_options = vec![
        MountOption::FSName("simnas".into()),
        MountOption::Subtype("simnas".into()),
        MountOption::DefaultPermissions,
    ];
    // As root we mount /dev/fuse ourselves (type fuse.simnas) and hand the fd
    // to fuser, so that only we decide when to unmount; otherwise fusermount3.
    let root = nix::unistd::geteuid().is_root();
    let (mut session, probe) = if root {
        let dev = mount_fuse(mountpoint)?;
        let probe = dev.try_clone()?;
        match Session::from_fd(fs, dev, SessionACL::All, cfg) {
            Ok(s) => (s, Some(probe)),
            Err(e) => {
                let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
                return Err(e).context("FUSE handshake");
            }
        }
    } else {
        cfg.acl = if user_allow_other() {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let s = Session::new(fs, mountpoint, &cfg)
            .with_context(|| format!("mounting {}", mountpoint.display()))?;
        (s, None)
    };
    let probe_main = probe.as_ref().and_then(|p| p.try_clone().ok());

    let mut unmounter = session.unmount_callable();
    let (ctl_path, mnt) = (control, mountpoint.to_path_buf());
    std::thread::spawn(move || {
        let Ok(sig) = signals.wait() else { return };
        log::info!("{sig}: unmounting {}", mnt.display());
        sim.set_frozen(false);
        let r = match &probe {
            Some(p) if !connected(p) => return, // already unmounted by someone else
            Some(_) => umount2(&mnt, MntFlags::empty()).map_err(std::io::Error::from),
            None => unmounter.unmount(),
        };
        if let Err(e) = r {
            // Busy: detach lazily and go; open files see ENOTCONN once we exit.
            log::warn!("umount {}: {e}; detaching lazily", mnt.display());
            let _ = umount2(&mnt, MntFlags::MNT_DETACH);
            if let Some(p) = ctl_path {
                let _ = std::fs::remove_file(p);
            }
            exit(0);
        }
    });

    if daemonized {
        let _ = std::env::set_current_dir("/");
    }
    if let Some(mut f) = ready.take() {
        let _ = f.write_all(b"ok\n"); // a vanished parent is no reason to stop serving
    }
    log::info!("serving {} at {}", backing.display(), mountpoint.display());
    let r = session.run();
    if r.is_err() && probe_main.as_ref().is_some_and(connected) {
        let _ = umount2(mountpoint, MntFlags::MNT_DETACH); // don't leave a dead mount behind
    }
    r.context("FUSE session")
}

/// Mount a FUSE filesystem at `mnt` (needs root) and return the /dev/fuse fd.
fn mount_fuse(mnt: &Path) -> Result<OwnedFd> {
    let dev = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .context("/dev/fuse")?;
    let rootmode = std::fs::metadata(mnt)?.mode() & libc::S_IFMT;
    let opts = format!(
        "fd={},rootmode={rootmode:o},user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(
        Some("simnas"),
        mnt,
        Some("fuse.simnas"),
        flags,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting {}", mnt.display()))?;
    Ok(dev)
}

/// Whether the FUSE connection behind this /dev/fuse fd is still mounted
/// (after an unmount the device polls as POLLERR).
fn connected(dev: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: dev.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    loop {
        match unsafe { libc::poll(&mut p, 1, 0) } {
            0 => return true,
            n if n > 0 => return p.revents & libc::POLLERR == 0,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// Bind the control socket (owner-only) and serve it from background threads.
fn control_listen(path: &Path, sim: Arc<Sim>) -> Result<PathBuf> {
    let path = std::path::absolute(path)?;
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        if !md.file_type().is_socket() || UnixStream::connect(&path).is_ok() {
            bail!("control socket {} already exists", path.display());
        }
        std::fs::remove_file(&path)?; // stale, from a dead simnas
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let sim = sim.clone();
            std::thread::spawn(move || {
                let Ok(mut out) = conn.try_clone() else {
                    return;
                };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    if !line.trim().is_empty()
                        && out.write_all(sim.command(&line).as_bytes()).is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok(path)
}

/// `simnas ctl SOCKET COMMAND...`: send one command, print the reply.
fn ctl(args: &[OsString]) -> i32 {
    let [sock, cmd @ ..] = args else {
        eprintln!("usage: simnas ctl SOCKET COMMAND...");
        return 2;
    };
    if cmd.is_empty() {
        eprintln!("usage: simnas ctl SOCKET COMMAND...");
        return 2;
    }
    let line: Vec<_> = cmd.iter().map(|s| s.to_string_lossy()).collect();
    let line = line.join(" ");
    let talk = || -> std::io::Result<String> {
        let mut s = UnixStream::connect(sock)?;
        s.write_all(format!("{line}\n").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    match talk() {
        Ok(out) => {
            print!("{out}");
            i32::from(out.is_empty() || out.starts_with("err"))
        }
        Err(e) => {
            eprintln!("simnas ctl: {}: {e}", Path::new(sock).display());
            1
        }
    }
}
