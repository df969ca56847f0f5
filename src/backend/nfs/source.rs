//! An NFS source as users write it: `nfs://HOST[:PORT]/EXPORT/PATH[?opts]`
//! (libnfs's URL form) or `HOST:/EXPORT/PATH` (what mount.nfs takes).

use std::fmt;

/// A parsed NFS source. Which leading part of `path` is the export is
/// found out when mounting: the NAS is asked for the whole path first,
/// then for ever shorter prefixes, and the rest is looked up below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsSource {
    pub host: String,
    /// The NFS port, when not asked of the portmapper.
    pub nfs_port: Option<u16>,
    /// The MOUNT port, when not asked of the portmapper.
    pub mount_port: Option<u16>,
    /// Absolute path on the server, without a trailing '/'.
    pub path: String,
    /// AUTH_UNIX identity to present instead of the daemon's own.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct SourceError(pub String);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceError {}

fn err<T>(s: &str, why: impl fmt::Display) -> Result<T, SourceError> {
    Err(SourceError(format!("NFS source {s:?}: {why}")))
}

/// Whether `s` names an NFS share rather than a directory. A local path
/// never has a ':' before its first '/' (`./a:b` is a path).
pub fn is_nfs(s: &str) -> bool {
    if s.starts_with("nfs://") {
        return true;
    }
    match (s.find(":/"), s.find('/')) {
        (Some(c), Some(sl)) => c > 0 && c + 1 == sl,
        _ => false,
    }
}

/// Undoes %XX escapes (a path may hold any byte but '/' and NUL).
fn unescape(s: &str, what: &str) -> Result<String, SourceError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(0) | None => return err(s, format!("bad %-escape in the {what}")),
                Some(b'/') => return err(s, format!("%2F in the {what}: a name cannot hold '/'")),
                Some(v) => out.push(v),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).or_else(|_| err(s, format!("the {what} is not UTF-8")))
}

/// "/a//b/" -> "/a/b"; "." and ".." are refused (the server resolves
/// nothing for us, and a path that climbs is surely a mistake).
fn clean_path(s: &str, path: &str) -> Result<String, SourceError> {
    let mut out = String::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return err(s, "the path may not contain '.' or '..'");
        }
        out.push('/');
        out.push_str(c);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

fn parse_port(s: &str, v: &str, what: &str) -> Result<u16, SourceError> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => err(s, format!("{what} {v:?} is not a port number")),
    }
}

impl NfsSource {
    pub fn parse(s: &str) -> Result<NfsSource, SourceError> {
        let (hostport, rest, query) = if let Some(url) = s.strip_prefix("nfs://") {
            let (main, query) = match url.split_once('?') {
                Some((m, q)) => (m, Some(q)),
                None => (url, None),
            };
            match main.find('/') {
                Some(i) => (&main[..i], &main[i..], query),
                None => (main, "/", query),
            }
        } else if is_nfs(s) {
            let c = s.find(":/").expect("is_nfs checked");
            // No port in this form: a ':' ends the host.
            let host = &s[..c];
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.contains(['[', ']', '/']) {
                return err(s, "bad host");
            }
            // mount.nfs takes the path as it is: no %-escapes.
            return NfsSource::finish(s, host, None, &s[c + 1..], None, false);
        } else {
            return err(s, "expected nfs://HOST/EXPORT or HOST:/EXPORT");
        };
        // An IPv6 address is written in brackets: [fe80::1]:2049.
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, "")) => (h, None),
                Some((h, p)) if p.starts_with(':') => (h, Some(&p[1..])),
                _ => return err(s, "unbalanced '[' in the host"),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        NfsSource::finish(s, host, port, rest, query, true)
    }

    fn finish(
        s: &str,
        host: &str,
        port: Option<&str>,
        rest: &str,
        query: Option<&str>,
        escaped: bool,
    ) -> Result<NfsSource, SourceError> {
        if host.is_empty() {
            return err(s, "no host");
        }
        let mut src = NfsSource {
            host: host.to_string(),
            nfs_port: None,
            mount_port: None,
            path: clean_path(
                s,
                &if escaped {
                    unescape(rest, "path")?
                } else {
                    rest.to_string()
                },
            )?,
            uid: None,
            gid: None,
        };
        if let Some(p) = port {
            src.nfs_port = Some(parse_port(s, p, "port")?);
        }
        for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let num = |what: &str| -> Result<u32, SourceError> {
                v.parse::<u32>()
                    .or_else(|_| err(s, format!("{what}={v:?} is not a number")))
            };
            match k {
                "nfsport" => src.nfs_port = Some(parse_port(s, v, k)?),
                "mountport" => src.mount_port = Some(parse_port(s, v, k)?),
                "uid" => src.uid = Some(num(k)?),
                "gid" => src.gid = Some(num(k)?),
                "version" if v == "3" => {}
                "version" => return err(s, format!("version={v}: only NFSv3 is supported")),
                _ => {
                    return err(
                        s,
                        format!(
                            "unknown option {k:?} (known: nfsport, mountport, uid, gid, version=3)"
                        ),
                    );
                }
            }
        }
        Ok(src)
    }

    /// The ways to split the path into export and the rest below it, the
    /// longest export first: "/a/b" -> ("/a/b", []), ("/a", ["b"]),
    /// ("/", ["a", "b"]).
    pub fn export_splits(&self) -> Vec<(String, Vec<String>)> {
        let comps: Vec<&str> = self.path.split('/').filter(|c| !c.is_empty()).collect();
        (0..=comps.len())
            .rev()
            .map(|n| {
                let export = format!("/{}", comps[..n].join("/"));
                let rest = comps[n..].iter().map(|c| c.to_string()).collect();
                (export, rest)
            })
            .collect()
    }
}

