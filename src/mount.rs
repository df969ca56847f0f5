//! Mounting: checks everything before anything is mounted, then runs the
//! daemon, attached (`--foreground`, for systemd and debugging) or detached
//! (the command returns once the mount is ready, or fails with the reason).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::backend::Backend;
use crate::backend::bounded::BoundedBackend;
use crate::backend::dir::DirBackend;
use crate::backend::instrumented::Instrumented;
use crate::backend::nfs::source::{NfsSource, is_nfs};
use crate::backend::nfs::{NfsBackend, NfsOptions};
use crate::backend::overlay::Overlay;
use crate::cache::CacheError;
use crate::cache::disk::DiskCache;
use crate::control;
use crate::data::DataCache;
use crate::fs::{Core, FsConfig};
use crate::fuse::FuseFs;
use crate::mountinfo;
use crate::options::MountOptions;
use crate::stats::Stats;
use crate::writeback::journal::Journal;
use crate::writeback::{Staged, WbConfig, WriteBack};

/// Exit status of a failed mount, as mount(8) uses it.
pub const EXIT_MOUNT_FAILURE: i32 = 32;
/// Exit status of a bad command line or option.
pub const EXIT_USAGE: i32 = 1;
/// The daemon exited with changes still in the journal (EX_TEMPFAIL).
pub const EXIT_PENDING: i32 = 75;

/// The environment variable that carries the readiness pipe to the daemon.
const READY_FD_ENV: &str = "NASSYNC_READY_FD";

/// How many cache directories a source may use at once without cache_dir=
/// (one per daemon: mounts of the same source at several mount points).
const DEFAULT_CACHE_DIRS: u32 = 16;

/// A mount request, checked.
#[derive(Debug)]
pub struct Plan {
    /// The source as shown: a directory, or an NFS share in its canonical
    /// `nfs://` form.
    pub source: PathBuf,
    /// The NFS share, when the source is one.
    pub nfs: Option<NfsSource>,
    pub mountpoint: PathBuf,
    pub options: MountOptions,
    /// This source's own directory under `cache_dir`.
    pub cache_dir: PathBuf,
}

impl Plan {
    /// The cache directories this mount may use, in order. A directory is
    /// locked by one daemon, so a second mount of the same source needs
    /// another: with cache_dir= given, the one it names is the only choice
    /// (a second mount fails, saying so); without it, the source's own
    /// directory is followed by siblings "NAME+2", "NAME+3", ... ('+' never
    /// appears in an escaped source name, so no other source's directory
    /// can be taken).
    pub fn cache_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.cache_dir.clone()];
        if self.options.cache_dir.is_none() {
            let name = self.cache_dir.file_name().unwrap_or_default();
            for n in 2..=DEFAULT_CACHE_DIRS {
                let mut sibling = name.to_os_string();
                sibling.push(format!("+{n}"));
                dirs.push(self.cache_dir.with_file_name(sibling));
            }
        }
        dirs
    }
}

/// A failure with the exit status it calls for.
#[derive(Debug)]
pub struct MountError {
    pub status: i32,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for MountError {
    fn from(e: E) -> Self {
        MountError {
            status: EXIT_MOUNT_FAILURE,
            error: e.into(),
        }
    }
}

fn default_cache_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/nassync");
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("nassync");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/nassync"),
        None => std::env::temp_dir().join(format!("nassync-cache-{}", nix::unistd::geteuid())),
    }
}

/// A file name for a source path: '/' becomes '-', anything unusual %XX.
fn escape_source(source: &Path) -> String {
    let bytes = source.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    if bytes.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for &b in bytes {
        match b {
            b'/' => out.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The mode of `path`, without triggering an automount on it (systemd's
/// autofs placeholder would wait for this very mount).
fn stat_no_automount(path: &Path) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let r = unsafe { libc::fstatat(libc::AT_FDCWD, c.as_ptr(), &mut st, libc::AT_NO_AUTOMOUNT) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_mode)
}

/// Runs `f` on a thread of its own and waits for it at most `limit`: a
/// call stuck in a hung NFS mount is left behind (the process can still
/// exit: NFS waits are killable).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nas-check".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(limit).ok()
}

/// Checks the request without changing anything: options, source, mount
/// point. The cache directory is checked when it is opened.
pub fn plan(
    source: &Path,
    mountpoint: &Path,
    options: &[String],
    sloppy: bool,
) -> Result<Plan, MountError> {
    let options = MountOptions::parse_sloppy(options, sloppy).map_err(|e| MountError {
        status: EXIT_USAGE,
        error: e.into(),
    })?;
    let nfs = match source.to_str() {
        Some(s) if is_nfs(s) => Some(NfsSource::parse(s).map_err(|e| MountError {
            status: EXIT_USAGE,
            error: e.into(),
        })?),
        _ => None,
    };
    let source = match &nfs {
        Some(n) => {
            // Reached now, so that a wrong host or export fails the mount
            // with the server's answer.
            NfsBackend::connect(n, &nfs_options(&options))
                .with_context(|| format!("source {n}"))?;
            PathBuf::from(n.to_string())
        }
        None => check_dir_source(source, &options)?,
    };
    let mountpoint = match stat_no_automount(mountpoint) {
        Ok(mode) if mode & libc::S_IFMT == libc::S_IFDIR => mountpoint
            .canonicalize()
            .with_context(|| format!("mount point {}", mountpoint.display()))?,
        Ok(_) => {
            return Err(anyhow!("mount point {} is not a directory", mountpoint.display()).into());
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(anyhow!(
                "mount point {} is a stale mount whose daemon is gone; \
                 run `nassync umount {0}` (or `umount -l {0}`) first",
                mountpoint.display()
            )
            .into());
        }
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("mount point {}", mountpoint.display()))
                .into());
        }
    };
    if let Some(m) = mountinfo::mounted_at(&mountpoint) {
        // systemd's automount puts autofs there first: mount on top of it.
        if m.fstype != "autofs" {
            return Err(anyhow!(
                "{} is already mounted ({} from {})",
                mountpoint.display(),
                m.fstype,
                m.source
            )
            .into());
        }
    }
    if nfs.is_none() && mountpoint.starts_with(&source) && mountpoint != source {
        // Allowed by the kernel, but nassync would see itself in the NAS.
        return Err(anyhow!(
            "mount point {} is inside the source {}",
            mountpoint.display(),
            source.display()
        )
        .into());
    }
    let cache_dir = options
        .cache_dir
        .clone()
        .unwrap_or_else(default_cache_root)
        .join(escape_source(&source));
    Ok(Plan {
        source,
        nfs,
        mountpoint,
        options,
        cache_dir,
    })
}

