//! The Redis URL forms (SPEC §6): one server, a master found through
//! Sentinel, or a Cluster.
//!
//! - `redis://[user:pass@]host:port/db`, `rediss://…` (TLS; `#insecure`
//!   skips verification): redis-rs parses it.
//! - `redis+sentinel://[user:pass@]h1:26379,h2:26379/<master>/<db>`
//!   (`rediss+sentinel://`), as SPEC §6 writes it, and
//!   `…/<db>/<master>`, the order python-socketio and Open WebUI write
//!   (`/0/mymaster`): a path whose first part is a number is read their
//!   way, so one value serves the app and its sidecar. Port 26379 where
//!   none is given, master `mymaster` and db 0 where the path has none, as
//!   they default. The user and password are the master's (as
//!   python-socketio uses them); sentinels are asked without them, or with
//!   them where they want them (as Open WebUI asks). Like them
//!   (Python's `urlparse`), the user and password are taken as written,
//!   not percent-decoded.
//! - `redis+cluster://[user:pass@]h1:7000,h2:7001` (`rediss+cluster://`).

/// A parsed `--redis-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisUrl {
    /// One server (the URL as redis-rs reads it).
    Single(String),
    Sentinel(Sentinel),
    Cluster(Cluster),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    /// `redis://host:port` (or `rediss://…`) of each sentinel.
    pub sentinels: Vec<String>,
    pub master: String,
    pub db: i64,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: Tls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `redis://[user:pass@]host:port` (or `rediss://…`) of each seed node.
    pub nodes: Vec<String>,
    pub tls: Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    None,
    Verified,
    /// `#insecure`: not verified (test setups only).
    Insecure,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or("must start with redis://, rediss://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://")?;
        match scheme {
            "redis" | "rediss" => {
                redis::Client::open(url).map_err(|e| format!("not a valid Redis URL: {e}"))?;
                Ok(RedisUrl::Single(url.to_owned()))
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let p = Parts::of(rest, scheme.starts_with("rediss"), 26379)?;
                let parts: Vec<&str> = p.path.split('/').filter(|s| !s.is_empty()).collect();
                let number = |s: &str| s.parse::<i64>().ok();
                let (master, db) = match parts.as_slice() {
                    [] => ("mymaster", 0),
                    // python-socketio's and Open WebUI's order: /<db>/<master>.
                    [d] if number(d).is_some() => ("mymaster", number(d).unwrap_or(0)),
                    [d, m] if number(d).is_some() => (*m, number(d).unwrap_or(0)),
                    // SPEC §6's order: /<master>/<db>.
                    [m] => (*m, 0),
                    [m, d] => (*m, number(d).ok_or_else(|| format!("database {d:?} is not a number"))?),
                    _ => return Err("the path is /<master>/<db> (or /<db>/<master>)".into()),
                };
                let master = master.to_owned();
                let sentinels = p.hosts.iter().map(|h| p.node_url(h, false)).collect();
                Ok(RedisUrl::Sentinel(Sentinel {
                    sentinels,
                    master,
                    db,
                    user: p.user.clone(),
                    password: p.password.clone(),
                    tls: p.tls,
                }))
            }
            "redis+cluster" | "rediss+cluster" => {
                let p = Parts::of(rest, scheme.starts_with("rediss"), 6379)?;
                if !p.path.trim_matches('/').is_empty() && p.path.trim_matches('/') != "0" {
                    return Err("a cluster has only database 0".into());
                }
                let nodes = p.hosts.iter().map(|h| p.node_url(h, true)).collect();
                Ok(RedisUrl::Cluster(Cluster { nodes, tls: p.tls }))
            }
            other => {
                Err(format!("unknown scheme {other:?}: use redis://, rediss://, redis+sentinel:// or redis+cluster://"))
            }
        }
    }

    /// The URL without its password, for logs.
    pub fn describe(&self) -> String {
        match self {
            RedisUrl::Single(u) => redact(u),
            RedisUrl::Sentinel(s) => {
                let hosts: Vec<&str> = s.sentinels.iter().map(|u| host_of(u)).collect();
                format!("sentinel master {:?} via {} (db {})", s.master, hosts.join(","), s.db)
            }
            RedisUrl::Cluster(c) => {
                let hosts: Vec<&str> = c.nodes.iter().map(|u| host_of(u)).collect();
                format!("cluster via {}", hosts.join(","))
            }
        }
    }

    pub fn uses_tls(&self) -> bool {
        match self {
            RedisUrl::Single(u) => u.starts_with("rediss://"),
            RedisUrl::Sentinel(Sentinel { tls, .. }) | RedisUrl::Cluster(Cluster { tls, .. }) => *tls != Tls::None,
        }
    }
}

/// `redis://user:secret@host/0` → `redis://user:***@host/0`
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// `host:port` of a node URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '#']).next().unwrap_or(rest)
}