impl fmt::Display for NfsSource {
    /// The canonical form, as shown in /proc/mounts and status.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "nfs://[{}]", self.host)?;
        } else {
            write!(f, "nfs://{}", self.host)?;
        }
        if let Some(p) = self.nfs_port {
            write!(f, ":{p}")?;
        }
        // Escaped so that the URL parses back to the same source.
        for b in self.path.bytes() {
            if b.is_ascii_alphanumeric() || b"/-._~!$'()*+,;=:@".contains(&b) {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        let mut q = Vec::new();
        if let Some(p) = self.mount_port {
            q.push(format!("mountport={p}"));
        }
        if let Some(u) = self.uid {
            q.push(format!("uid={u}"));
        }
        if let Some(g) = self.gid {
            q.push(format!("gid={g}"));
        }
        if !q.is_empty() {
            write!(f, "?{}", q.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_mount_nfs_forms_parse_alike() {
        let a = NfsSource::parse("nfs://nas.local/volume1/share").unwrap();
        let b = NfsSource::parse("nas.local:/volume1/share/").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.host, "nas.local");
        assert_eq!(a.path, "/volume1/share");
        assert_eq!(a.to_string(), "nfs://nas.local/volume1/share");
    }

    #[test]
    fn ports_and_options() {
        let s = NfsSource::parse(
            "nfs://10.0.0.2:2049/export/a%20b?mountport=20048&uid=1000&gid=100&version=3",
        )
        .unwrap();
        assert_eq!(s.nfs_port, Some(2049));
        assert_eq!(s.mount_port, Some(20048));
        assert_eq!((s.uid, s.gid), (Some(1000), Some(100)));
        assert_eq!(s.path, "/export/a b");
        let v6 = NfsSource::parse("nfs://[fd00::2]:2050/x").unwrap();
        assert_eq!((v6.host.as_str(), v6.nfs_port), ("fd00::2", Some(2050)));
        assert_eq!(v6.to_string(), "nfs://[fd00::2]:2050/x");
        assert_eq!(NfsSource::parse("nfs://nas").unwrap().path, "/");
    }

    #[test]
    fn bad_sources_are_refused_with_the_reason() {
        for (s, why) in [
            ("nfs://nas/x?color=red", "unknown option"),
            ("nfs://nas/x?version=4", "only NFSv3"),
            ("nfs://nas:0/x", "not a port"),
            ("nfs://nas:99999/x", "not a port"),
            ("nfs:///x", "no host"),
            ("nfs://nas/a/../b", "'..'"),
            ("nfs://nas/a%zz", "%-escape"),
            ("nfs://nas/x?uid=me", "not a number"),
        ] {
            let e = NfsSource::parse(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn the_canonical_url_parses_back_to_the_same_source() {
        for s in ["nas:/data/100%", "nas:/a b/c?d#e&f", "nfs://nas/x%25y"] {
            let a = NfsSource::parse(s).unwrap();
            let b = NfsSource::parse(&a.to_string()).unwrap();
            assert_eq!(a, b, "{s} -> {a}");
        }
        assert_eq!(
            NfsSource::parse("nas:/data/100%").unwrap().path,
            "/data/100%"
        );
        assert!(NfsSource::parse("nfs://nas/a%2Fb").is_err());
    }

    #[test]
    fn local_paths_are_not_nfs() {
        assert!(is_nfs("nas:/volume1"));
        assert!(is_nfs("nfs://nas/x"));
        assert!(!is_nfs("/mnt/nas"));
        assert!(!is_nfs("./a:/b"));
        assert!(!is_nfs("dir/a:b"));
        assert!(!is_nfs("a:b"));
        assert!(is_nfs("[fd00::1]:/x"));
        assert_eq!(NfsSource::parse("[fd00::1]:/x").unwrap().host, "fd00::1");
    }

    #[test]
    fn the_export_is_searched_from_the_longest_prefix() {
        let s = NfsSource::parse("nas:/a/b").unwrap();
        assert_eq!(
            s.export_splits(),
            vec![
                ("/a/b".to_string(), vec![]),
                ("/a".to_string(), vec!["b".to_string()]),
                ("/".to_string(), vec!["a".to_string(), "b".to_string()]),
            ]
        );
    }
}