/// The source directory (normally the NAS's kernel NFS mount), which may
/// not answer at all: checked within `timeo`, and made canonical.
fn check_dir_source(source: &Path, options: &MountOptions) -> Result<PathBuf, MountError> {
    let src = source.to_path_buf();
    let checked = within(options.timeo, move || {
        let meta = std::fs::metadata(&src)?;
        Ok::<_, std::io::Error>((meta.is_dir(), src.canonicalize()?))
    })
    .ok_or_else(|| {
        anyhow!(
            "source {}: no answer within timeo={:?} (is the NAS reachable?)",
            source.display(),
            options.timeo
        )
    })?;
    let (is_dir, canonical) = checked.with_context(|| format!("source {}", source.display()))?;
    if !is_dir {
        return Err(anyhow!("source {} is not a directory", source.display()).into());
    }
    Ok(canonical)
}

fn nfs_options(o: &MountOptions) -> NfsOptions {
    NfsOptions {
        timeo: o.timeo,
        nconnect: o.nconnect,
        resvport: o.resvport,
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cache directory {} cannot be created", dir.display()))
}

/// Mounts in the background: starts the daemon attached to a readiness
/// pipe and returns once it reports the mount ready, or its error.
pub fn mount_detached(plan: &Plan, args: &[OsString]) -> Result<(), MountError> {
    // The daemon's log goes where its cache will be: the first directory
    // no other daemon holds (the daemon chooses again, the same way).
    let dirs = plan.cache_dirs();
    let cache_dir = dirs
        .iter()
        .find(|d| !DiskCache::in_use(d))
        .unwrap_or(&dirs[0]);
    create_private_dir(cache_dir)?;
    let log_path = cache_dir.join("daemon.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cache directory {} is not writable", cache_dir.display()))?;
    // Under systemd (a .mount unit runs mount(8), which runs us), stderr is
    // the journal: the daemon keeps it, so journalctl has its log.
    // Otherwise it logs to daemon.log (a terminal or a pipe must not be
    // held open by the daemon).
    let log = if stderr_is_journal() {
        Stdio::inherit()
    } else {
        Stdio::from(log)
    };
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let tx_raw = tx.into_raw_fd();
    let exe = std::env::current_exe().context("cannot find the nassync executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--foreground")
        .env(READY_FD_ENV, tx_raw.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Keep the pipe's write end across exec.
            let flags = libc::fcntl(tx_raw, libc::F_GETFD);
            libc::fcntl(tx_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let child = cmd.spawn();
    // SAFETY: we own tx_raw; closing our copy lets EOF through when the
    // daemon exits without a word.
    drop(unsafe { OwnedFd::from_raw_fd(tx_raw) });
    let mut child = child.context("cannot start the daemon")?;
    let mut msg = String::new();
    std::fs::File::from(rx).read_to_string(&mut msg)?;
    if msg.starts_with("ready") {
        return Ok(());
    }
    let status = child.wait().ok();
    match msg.strip_prefix("error: ") {
        Some(e) => Err(MountError {
            status: EXIT_MOUNT_FAILURE,
            error: anyhow!("{}", e.trim_end()),
        }),
        None => Err(MountError {
            status: EXIT_MOUNT_FAILURE,
            error: anyhow!(
                "the daemon exited during startup ({status:?}); see {}",
                log_path.display()
            ),
        }),
    }
}

/// Whether stderr is systemd's journal stream ($JOURNAL_STREAM names the
/// device and inode of the journal's socket).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    want.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// Where the daemon tells a waiting `nassync mount` how startup went.
struct Ready(Option<std::fs::File>);

impl Ready {
    fn from_env() -> Ready {
        let fd = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        // SAFETY: the parent passed us this descriptor for this purpose.
        Ready(fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) }))
    }

    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Runs the daemon in this process until the filesystem is unmounted.
