//! Clearing the set-user-ID and set-group-ID bits of a file whose data,
//! owner or group is changed, by the rules Linux applies on a local
//! filesystem (setattr_should_drop_suidgid and chown_common in the kernel).
//!
//! nassync negotiates FUSE_HANDLE_KILLPRIV_V2, so the kernel leaves this to
//! it: without it, the FUSE kernel code clears S_ISGID only when S_IXGRP is
//! set too, which misses the case the VFS covers since Linux 6.0 (a caller
//! outside the file's group: generic/683 to 685). What nassync is told:
//!
//! - a write carries FUSE_WRITE_KILL_SUIDGID when the caller lacks
//!   CAP_FSETID;
//! - a truncate is a SETATTR with a size (its FATTR_KILL_SUIDGID is not
//!   passed on by fuser);
//! - before a write or fallocate that must drop the bits, the kernel sends a
//!   SETATTR that changes nothing (the VFS's request with the kill bits taken
//!   out); chown(f, -1, -1) arrives the same way, and a chown as a SETATTR
//!   with an owner or group. The reply to that SETATTR is what the kernel
//!   caches as the file's mode afterwards, so that is where the bits must go.
//!
//! Where the kernel does not say whether the caller has CAP_FSETID, nassync
//! reads /proc/PID/status. A file without either bit costs nothing: neither
//! /proc nor the NAS is asked.
//!
//! The rules, for a regular file:
//! - [`Change::Data`] (write, truncate, fallocate): nothing for a caller with
//!   CAP_FSETID; otherwise S_ISUID goes, and S_ISGID goes if S_IXGRP is set
//!   (a real set-group-ID program) or the caller is not in the file's group
//!   (without S_IXGRP the bit marks mandatory locking, which only the group
//!   may keep);
//! - [`Change::Owner`] (chown, and the empty SETATTR): S_ISUID always goes,
//!   even for root; S_ISGID goes if S_IXGRP is set, or the caller is neither
//!   in the file's group nor has CAP_FSETID. For the empty SETATTR sent
//!   before a write, the caller lacks CAP_FSETID, so this is the same as
//!   [`Change::Data`].
//!
//! One case comes out differently from a local filesystem: the kernel also
//! sends the empty SETATTR when only file capabilities (security.capability)
//! must go, even for root, and nassync then clears a set-user-ID bit too.
//! A file with both is rare.

/// What is being changed, which decides the rules (see the module
/// documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Data,
    Owner,
}

/// The process changing a file's data, owner or group, as the FUSE request
/// names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modifier {
    /// Filesystem uid and gid of the caller.
    pub uid: u32,
    pub gid: u32,
    /// The calling thread (0 when the kernel could not name it).
    pub pid: u32,
    /// Whether the caller has CAP_FSETID, when the kernel said so; `None`:
    /// look it up in /proc.
    pub privileged: Option<bool>,
}

const SUID: u16 = libc::S_ISUID as u16;
const SGID: u16 = libc::S_ISGID as u16;
const XGRP: u16 = libc::S_IXGRP as u16;
/// Bit of CAP_FSETID in the capability sets.
const CAP_FSETID: u32 = 4;

/// What /proc/PID/status says about a process's credentials.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Status {
    pub cap_eff: Option<u64>,
    pub groups: Vec<u32>,
}

pub(crate) fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("CapEff:") {
            s.cap_eff = u64::from_str_radix(v.trim(), 16).ok();
        } else if let Some(v) = line.strip_prefix("Groups:") {
            s.groups = v
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect();
        }
    }
    s
}

/// The caller's credentials from /proc, or `None` if it cannot be read
/// (the thread is gone, or is in another pid namespace).
fn status(pid: u32) -> Option<Status> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status(&text))
}

/// Whether `pid` is in this process's user namespace: capabilities held in
/// another (a container's) do not count for the NAS's files.
fn same_user_ns(pid: u32) -> bool {
    let ours = std::fs::read_link("/proc/self/ns/user");
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user"));
    matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
}

/// The bits among S_ISUID and S_ISGID that `who` making `change` to a
/// regular file with permissions `perm` and group `gid` (as the kernel sees
/// them) must clear. Reads /proc only if `perm` has one of the bits, and
/// only what the answer depends on.
pub fn bits_to_clear(perm: u16, gid: u32, who: &Modifier, change: Change) -> u16 {
    if perm & (SUID | SGID) == 0 {
        return 0;
    }
    let cell = std::cell::OnceCell::new();
    let proc = || cell.get_or_init(|| status(who.pid)).as_ref();
    let privileged = || {
        who.privileged
            .unwrap_or_else(|| match proc().and_then(|s| s.cap_eff) {
                Some(caps) => caps & (1 << CAP_FSETID) != 0 && same_user_ns(who.pid),
                // Nothing to ask: only root is taken to be privileged.
                None => who.uid == 0,
            })
    };
    let in_group = || who.gid == gid || proc().is_some_and(|s| s.groups.contains(&gid));
    decide(perm, change, privileged, in_group)
}

