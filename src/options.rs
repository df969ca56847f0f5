//! Mount options (`-o a,b=c`): parsed and checked before anything is
//! mounted or created. An unknown option, or a bad value, is an error that
//! names the option and says what it accepts; nothing is silently corrected.

use std::path::PathBuf;
use std::time::Duration;

/// Every option nassync takes, with its default.
#[derive(Clone, Debug, PartialEq)]
pub struct MountOptions {
    pub cache_dir: Option<PathBuf>,
    pub cache_size: u64,
    pub mem_cache_size: u64,
    pub block_size: u64,
    pub readahead: u64,
    pub attr_timeout: Duration,
    pub attr_timeout_max: Duration,
    pub entry_timeout: Duration,
    pub entry_timeout_max: Duration,
    pub negative_timeout: Duration,
    pub threads: usize,
    pub allow_other: Option<bool>,
    pub allow_root: bool,
    pub read_only: bool,
    pub noatime: bool,
    pub nodev: bool,
    pub nosuid: bool,
    pub noexec: bool,
    pub sync: bool,
    pub dirsync: bool,
    pub fsname: Option<String>,
    pub log_level: Option<log::LevelFilter>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u32>,
    /// Writes land locally and reach the NAS in the background; off with
    /// `writeback=off` or `sync`.
    pub writeback: bool,
    pub writeback_delay: Duration,
    /// Pending bytes above which writers wait; default half of cache_size.
    pub max_dirty: Option<u64>,
    pub unmount_flush_timeout: Duration,
    /// How long a call to the NAS may take before nassync gives up on it
    /// and goes offline.
    pub timeo: Duration,
    /// How often pinned files are checked against the NAS and completed.
    pub pin_refresh: Duration,
    /// NFS sources: connections to the server (one call in flight each).
    pub nconnect: usize,
    /// NFS sources: connect from a port below 1024 when root.
    pub resvport: bool,
    /// `_netdev` and `x-*`: kept for the mount's /run/mount/utab entry
    /// (see `utab`), as mount(8) keeps them.
    pub utab_options: Vec<String>,
}

/// Every option: name, default, meaning (for --help and the man pages;
/// docs/OPTIONS.md says more, and a test checks that it names each one).
pub const OPTIONS: &[(&str, &str, &str)] = &[
    (
        "cache_dir=PATH",
        "/var/cache/nassync (root), ~/.cache/nassync",
        "where the disk cache lives",
    ),
    (
        "cache_size=SIZE",
        "10G",
        "bound of the disk cache; 0 disables it",
    ),
    (
        "mem_cache_size=SIZE",
        "256M",
        "bound of the memory block cache",
    ),
    (
        "block_size=SIZE",
        "1M",
        "cache block size, a power of two from 4K to 64M",
    ),
    (
        "readahead=SIZE",
        "8M",
        "prefetch ahead of sequential readers; 0 disables",
    ),
    (
        "actimeo=TIME",
        "-",
        "sets every *_timeout and *_timeout_max below to one fixed lifetime",
    ),
    (
        "attr_timeout=TIME",
        "3s",
        "how long attributes are cached (at least)",
    ),
    (
        "attr_timeout_max=TIME",
        "60s",
        "attributes of a file unchanged for long are cached up to this (a tenth of its age)",
    ),
    (
        "entry_timeout=TIME",
        "3s",
        "how long names and listings are cached (at least)",
    ),
    (
        "entry_timeout_max=TIME",
        "60s",
        "names of objects unchanged for long are cached up to this (a tenth of their age)",
    ),
    (
        "negative_timeout=TIME",
        "3s",
        "how long absent names are cached",
    ),
    ("threads=N", "16", "FUSE worker threads, 1 to 256"),
    ("uid=ID", "the NAS's", "owner shown for every file"),
    ("gid=ID", "the NAS's", "group shown for every file"),
    (
        "umask=MASK",
        "none",
        "octal mask cleared from the permissions shown",
    ),
    (
        "writeback=on|off",
        "on",
        "write locally, reach the NAS in the background (off: write-through)",
    ),
    (
        "writeback_delay=TIME",
        "5s",
        "a file is written back this long after its last change",
    ),
    (
        "max_dirty=SIZE",
        "half of cache_size",
        "writers wait while more than this is not yet on the NAS",
    ),
    (
        "unmount_flush_timeout=TIME",
        "30s",
        "at unmount, how long to wait for pending changes to reach the NAS",
    ),
    (
        "timeo=TIME",
        "10s",
        "a NAS call unanswered this long is abandoned and nassync goes offline",
    ),
    (
        "pin_refresh=TIME",
        "10m",
        "how often pinned files are checked against the NAS and fetched again if changed",
    ),
    (
        "nconnect=N",
        "2",
        "nfs:// sources: TCP connections to the server, 1 to 16",
    ),
    (
        "resvport, noresvport",
        "resvport",
        "nfs:// sources: as root, connect from a port below 1024 (most NAS exports ask for it)",
    ),
    ("fsname=NAME", "the source", "name shown in /proc/mounts"),
    (
        "log_level=LEVEL",
        "info",
        "off, error, warn, info, debug or trace",
    ),
    (
        "allow_other",
        "on for root",
        "let other users use the mount",
    ),
    ("allow_root", "off", "let root use a user's mount"),
    (
        "default_permissions",
        "always on",
        "the kernel checks modes and owners",
    ),
    ("ro, rw", "rw", "read-only or read-write"),
    (
        "noatime, nodev, nosuid, noexec, dirsync, sync",
        "off",
        "passed to the kernel; sync also turns write-back off",
    ),
];

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_dir: None,
            cache_size: 10 * GIB,
            mem_cache_size: 256 * MIB,
            block_size: MIB,
            readahead: 8 * MIB,
            attr_timeout: Duration::from_secs(3),
            attr_timeout_max: Duration::from_secs(60),
            entry_timeout: Duration::from_secs(3),
            entry_timeout_max: Duration::from_secs(60),
            negative_timeout: Duration::from_secs(3),
            threads: 16,
            allow_other: None,
            allow_root: false,
            read_only: false,
            noatime: false,
            nodev: false,
            nosuid: false,
            noexec: false,
            sync: false,
            dirsync: false,
            fsname: None,
            log_level: None,
            uid: None,
            gid: None,
            umask: None,
            writeback: true,
            writeback_delay: Duration::from_secs(5),
            max_dirty: None,
            unmount_flush_timeout: Duration::from_secs(30),
            timeo: Duration::from_secs(10),
            pin_refresh: Duration::from_secs(600),
            nconnect: 2,
            resvport: true,
            utab_options: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Pending bytes above which writers wait.
    pub fn max_dirty(&self) -> u64 {
        self.max_dirty.unwrap_or(if self.cache_size > 0 {
            self.cache_size / 2
        } else {
            GIB
        })
    }
}