pub fn run_foreground(plan: Plan) -> Result<(), MountError> {
    let mut ready = Ready::from_env();
    // SAFETY: unset before any thread exists.
    unsafe { std::env::remove_var(READY_FD_ENV) };
    match serve(plan, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            ready.send(&format!("error: {:#}\n", e.error));
            Err(e)
        }
    }
}

/// Every inode the kernel holds is an open descriptor (O_PATH) on the NAS,
/// so the limit is raised as far as allowed: to the system's maximum for
/// root (fs.nr_open), to the hard limit otherwise.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let max = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if max > hard && setrlimit(Resource::RLIMIT_NOFILE, max, max).is_ok() {
        return;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
}

/// The most inodes held before the kernel is asked to drop names: each
/// is a descriptor (see `raise_fd_limit`), and a quarter of the limit, or
/// 1,024 (at most half), is left for files open, pending files, the
/// journal and the caches.
fn max_inodes() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    let spare = (soft / 4).max(1024.min(soft / 2));
    (soft - spare) as usize
}

fn serve(plan: Plan, ready: &mut Ready) -> Result<(), MountError> {
    use nix::sys::signal::{SigSet, Signal};
    let o = &plan.options;
    // Signals are taken by one thread (below); every other thread,
    // including fuser's, inherits this mask.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        signals.add(s);
    }
    signals.thread_block()?;
    raise_fd_limit();
    // Modes come from the kernel with the caller's umask applied already.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());

    let stats = Arc::new(Stats::default());
    let disk = if o.cache_size > 0 {
        Some(open_disk_cache(&plan)?)
    } else {
        None
    };
    match &plan.nfs {
        Some(n) => {
            let inner =
                NfsBackend::connect(n, &nfs_options(o)).with_context(|| format!("source {n}"))?;
            serve_on(&plan, ready, signals, stats, disk, inner)
        }
        None => {
            let src = plan.source.clone();
            let inner = within(o.timeo, move || DirBackend::new(&src))
                .ok_or_else(|| {
                    anyhow!(
                        "source {}: no answer within timeo={:?} (is the NAS reachable?)",
                        plan.source.display(),
                        o.timeo
                    )
                })?
                .with_context(|| format!("source {}", plan.source.display()))?;
            serve_on(&plan, ready, signals, stats, disk, inner)
        }
    }
}

/// The daemon over one kind of NAS.
fn serve_on<B: Backend>(
    plan: &Plan,
    ready: &mut Ready,
    signals: nix::sys::signal::SigSet,
    stats: Arc<Stats>,
    disk: Option<DiskCache>,
    inner: B,
) -> Result<(), MountError> {
    let o = &plan.options;
    let backend = BoundedBackend::new(
        Instrumented::new(inner, stats.clone()),
        o.timeo,
        stats.clone(),
    );
    // The journal lives beside the disk cache this daemon holds.
    let wb_dir = disk
        .as_ref()
        .map(|d| d.root().to_path_buf())
        .unwrap_or_else(|| plan.cache_dir.clone());
    let data = DataCache::new(o.mem_cache_size, disk, o.block_size, 4, stats.clone());
    let cfg = FsConfig {
        attr_timeout: o.attr_timeout,
        attr_timeout_max: o.attr_timeout_max.max(o.attr_timeout),
        entry_timeout: o.entry_timeout,
        entry_timeout_max: o.entry_timeout_max.max(o.entry_timeout),
        negative_timeout: o.negative_timeout,
        readahead: o.readahead,
        uid: o.uid,
        gid: o.gid,
        umask: o.umask,
    };
    let backend = Arc::new(backend);
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    if !o.writeback {
        return serve_core(plan, ready, signals, stats, data, cfg, backend, None);
    }
    let journal = Arc::new(Journal::open(&wb_dir).map_err(|e| anyhow!("{e}"))?);
    // Objects created through the mount exist locally first (overlay.rs).
    let overlay = Overlay::open(backend, journal.clone(), o.writeback_delay, host.clone())
        .map_err(|e| anyhow!("{e}"))?;
    let replay = overlay.clone();
    let parts = WbParts {
        journal,
        host,
        staged: overlay.clone(),
        start: Box::new(move || replay.start()),
        dir: wb_dir,
    };
    serve_core(plan, ready, signals, stats, data, cfg, overlay, Some(parts))
}

/// What write-back needs besides the backend.
struct WbParts {
    journal: Arc<Journal>,
    host: String,
    staged: Arc<dyn Staged>,
    start: Box<dyn FnOnce() -> std::io::Result<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
}