/// The rules themselves; `privileged` (CAP_FSETID) and `in_group` are only
/// called when they matter.
fn decide(
    perm: u16,
    change: Change,
    privileged: impl FnOnce() -> bool,
    in_group: impl FnOnce() -> bool,
) -> u16 {
    let sgid = perm & SGID != 0;
    let gexec = perm & XGRP != 0;
    match change {
        Change::Data => {
            if privileged() {
                return 0;
            }
            let mut kill = perm & SUID;
            if sgid && (gexec || !in_group()) {
                kill |= SGID;
            }
            kill
        }
        Change::Owner => {
            let mut kill = perm & SUID;
            if sgid && (gexec || (!in_group() && !privileged())) {
                kill |= SGID;
            }
            kill
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_rules() {
        use Change::{Data, Owner};
        // (perm, change, privileged, in the group) -> bits cleared
        let cases: [(u16, Change, bool, bool, u16); 16] = [
            (0o0666, Data, false, false, 0),
            (0o6666, Data, false, false, SUID | SGID), // not in the group
            (0o6666, Data, false, true, SUID),         // locking mark stays
            (0o6676, Data, false, true, SUID | SGID),  // a real sgid
            (0o6766, Data, false, false, SUID | SGID),
            (0o2666, Data, false, true, 0),
            (0o2676, Data, false, true, SGID),
            (0o6777, Data, true, false, 0), // CAP_FSETID keeps everything
            (0o4755, Data, false, true, SUID),
            // chown: the set-user-ID bit goes even for root
            (0o6755, Owner, true, true, SUID | SGID),
            (0o6745, Owner, true, false, SUID),
            (0o2745, Owner, false, true, 0),
            (0o2745, Owner, false, false, SGID),
            (0o2745, Owner, true, false, 0),
            (0o0755, Owner, true, true, 0),
            (0o6666, Owner, false, false, SUID | SGID),
        ];
        for (perm, change, privileged, member, want) in cases {
            assert_eq!(
                decide(perm, change, || privileged, || member),
                want,
                "{perm:o} {change:?} privileged {privileged} in group {member}"
            );
        }
    }

    #[test]
    fn only_what_matters_is_asked() {
        let never = || -> bool { panic!("asked") };
        assert_eq!(decide(0o0777, Change::Data, || false, never), 0);
        assert_eq!(decide(0o4777, Change::Data, || false, never), SUID);
        assert_eq!(decide(0o6777, Change::Owner, never, never), SUID | SGID);
        assert_eq!(decide(0o2666, Change::Data, || false, || false), SGID);
    }

    #[test]
    fn without_proc_only_root_is_privileged() {
        // No such thread: nothing to read in /proc.
        let who = Modifier {
            uid: 1000,
            gid: 1000,
            pid: u32::MAX,
            privileged: None,
        };
        assert_eq!(bits_to_clear(0o777, 0, &who, Change::Data), 0);
        assert_eq!(bits_to_clear(0o4777, 0, &who, Change::Data), SUID);
        assert_eq!(bits_to_clear(0o2666, 1000, &who, Change::Data), 0);
        assert_eq!(bits_to_clear(0o2666, 0, &who, Change::Data), SGID);
        let root = Modifier { uid: 0, ..who };
        assert_eq!(bits_to_clear(0o4777, 0, &root, Change::Data), 0);
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let me = Modifier {
            uid: nix::unistd::geteuid().as_raw(),
            gid: u32::MAX, // only the supplementary groups can match
            pid: std::process::id(),
            privileged: None,
        };
        let status = parse_status(&std::fs::read_to_string("/proc/self/status").unwrap());
        let caps = status.cap_eff.unwrap();
        let want = if caps & (1 << CAP_FSETID) != 0 {
            0
        } else {
            SUID
        };
        assert_eq!(bits_to_clear(0o4755, 0, &me, Change::Data), want);
        if let Some(g) = status.groups.first() {
            assert_eq!(bits_to_clear(0o2745, *g, &me, Change::Owner), 0);
        }
    }

    #[test]
    fn status_lines() {
        let s = parse_status(
            "Name:\tsh\nGroups:\t4 24 27 \nCapInh:\t0000000000000000\n\
             CapEff:\t000001ffffffffff\n",
        );
        assert_eq!(s.groups, vec![4, 24, 27]);
        assert_eq!(s.cap_eff, Some(0x1ff_ffff_ffff));
        assert_eq!(parse_status("Groups:\t\n"), Status::default());
    }
}