/// A refused option.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("mount option '{option}': {problem}")]
pub struct OptionError {
    pub option: String,
    pub problem: String,
    /// Not an option nassync knows (as opposed to a bad value).
    pub unknown: bool,
}

fn bad(option: &str, problem: impl Into<String>) -> OptionError {
    OptionError {
        option: option.to_string(),
        problem: problem.into(),
        unknown: false,
    }
}

/// Parses a size: a number of bytes with an optional K, M, G or T suffix
/// (binary multiples; a trailing "B" or "iB" is allowed).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => KIB,
                'M' => MIB,
                'G' => GIB,
                'T' => 1024 * GIB,
                _ => return None,
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Parses a duration: seconds, or a number with an `ms`, `s`, `m` or `h`
/// suffix; fractions allowed ("0.5s").
pub fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim();
    let (num, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let v: f64 = num.parse().ok()?;
    let secs = v * unit;
    if !(0.0..=86400.0 * 365.0).contains(&secs) {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

/// A numeric id, or a user or group name of this machine.
fn id(value: &str, what: &str) -> Result<u32, OptionError> {
    let opt = format!("{}={value}", if what == "user" { "uid" } else { "gid" });
    if let Ok(n) = value.parse::<u32>() {
        return Ok(n);
    }
    let found = if what == "user" {
        nix::unistd::User::from_name(value)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    } else {
        nix::unistd::Group::from_name(value)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    };
    found.ok_or_else(|| {
        bad(
            &opt,
            format!("expected a numeric id or a {what} name of this machine"),
        )
    })
}

const SIZE_HELP: &str = "expected a size such as 4096, 512K, 256M or 20G";
const TIME_HELP: &str = "expected a time such as 0, 3, 500ms, 30s or 2m";

/// Options that only mean something to mount(8), fstab or systemd; they are
/// accepted and not passed on.
fn is_fstab_only(key: &str) -> bool {
    matches!(
        key,
        "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "users"
            | "nouser"
            | "owner"
            | "group"
            | "nofail"
            | "_netdev"
            | "comment"
    ) || key.starts_with("x-")
}

impl MountOptions {
    /// Parses the comma-separated option strings of every `-o`, in order.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<MountOptions, OptionError> {
        Self::parse_sloppy(lists, false)
    }

    /// As [`MountOptions::parse`]; with `sloppy` (mount's `-s`), unknown
    /// options are skipped with a warning instead of refused. Bad values of
    /// known options are still refused.
    pub fn parse_sloppy<S: AsRef<str>>(
        lists: &[S],
        sloppy: bool,
    ) -> Result<MountOptions, OptionError> {
        let mut o = MountOptions::default();
        for list in lists {
            for opt in list.as_ref().split(',') {
                let opt = opt.trim();
                if opt.is_empty() {
                    continue;
                }
                match o.apply(opt) {
                    Err(e) if sloppy && e.unknown => {
                        eprintln!("nassync: ignoring unknown mount option '{opt}' (sloppy)");
                    }
                    r => r?,
                }
            }
        }
        o.check()?;
        Ok(o)
    }

    fn apply(&mut self, opt: &str) -> Result<(), OptionError> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        if is_fstab_only(key) {
            if key == "_netdev" || key.starts_with("x-") {
                self.utab_options.push(opt.to_string());
            }
            return Ok(());
        }
        let flag = |o: &str| -> Result<(), OptionError> {
            match value {
                None => Ok(()),
                Some(_) => Err(bad(o, "takes no value")),
            }
        };
        let need = || value.ok_or_else(|| bad(opt, "needs a value (name=value)"));
        let size = || -> Result<u64, OptionError> {
            parse_size(need()?).ok_or_else(|| bad(opt, SIZE_HELP))
        };
        let time = || -> Result<Duration, OptionError> {
            parse_duration(need()?).ok_or_else(|| bad(opt, TIME_HELP))
        };
        match key {
            "rw" => {
                flag(opt)?;
                self.read_only = false
            }
            "ro" => {
                flag(opt)?;
                self.read_only = true
            }
            "allow_other" => {
                flag(opt)?;
                self.allow_other = Some(true)
            }
            "noallow_other" => {
                flag(opt)?;
                self.allow_other = Some(false)
            }
            "allow_root" => {
                flag(opt)?;
                self.allow_root = true
            }
            // Always on: the kernel checks permissions against the NAS's
            // modes and owners, as NFS clients do.
            "default_permissions" => flag(opt)?,
            "nconnect" => {
                self.nconnect = match need()?.parse::<usize>() {
                    Ok(n) if (1..=16).contains(&n) => n,
                    _ => return Err(bad(opt, "expected a number of connections from 1 to 16")),
                }
            }
            "resvport" => {
                flag(opt)?;
                self.resvport = true
            }
            "noresvport" => {
                flag(opt)?;
                self.resvport = false
            }
            "noatime" => {
                flag(opt)?;
                self.noatime = true
            }
            "atime" | "relatime" | "strictatime" => {
                flag(opt)?;
                self.noatime = false
            }
            "nodev" => {
                flag(opt)?;
                self.nodev = true
            }
            "dev" => {
                flag(opt)?;
                self.nodev = false
            }
            "nosuid" => {
                flag(opt)?;
                self.nosuid = true
            }
            "suid" => {
                flag(opt)?;
                self.nosuid = false
            }
            "noexec" => {
                flag(opt)?;
                self.noexec = true
            }
            "exec" => {
                flag(opt)?;
                self.noexec = false
            }
            "sync" => {
                flag(opt)?;
                self.sync = true;
                self.writeback = false;
            }
            "async" => {
                flag(opt)?;
                self.sync = false
            }
            "dirsync" => {
                flag(opt)?;
                self.dirsync = true
            }
            "cache_dir" => {
                let v = need()?;
                if !v.starts_with('/') {
                    return Err(bad(opt, "expected an absolute path"));
                }
                self.cache_dir = Some(PathBuf::from(v));
            }
            "cache_size" => self.cache_size = size()?,
            "mem_cache_size" => self.mem_cache_size = size()?,
            "block_size" => self.block_size = size()?,
            "readahead" => self.readahead = size()?,
            "actimeo" => {
                let t = time()?;
                self.attr_timeout = t;
                self.attr_timeout_max = t;
                self.entry_timeout = t;
                self.entry_timeout_max = t;
                self.negative_timeout = t;
            }
            "attr_timeout" => self.attr_timeout = time()?,
            "attr_timeout_max" => self.attr_timeout_max = time()?,
            "entry_timeout" => self.entry_timeout = time()?,
            "entry_timeout_max" => self.entry_timeout_max = time()?,
            "negative_timeout" => self.negative_timeout = time()?,
            "threads" => {
                self.threads = need()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| bad(opt, "expected a number of threads from 1 to 256"))?
            }
            "writeback" => {
                self.writeback = match need()? {
                    "on" | "yes" | "1" => true,
                    "off" | "no" | "0" => false,
                    _ => return Err(bad(opt, "expected on or off")),
                }
            }
            "writeback_delay" => self.writeback_delay = time()?,
            "max_dirty" => self.max_dirty = Some(size()?),
            "unmount_flush_timeout" => self.unmount_flush_timeout = time()?,
            "pin_refresh" => {
                self.pin_refresh = time()?;
                if self.pin_refresh.is_zero() {
                    return Err(bad(opt, "must be more than 0"));
                }
            }
            "timeo" => {
                self.timeo = time()?;
                if self.timeo.is_zero() {
                    return Err(bad(opt, "must be more than 0"));
                }
            }
            "fsname" => self.fsname = Some(need()?.to_string()),
            "uid" => self.uid = Some(id(need()?, "user")?),
            "gid" => self.gid = Some(id(need()?, "group")?),
            "umask" => {
                self.umask = Some(
                    u32::from_str_radix(need()?, 8)
                        .ok()
                        .filter(|m| *m <= 0o777)
                        .ok_or_else(|| bad(opt, "expected an octal mask from 000 to 777"))?,
                )
            }
            "log_level" => {
                self.log_level = Some(need()?.parse().map_err(|_| {
                    bad(opt, "expected one of off, error, warn, info, debug, trace")
                })?)
            }
            _ => {
                let mut e = bad(
                    opt,
                    "unknown option (see `nassync mount --help` or docs/OPTIONS.md)",
                );
                e.unknown = true;
                return Err(e);
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), OptionError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(4 * KIB..=64 * MIB).contains(&bs) {
            return Err(bad(
                &format!("block_size={bs}"),
                "expected a power of two from 4K to 64M",
            ));
        }
        if self.mem_cache_size < 4 * bs {
            return Err(bad(
                &format!("mem_cache_size={}", self.mem_cache_size),
                "must hold at least 4 blocks (4 x block_size)",
            ));
        }
        if self.cache_size != 0 && self.cache_size < 4 * bs {
            return Err(bad(
                &format!("cache_size={}", self.cache_size),
                "must be 0 (no disk cache) or hold at least 4 blocks (4 x block_size)",
            ));
        }
        if self.readahead > GIB {
            return Err(bad(
                &format!("readahead={}", self.readahead),
                "must be at most 1G",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("512K"), Some(512 * KIB));
        assert_eq!(parse_size("20G"), Some(20 * GIB));
        assert_eq!(parse_size("1t"), Some(1024 * GIB));
        assert_eq!(parse_size("2MiB"), Some(2 * MIB));
        for bad in ["", "G", "-1", "1.5G", "12Q", "abc", "99999999999999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        for bad in ["", "s", "-1", "1x", "1e3"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn fstab_options_are_accepted_and_only_kept_for_utab() {
        let mut o = MountOptions::parse(&[
            "defaults,noauto,user,users,nofail,_netdev,comment=x,x-systemd.automount,x-foo=1",
        ])
        .unwrap();
        assert_eq!(
            o.utab_options,
            ["_netdev", "x-systemd.automount", "x-foo=1"]
        );
        o.utab_options.clear();
        assert_eq!(o, MountOptions::default());
    }

    #[test]
    fn values_are_parsed() {
        let o = MountOptions::parse(&[
            "cache_size=20G,mem_cache_size=64M,block_size=256K,actimeo=1",
            "ro,noatime,attr_timeout=500ms,threads=4,cache_dir=/tmp/c",
        ])
        .unwrap();
        assert_eq!(o.cache_size, 20 * GIB);
        assert_eq!(o.mem_cache_size, 64 * MIB);
        assert_eq!(o.block_size, 256 * KIB);
        assert_eq!(o.entry_timeout, Duration::from_secs(1));
        assert_eq!(o.attr_timeout, Duration::from_millis(500));
        assert!(o.read_only && o.noatime);
        assert_eq!(o.threads, 4);
        assert_eq!(o.cache_dir, Some(PathBuf::from("/tmp/c")));
        let o = MountOptions::parse(&["uid=1000,gid=root,umask=027"]).unwrap();
        assert_eq!((o.uid, o.gid, o.umask), (Some(1000), Some(0), Some(0o27)));
    }

    #[test]
    fn sloppy_skips_only_unknown_options() {
        let o = MountOptions::parse_sloppy(&["frobnicate,ro"], true).unwrap();
        assert!(o.read_only);
        assert!(MountOptions::parse_sloppy(&["cache_size=lots"], true).is_err());
        assert!(MountOptions::parse(&["frobnicate"]).unwrap_err().unknown);
    }

    #[test]
    fn bad_options_name_themselves() {
        for (opts, needle) in [
            ("frobnicate", "frobnicate"),
            ("cache_size=lots", "cache_size=lots"),
            ("cache_size", "needs a value"),
            ("ro=1", "takes no value"),
            ("block_size=3000", "power of two"),
            ("threads=0", "threads=0"),
            ("actimeo=soon", "actimeo=soon"),
            ("cache_dir=relative", "absolute"),
            ("mem_cache_size=1K", "mem_cache_size"),
            ("log_level=loud", "log_level=loud"),
            ("uid=nosuchuser", "uid=nosuchuser"),
            ("umask=999", "octal"),
        ] {
            let e = MountOptions::parse(&[opts]).unwrap_err().to_string();
            assert!(e.contains(needle), "{opts}: {e}");
        }
    }
}