/// The daemon over a backend ready for the core.
#[allow(clippy::too_many_arguments)]
fn serve_core<B: Backend>(
    plan: &Plan,
    ready: &mut Ready,
    signals: nix::sys::signal::SigSet,
    stats: Arc<Stats>,
    data: Arc<DataCache>,
    cfg: FsConfig,
    backend: Arc<B>,
    parts: Option<WbParts>,
) -> Result<(), MountError> {
    let o = &plan.options;
    let mut core = Core::new(backend.clone(), cfg, data.clone(), stats)
        .with_context(|| format!("source {}", plan.source.display()))?;
    let mut ns_start = None;
    let wb_dir = parts.as_ref().map(|p| p.dir.clone()).unwrap_or_default();
    let wb = if let Some(parts) = parts {
        let root = core.root_nas_ino();
        let host = parts.host;
        let wb = WriteBack::open(
            parts.journal,
            backend,
            data,
            WbConfig {
                delay: o.writeback_delay,
                max_dirty: o.max_dirty(),
                host,
            },
            Box::new(move |ino| crate::fs::map_ino(root, ino)),
        )
        .map_err(|e| anyhow!("{e}"))?;
        wb.set_staged(parts.staged);
        ns_start = Some(parts.start);
        core.set_writeback(wb.clone());
        Some(wb)
    } else {
        None
    };
    let core = Arc::new(core);
    if let Some(wb) = &wb {
        let c = Arc::downgrade(&core);
        wb.on_own_ctime(Box::new(move |ino, attr| {
            if let Some(c) = c.upgrade() {
                c.own_ctime_on_nas(ino, attr);
            }
        }));
    }
    let fs = FuseFs::new(core.clone(), o.block_size.min(16 << 20) as u32);
    let mut config = fuser::Config::default();
    config.mount_options = mount_options(plan);
    let is_root = nix::unistd::geteuid().is_root();
    config.acl = match (o.allow_other.unwrap_or(is_root), o.allow_root) {
        (true, _) => fuser::SessionACL::All,
        (false, true) => fuser::SessionACL::RootAndOwner,
        (false, false) => fuser::SessionACL::Owner,
    };
    config.n_threads = Some(o.threads);
    config.clone_fd = true;
    let wants_allow_other = config.acl != fuser::SessionACL::Owner;
    let mount_error = |e: std::io::Error| {
        let denied = e.raw_os_error() == Some(libc::EPERM)
            || e.kind() == std::io::ErrorKind::PermissionDenied;
        let fuse_usable = nix::unistd::access(
            "/dev/fuse",
            nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
        )
        .is_ok();
        let hint = if denied && !fuse_usable {
            " (this user cannot open /dev/fuse: it must be readable and writable by \
             the user, as Debian's fuse3 udev rule makes it, mode 0666)"
        } else if denied && wants_allow_other && !is_root {
            " (allow_other for a user's mount needs user_allow_other in /etc/fuse.conf)"
        } else {
            ""
        };
        anyhow!("cannot mount {}: {e}{hint}", plan.mountpoint.display())
    };
    // As root, nassync mounts /dev/fuse itself: fuser's own mount opens the
    // mount point (which would trigger a systemd automount placeholder and
    // wait on it forever) and unmounts again at exit (which would take the
    // placeholder down). Users go through fusermount3, via fuser.
    let (session, mut unmounter) = if is_root {
        let dev = kernel_mount(plan, &config.acl).map_err(mount_error)?;
        let session = fuser::Session::from_fd(fs, dev, config.acl, config).map_err(|e| {
            let _ = nix::mount::umount2(&plan.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            mount_error(e)
        })?;
        (session, None)
    } else {
        let mut session =
            fuser::Session::new(fs, &plan.mountpoint, &config).map_err(mount_error)?;
        let unmounter = session.unmount_callable();
        (session, Some(unmounter))
    };

    // The kernel's page cache of a file found changed on the NAS is dropped
    // from here (the kernel does not, see `init` in fuse.rs), by a thread
    // of its own: a notification sent while handling a request may wait
    // for pages the kernel holds locked until that request is answered.
    // So are its attributes where a change kept here was refused by the
    // NAS later (see `Core::notice_conflicts`).
    let notifier = session.notifier();
    let (stale_tx, stale_rx) = std::sync::mpsc::channel::<(u64, bool)>();
    let attrs_tx = stale_tx.clone();
    core.data_cache().on_stale(Box::new(move |ino| {
        let _ = stale_tx.send((ino, true));
    }));
    core.on_kernel_attrs_stale(Box::new(move |ino| {
        let _ = attrs_tx.send((ino, false));
    }));
    // Names, when the kernel holds more inodes than the descriptors allow
    // (see `Core::shed_names`): only for a directory source, whose nodes
    // are descriptors; by threads of their own, since the kernel takes
    // the directory's lock for one, which may wait behind a request there:
    // several, each for some directories, so that one waiting for a
    // directory being read does not hold up the names of the others.
    if plan.nfs.is_none() {
        const NAME_THREADS: u64 = 4;
        let mut senders = Vec::new();
        for k in 0..NAME_THREADS {
            let (tx, rx) = std::sync::mpsc::channel::<(u64, std::ffi::OsString)>();
            senders.push(tx);
            let notifier = session.notifier();
            std::thread::Builder::new()
                .name(format!("inval-names-{k}"))
                .spawn(move || {
                    for (parent, name) in rx {
                        // ENOENT: the kernel no longer has it.
                        if let Err(e) = notifier.inval_entry(fuser::INodeNo(parent), &name) {
                            log::debug!("dropping the kernel's name {name:?}: {e}");
                        }
                    }
                })?;
        }
        core.on_too_many_inodes(
            max_inodes(),
            Box::new(move |parent, name| {
                let tx = &senders[(parent % NAME_THREADS) as usize];
                let _ = tx.send((parent, name.to_os_string()));
            }),
        );
        let shed_core = core.clone();
        std::thread::Builder::new()
            .name("shed".into())
            .spawn(move || {
                loop {
                    shed_core.wait_shed(Duration::from_secs(1));
                    shed_core.shed_names();
                    // The kernel's forgets take a moment to come back.
                    std::thread::sleep(Duration::from_millis(100));
                }
            })?;
    }
    let stale_cache = core.data_cache().clone();
    std::thread::Builder::new()
        .name("inval".into())
        .spawn(move || {
            for (ino, data) in stale_rx {
                if !data {
                    // (An offset below 0: the attributes only.)
                    if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), -1, 0) {
                        log::debug!("inode {ino}: dropping the kernel's attributes: {e}");
                    }
                    continue;
                }
                // An open may have dropped them since (without keeping
                // the cache): a late drop could then land amid its writes.
                if !stale_cache.take_kernel_stale(ino) {
                    continue;
                }
                if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
                    log::debug!("inode {ino}: dropping the kernel's page cache: {e}");
                }
            }
        })?;

    // Open files are checked for changes on the NAS as their attributes
    // expire (see `Core::revalidate_open`).
    let open_core = core.clone();
    std::thread::Builder::new()
        .name("revalidate".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                open_core.revalidate_open();
                open_core.notice_conflicts();
            }
        })?;

    // Pins are completed after the mount, then kept current.
    let pin_core = core.clone();
    let pin_every = o.pin_refresh;
    let _ = std::thread::Builder::new()
        .name("pins".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_secs(2).min(pin_every));
            loop {
                crate::pin::refresh(&pin_core);
                std::thread::sleep(pin_every);
            }
        });
    let handler_core = core.clone();
    let source = plan.source.clone();
    let handler: control::Handler = Arc::new(move |cmd: &str, out: &mut dyn Write| {
        let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        match verb {
            "stats" => {
                let _ = out.write_all(stats_text(&handler_core, &source).as_bytes());
            }
            "status" => {
                let _ = out.write_all(status_text(&handler_core).as_bytes());
            }
            "flush" => flush_reply(&handler_core, arg, out),
            "pin" => pin_reply(&handler_core, arg, out),
            "unpin" => match crate::pin::unpin(&handler_core, std::ffi::OsStr::new(arg)) {
                Ok(()) => {
                    let _ = writeln!(out, "done");
                }
                Err(e) => {
                    let _ = writeln!(out, "error {e}");
                }
            },
            other => {
                let _ = writeln!(out, "error unknown command {other:?}");
            }
        }
    });
    let _control = control::Server::start(
        &control::socket_path(&plan.mountpoint),
        &plan.mountpoint,
        handler,
    )
    .map_err(|e| anyhow!("control socket: {e}"));
    let _control = match _control {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("{e}; `nassync stats` will not work for this mount");
            None
        }
    };

    let mountpoint = plan.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                log::info!("{sig}: unmounting {}", mountpoint.display());
                let r = match unmounter.as_mut() {
                    Some(u) => u.unmount(),
                    None => nix::mount::umount2(&mountpoint, nix::mount::MntFlags::empty())
                        .map_err(std::io::Error::from),
                };
                if let Err(e) = r {
                    log::warn!("unmount failed ({e}); detaching lazily");
                    let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        })?;

    log::info!(
        "serving {} at {}",
        plan.source.display(),
        plan.mountpoint.display()
    );
    // So that umount(8) runs umount.fuse.nassync, which waits for the
    // write-back (see utab.rs). Written before mount(8) looks for one.
    if let Some(m) = crate::mountinfo::mounted_at(&plan.mountpoint) {
        crate::utab::register(&m.source, &plan.mountpoint, &o.utab_options);
    }
    ready.send("ready\n");
    let wb_thread = match &wb {
        Some(wb) => Some(wb.start()?),
        None => None,
    };
    let _ns_thread = match ns_start {
        Some(start) => Some(start()?),
        None => None,
    };
    let served = session.run().context("FUSE session");
    log::info!("unmounted {}", plan.mountpoint.display());
    crate::utab::unregister(&plan.mountpoint);
    if let Some(wb) = &wb {
        let (files, bytes) = wb.pending(None);
        if files > 0 {
            log::info!(
                "writing back {files} files ({bytes} bytes) before exiting (at most {:?})",
                o.unmount_flush_timeout
            );
        }
        let (files, bytes) = wb.shutdown(o.unmount_flush_timeout);
        if let Some(t) = wb_thread {
            let _ = t.join();
        }
        if files > 0 {
            return Err(MountError {
                status: EXIT_PENDING,
                error: anyhow!(
                    "{files} files ({bytes} bytes) did not reach the NAS within \
                     unmount_flush_timeout={:?}; they stay in the journal in {} and are \
                     written back at the next mount of {}",
                    o.unmount_flush_timeout,
                    wb_dir.display(),
                    plan.source.display()
                ),
            });
        }
        log::info!("everything written is on the NAS");
    }
    served?;
    Ok(())
}