/// The parts of `[user:pass@]h1[:p1],h2[:p2]/path[#insecure]`.
struct Parts {
    user: Option<String>,
    password: Option<String>,
    /// `host:port`, the default port filled in.
    hosts: Vec<String>,
    path: String,
    tls: Tls,
}

impl Parts {
    fn of(rest: &str, tls: bool, default_port: u16) -> Result<Parts, String> {
        let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        let tls = match (tls, fragment) {
            (false, "") => Tls::None,
            (true, "") => Tls::Verified,
            (true, "insecure") => Tls::Insecure,
            (_, f) => return Err(format!("unknown fragment #{f} (only rediss…#insecure)")),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (name, pass) = u.split_once(':').map_or((u, None), |(n, p)| (n, Some(p)));
                (Some(name.to_owned()).filter(|n| !n.is_empty()), pass.map(str::to_owned))
            }
        };
        let mut out = Vec::new();
        for h in hosts.split(',') {
            if h.is_empty() {
                return Err("an empty host in the list".into());
            }
            // `[::1]:26379`, `[::1]`, `host:26379`, `host`.
            let has_port = match h.rfind(']') {
                Some(end) => h[end..].contains(':'),
                None => h.contains(':'),
            };
            if has_port {
                let (_, port) = h.rsplit_once(':').ok_or("bad host")?;
                port.parse::<u16>().map_err(|_| format!("port {port:?} of {h:?} is not a port"))?;
                out.push(h.to_owned());
            } else {
                out.push(format!("{h}:{default_port}"));
            }
        }
        Ok(Parts { user, password, hosts: out, path: path.to_owned(), tls })
    }

    /// A redis-rs URL for one node, with the credentials when `auth`.
    fn node_url(&self, host: &str, auth: bool) -> String {
        let scheme = if self.tls == Tls::None { "redis" } else { "rediss" };
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
        let creds = match (&self.user, &self.password) {
            (_, _) if !auth => String::new(),
            (None, None) => String::new(),
            (u, p) => format!("{}:{}@", enc(u.as_deref().unwrap_or("")), enc(p.as_deref().unwrap_or(""))),
        };
        let fragment = if self.tls == Tls::Insecure { "#insecure" } else { "" };
        format!("{scheme}://{creds}{host}{fragment}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(redact("redis://:pw@host:6379/1"), "redis://:***@host:6379/1");
        assert_eq!(redact("rediss://user:pw@host/0"), "rediss://user:***@host/0");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(RedisUrl::parse("redis://:pw@h:6379/1").unwrap(), RedisUrl::Single("redis://:pw@h:6379/1".into()));
        let s = RedisUrl::parse("redis+sentinel://u:p@ss%41@h1:26380,h2,[::1]/mymain/2").unwrap();
        assert_eq!(
            s,
            RedisUrl::Sentinel(Sentinel {
                sentinels: vec!["redis://h1:26380".into(), "redis://h2:26379".into(), "redis://[::1]:26379".into()],
                master: "mymain".into(),
                db: 2,
                user: Some("u".into()),
                // As written (python-socketio does not decode it either).
                password: Some("p@ss%41".into()),
                tls: Tls::None,
            })
        );
        assert!(!s.describe().contains("p@ss"));
        // python-socketio's and Open WebUI's order, /<db>/<master>.
        let RedisUrl::Sentinel(s) = RedisUrl::parse("redis+sentinel://h1:26379/3/prod").unwrap() else { panic!() };
        assert_eq!((s.master.as_str(), s.db), ("prod", 3));
        let RedisUrl::Sentinel(s) = RedisUrl::parse("redis+sentinel://h1:26379/0").unwrap() else { panic!() };
        assert_eq!((s.master.as_str(), s.db), ("mymaster", 0));
        let s = RedisUrl::parse("rediss+sentinel://:pw@h1#insecure").unwrap();
        let RedisUrl::Sentinel(s) = s else { panic!() };
        assert_eq!((s.master.as_str(), s.db, s.tls), ("mymaster", 0, Tls::Insecure));
        assert_eq!(s.sentinels, ["rediss://h1:26379#insecure"]);
        assert_eq!(s.password.as_deref(), Some("pw"));
        let c = RedisUrl::parse("redis+cluster://:pw@h1:7000,h2:7001").unwrap();
        assert_eq!(
            c,
            RedisUrl::Cluster(Cluster {
                nodes: vec!["redis://:pw@h1:7000".into(), "redis://:pw@h2:7001".into()],
                tls: Tls::None
            })
        );
        for bad in [
            "http://h",
            "h:6379",
            "redis+sentinel://h1,,h2/m",
            "redis+sentinel://h1/m/x",
            "redis+sentinel://h1/a/b/c",
            "redis+sentinel://h1:port/m",
            "redis+cluster://h1/3",
            "redis+sentinel://h#what",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