/// Opens the first of the plan's cache directories that no other daemon
/// holds (see [`Plan::cache_dirs`]).
fn open_disk_cache(plan: &Plan) -> anyhow::Result<DiskCache> {
    let o = &plan.options;
    let dirs = plan.cache_dirs();
    for (i, dir) in dirs.iter().enumerate() {
        match DiskCache::open(dir, o.block_size, o.cache_size) {
            Ok(cache) => {
                if i > 0 {
                    log::info!(
                        "cache directory {} is in use by another nassync daemon \
                         (another mount of {}); using {}",
                        dirs[0].display(),
                        plan.source.display(),
                        dir.display()
                    );
                }
                return Ok(cache);
            }
            Err(CacheError::InUse { .. }) if i + 1 < dirs.len() => continue,
            Err(e @ CacheError::InUse { .. }) if o.cache_dir.is_some() => {
                bail!(
                    "{e} (each mount of a source needs its own cache directory: give \
                     this one another cache_dir=, or leave cache_dir= out and nassync \
                     picks a free one)"
                )
            }
            Err(e @ CacheError::InUse { .. }) => {
                bail!(
                    "{e}, as are the other {} for {}",
                    dirs.len() - 1,
                    plan.source.display()
                )
            }
            Err(e @ CacheError::Setup { .. }) => return Err(e.into()),
            Err(e) => bail!("cache directory {}: {e}", dir.display()),
        }
    }
    unreachable!("the list of cache directories is never empty")
}

/// Mounts a new FUSE connection at the mount point (root only) and returns
/// its /dev/fuse descriptor.
fn kernel_mount(plan: &Plan, acl: &fuser::SessionACL) -> std::io::Result<OwnedFd> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    let dev = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        std::io::Error::other(format!(
            "/dev/fuse: {e} (install fuse3; in a container, pass /dev/fuse in)"
        ))
    })?;
    let o = &plan.options;
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        dev.as_raw_fd()
    );
    if *acl != fuser::SessionACL::Owner {
        data.push_str(",allow_other");
    }
    let flags = kernel_flags(o)
        .into_iter()
        .filter(|(on, _, _)| *on)
        .fold(MsFlags::empty(), |acc, (_, f, _)| acc | f);
    let fsname = o
        .fsname
        .clone()
        .unwrap_or_else(|| plan.source.display().to_string());
    nix::mount::mount(
        Some(fsname.as_str()),
        &plan.mountpoint,
        Some("fuse.nassync"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(dev)
}

fn mount_options(plan: &Plan) -> Vec<fuser::MountOption> {
    use fuser::MountOption as M;
    let o = &plan.options;
    let mut v = vec![
        M::FSName(
            o.fsname
                .clone()
                .unwrap_or_else(|| plan.source.display().to_string()),
        ),
        M::Subtype("nassync".into()),
        M::DefaultPermissions,
    ];
    v.extend(
        kernel_flags(o)
            .into_iter()
            .filter(|(on, _, _)| *on)
            .map(|(_, _, m)| m),
    );
    v
}

/// The per-mount kernel flags, for both ways of mounting: whether the
/// option asks for it, the mount(2) flag, and fuser's option.
fn kernel_flags(o: &MountOptions) -> [(bool, nix::mount::MsFlags, fuser::MountOption); 7] {
    use fuser::MountOption as M;
    use nix::mount::MsFlags as F;
    [
        (o.read_only, F::MS_RDONLY, M::RO),
        (o.nosuid, F::MS_NOSUID, M::NoSuid),
        (o.nodev, F::MS_NODEV, M::NoDev),
        (o.noexec, F::MS_NOEXEC, M::NoExec),
        (o.noatime, F::MS_NOATIME, M::NoAtime),
        (o.sync, F::MS_SYNCHRONOUS, M::Sync),
        (o.dirsync, F::MS_DIRSYNC, M::DirSync),
    ]
}

/// `nassync status`: what is not on the NAS yet, and conflicts.
fn status_text<B: Backend>(core: &Core<B>) -> String {
    use std::os::unix::ffi::OsStrExt;
    let nas = match core.nas_offline_since() {
        None => match core.nas_unfinished_changes() {
            0 => "nas online\n".to_string(),
            // Answering again, but write-back waits until these are done.
            n => format!("nas online\nnas_unfinished_changes {n}\n"),
        },
        Some(since) => {
            let epoch = since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let for_s = since.elapsed().unwrap_or_default().as_secs_f64();
            format!("nas offline\noffline_since {epoch}\noffline_s {for_s:.1}\n")
        }
    };
    let mut nas = nas;
    if let Some(disk) = core.data_cache().disk() {
        for p in disk.pins().unwrap_or_default() {
            let cached = p.cached.min(p.bytes);
            let pct = if p.bytes == 0 {
                100.0
            } else {
                cached as f64 * 100.0 / p.bytes as f64
            };
            nas.push_str(&format!(
                "pin /{} files={} bytes={} cached_bytes={cached} cached={pct:.1}%\n",
                String::from_utf8_lossy(&p.path).replace('\n', "\\n"),
                p.files,
                p.bytes,
            ));
        }
    }
    let Some(wb) = core.writeback() else {
        return format!("writeback off\n{nas}");
    };
    let (pending, conflicts, [written, files, retries, nconflicts]) = wb.status();
    let bytes: u64 = pending.iter().map(|p| p.bytes).sum();
    let oldest = pending.iter().map(|p| p.age).max().unwrap_or_default();
    let mut out = format!(
        "writeback on\npending_files {}\npending_bytes {bytes}\noldest_pending_s {:.1}\n\
         written_bytes {written}\nwritten_files {files}\nretries {retries}\nconflicts {nconflicts}\n{nas}",
        pending.len(),
        oldest.as_secs_f64()
    );
    let esc = |p: &std::ffi::OsStr| String::from_utf8_lossy(p.as_bytes()).replace('\n', "\\n");
    for p in &pending {
        out.push_str(&format!(
            "pending {} bytes={} age_s={:.1} state={} attempts={}",
            esc(&p.path),
            p.bytes,
            p.age.as_secs_f64(),
            p.phase,
            p.attempts
        ));
        if let Some(k) = p.new {
            out.push_str(&format!(" new={k}"));
        }
        if let Some(k) = p.removed {
            out.push_str(&format!(" removed={k}"));
        }
        if let Some(k) = p.attrs {
            out.push_str(&format!(" attrs={k}"));
        }
        if let Some((k, to, link)) = &p.moved {
            let what = if *link { "linked" } else { "moved" };
            out.push_str(&format!(" {what}={k} to={}", esc(to)));
        }
        if let Some(e) = &p.error {
            out.push_str(&format!(" error={e:?}"));
        }
        out.push('\n');
    }
    for c in &conflicts {
        let at =
            c.at.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
        out.push_str(&format!(
            "conflict {} kept_as={} at={at} reason={:?}\n",
            esc(&c.path),
            esc(&c.kept_as),
            c.reason
        ));
    }
    out
}

/// `nassync flush [PATH]`: streams `progress FILES BYTES` lines, then
/// `done`.
fn flush_reply<B: Backend>(core: &Core<B>, arg: &str, out: &mut dyn Write) {
    let Some(wb) = core.writeback() else {
        let _ = writeln!(out, "done 0 0");
        return;
    };
    let prefix = arg.trim_matches('/');
    let prefix = (!prefix.is_empty()).then(|| std::ffi::OsStr::new(prefix));
    let mut last = std::time::Instant::now() - Duration::from_secs(1);
    let left = wb.flush(prefix, None, &mut |files, bytes| {
        if last.elapsed() < Duration::from_millis(200) {
            return true;
        }
        last = std::time::Instant::now();
        writeln!(out, "progress {files} {bytes}").is_ok()
    });
    core.notice_conflicts();
    if left.0 > 0 && core.nas_offline_since().is_some() {
        let _ = writeln!(
            out,
            "error the NAS is offline: {} files ({} bytes) stay pending and are written back \
             when it answers again",
            left.0, left.1
        );
    } else if left.0 > 0 && core.nas_unfinished_changes() > 0 {
        let _ = writeln!(
            out,
            "error {} earlier NAS calls that change it have not finished (the NAS stopped \
             answering them): {} files ({} bytes) stay pending until they have",
            core.nas_unfinished_changes(),
            left.0,
            left.1
        );
    } else if left.0 > 0 {
        // The NAS answered but refused: say why, as `status` would.
        let (pending, _, _) = wb.status();
        if let Some(p) = pending
            .iter()
            .find(|p| p.error.is_some() && crate::writeback::under(&p.path, prefix))
        {
            let _ = writeln!(
                out,
                "error {} files ({} bytes) still pending; the NAS refused {:?}: {} \
                 (retried in the background; see nassync status)",
                left.0,
                left.1,
                p.path,
                p.error.as_deref().unwrap_or_default()
            );
        }
    }
    let _ = writeln!(out, "done {} {}", left.0, left.1);
}

/// `nassync pin PATH`: streams `progress FILES BYTES TOTAL_FILES
/// TOTAL_BYTES` lines, then `done FILES BYTES` or `error MESSAGE`.
fn pin_reply<B: Backend>(core: &Core<B>, arg: &str, out: &mut dyn Write) {
    let mut last = std::time::Instant::now() - Duration::from_secs(1);
    let mut report = |p: crate::pin::PinProgress| {
        if last.elapsed() < Duration::from_millis(200) {
            return true;
        }
        last = std::time::Instant::now();
        writeln!(
            out,
            "progress {} {} {} {}",
            p.files, p.bytes, p.total_files, p.total_bytes
        )
        .is_ok()
    };
    let r = crate::pin::pin(core, std::ffi::OsStr::new(arg), &mut report);
    match r {
        Ok(p) => {
            let _ = writeln!(out, "done {} {}", p.files, p.bytes);
        }
        Err(e) => {
            let _ = writeln!(out, "error {e}");
        }
    }
}

fn stats_text<B: Backend>(core: &Core<B>, source: &Path) -> String {
    let mut out = format!("source {}\npid {}\n", source.display(), std::process::id());
    let data = core.data_cache();
    if let Some(d) = data.disk() {
        out.push_str(&format!("cache_dir {}\n", d.root().display()));
    }
    out.push_str(&core.stats().render());
    out.push_str(&format!("mem_cache_bytes {}\n", data.mem_bytes()));
    if let Some(d) = data.disk() {
        out.push_str(&format!("disk_cache_bytes {}\n", d.used_bytes()));
        out.push_str(&format!("disk_corrupt_blocks {}\n", d.corrupt_blocks()));
        out.push_str(&format!("disk_evicted_bytes {}\n", d.evicted_bytes()));
    }
    out.push_str(&format!(
        "inodes {}\nhandles {}\n",
        core.inode_count(),
        core.handle_count()
    ));
    out
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
                // A zombie leader whose other threads are still exiting:
                // they may still hold files open on the source (which
                // then cannot be unmounted yet).
                && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |d| d.count() <= 1)
        }
    }
}

/// Unmounts `mountpoint` and waits for its daemon to exit.
pub fn umount(mountpoint: &Path, lazy: bool) -> anyhow::Result<()> {
    let canonical = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    // The daemon's pid, to wait for it after the unmount.
    let pid = control::request(&canonical, "stats").ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("pid ").and_then(|p| p.parse::<u32>().ok()))
    });
    let is_root = nix::unistd::geteuid().is_root();
    if is_root {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        nix::mount::umount2(&canonical, flags).map_err(|e| match e {
            nix::errno::Errno::EBUSY => anyhow!(
                "{} is busy (files are open on it); close them, or use --lazy",
                canonical.display()
            ),
            nix::errno::Errno::EINVAL => anyhow!("{} is not mounted", canonical.display()),
            e => anyhow!("cannot unmount {}: {e}", canonical.display()),
        })?;
    } else {
        let mut cmd = Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let status = cmd
            .arg(&canonical)
            .status()
            .context("cannot run fusermount3 (install fuse3)")?;
        if !status.success() {
            bail!("fusermount3 -u {} failed", canonical.display());
        }
    }
    let Some(pid) = pid else {
        return Ok(()); // no daemon answered: nothing to wait for
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !exited(pid) {
        if std::time::Instant::now() > deadline {
            bail!(
                "unmounted {}, but its daemon (pid {pid}) has not exited after 60 s",
                canonical.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// umount waits for a daemon whose first thread has exited while
    /// another still runs (it may hold files open on the source).
    #[test]
    fn a_process_is_not_exited_while_a_thread_of_it_runs() {
        // The leader leaves with exit(2), not exit_group(2): the other
        // thread goes on sleeping, then the process ends.
        let script = format!(
            "import threading, time, ctypes\n\
             t = threading.Thread(target=time.sleep, args=(2,))\n\
             t.start()\n\
             ctypes.CDLL(None).syscall({}, 0)\n",
            libc::SYS_exit
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .spawn()
            .expect("python3");
        let pid = child.id();
        let zombie_leader = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        };
        let t0 = std::time::Instant::now();
        while !zombie_leader() {
            assert!(t0.elapsed().as_secs() < 20, "the leader never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let early = exited(pid);
        let t1 = std::time::Instant::now();
        while !exited(pid) {
            assert!(t1.elapsed().as_secs() < 20, "never seen as exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = child.wait().unwrap();
        assert!(!early, "seen as exited while its other thread ran");
        assert!(status.success(), "{status}");
    }

    #[test]
    fn a_source_without_cache_dir_may_use_siblings() {
        let plan = |cache_dir: Option<&str>| Plan {
            nfs: None,
            source: PathBuf::from("/srv/nas"),
            mountpoint: PathBuf::from("/mnt"),
            options: MountOptions {
                cache_dir: cache_dir.map(PathBuf::from),
                ..MountOptions::default()
            },
            cache_dir: PathBuf::from(cache_dir.unwrap_or("/var/cache/nassync")).join("srv-nas"),
        };
        assert_eq!(
            plan(Some("/c")).cache_dirs(),
            vec![PathBuf::from("/c/srv-nas")]
        );
        let dirs = plan(None).cache_dirs();
        assert_eq!(dirs.len(), DEFAULT_CACHE_DIRS as usize);
        assert_eq!(dirs[0], PathBuf::from("/var/cache/nassync/srv-nas"));
        assert_eq!(dirs[1], PathBuf::from("/var/cache/nassync/srv-nas+2"));
        // No escaped source name has a '+': a sibling is nobody else's.
        assert!(!escape_source(Path::new("/srv/nas+2")).contains('+'));
    }

    #[test]
    fn source_names_are_file_names() {
        assert_eq!(escape_source(Path::new("/mnt/nas-nfs")), "mnt-nas%2Dnfs");
        assert_eq!(escape_source(Path::new("/")), "-");
        assert_eq!(escape_source(Path::new("/a b/c")), "a%20b-c");
    }
}
