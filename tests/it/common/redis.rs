//! Real `redis-server` processes on free loopback ports, and a TCP relay in
//! front of one that can silently swallow traffic (a subscriber connection
//! that stays open but delivers nothing).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct RedisServer {
    pub port: u16,
    /// A TLS port as well (self-signed certificate from tests/fixtures).
    pub tls_port: Option<u16>,
    /// Append-only file, fsync'd on every write: survives SIGKILL.
    aof: bool,
    /// More redis-server arguments (a replica's `--replicaof`).
    extra: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a throwaway redis-server (no persistence) on a free port.
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                tls_port: None,
                aof: false,
                extra: Vec::new(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// A replica of the server on `master`.
    pub fn start_replica_of(master: u16) -> RedisServer {
        Self::start_with(&["--replicaof", "127.0.0.1", &master.to_string()])
    }

    /// With more redis-server arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                tls_port: None,
                aof: false,
                extra: extra.iter().map(|a| a.to_string()).collect(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server {extra:?} on a free port");
    }

    /// With an append-only file (`appendfsync always`): a SIGKILL loses nothing.
    pub fn start_aof() -> RedisServer {
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                tls_port: None,
                aof: true,
                extra: Vec::new(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Also listens with TLS on `tls_port`.
    pub fn start_tls() -> RedisServer {
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                tls_port: Some(free_port()),
                aof: false,
                extra: Vec::new(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server with TLS on a free port");
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(if self.aof {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra);
        if let Some(tls) = self.tls_port {
            let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
            cmd.args(["--tls-port", &tls.to_string(), "--tls-auth-clients", "no"])
                .args(["--tls-cert-file", &format!("{fixtures}/redis-tls.crt")])
                .args(["--tls-key-file", &format!("{fixtures}/redis-tls.key")]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                panic!("cannot run redis-server ({e}): `make test` installs it, or run `apt-get install redis-server`")
            }
        };
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping() {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        false
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        // A server with a password answers -NOAUTH: up all the same.
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`) to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    /// Starts it again on the same port (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Runs one command on a fresh connection.
    pub async fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.unwrap()
    }

    /// `PUBSUB NUMSUB channel` → subscriber count.
    pub async fn numsub(&self, channel: &str) -> i64 {
        match self.cmd(&["PUBSUB", "NUMSUB", channel]).await {
            redis::Value::Array(v) if v.len() == 2 => match &v[1] {
                redis::Value::Int(n) => *n,
                other => panic!("NUMSUB answer {other:?}"),
            },
            other => panic!("NUMSUB answer {other:?}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay to Redis whose existing connections can be frozen: bytes
/// still arrive but are never passed on, and the sockets stay open.
pub struct FreezeProxy {
    pub addr: SocketAddr,
    frozen: Arc<Mutex<HashSet<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezeProxy {
    pub async fn start(target: u16) -> FreezeProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(Mutex::new(HashSet::new()));
        let fz = frozen.clone();
        let task = tokio::spawn(async move {
            let mut next = 0u64;
            while let Ok((down, _)) = listener.accept().await {
                let id = next;
                next += 1;
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, id, fz.clone()));
                tokio::spawn(pump(ur, dw, id, fz.clone()));
            }
        });
        FreezeProxy { addr, frozen, task }
    }

    /// Connection number `id` (0 is the first accepted) stops passing bytes, silently.
    pub fn freeze(&self, id: u64) {
        self.frozen.lock().unwrap().insert(id);
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }
}

impl Drop for FreezeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    frozen: Arc<Mutex<HashSet<u64>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.lock().unwrap().contains(&id) {
            // Swallow this and everything after, keeping both sockets open.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A master, a replica and three sentinels watching them as `mymaster`
/// (down after 1 s), all on free loopback ports.
pub struct SentinelSet {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel_ports: Vec<u16>,
    /// The one password of the master, the replica and the sentinels (as
    /// Open WebUI deployments set it), if any.
    password: Option<String>,
    sentinels: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    pub async fn start() -> SentinelSet {
        Self::start_with(None).await
    }

    pub async fn start_with(password: Option<&str>) -> SentinelSet {
        let (master, replica) = match password {
            None => {
                let m = RedisServer::start();
                let r = RedisServer::start_replica_of(m.port);
                (m, r)
            }
            Some(pw) => {
                let m = RedisServer::start_with(&["--requirepass", pw, "--masterauth", pw]);
                let port = m.port.to_string();
                let r = RedisServer::start_with(&[
                    "--requirepass",
                    pw,
                    "--masterauth",
                    pw,
                    "--replicaof",
                    "127.0.0.1",
                    &port,
                ]);
                (m, r)
            }
        };
        let auth = password.map_or(String::new(), |pw| {
            format!("requirepass {pw}\nsentinel auth-pass mymaster {pw}\nsentinel sentinel-pass {pw}\n")
        });
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 4000\n{auth}",
                dir.path().display(),
                master.port
            );
            std::fs::write(&conf, text).unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            sentinels.push(child);
            sentinel_ports.push(port);
        }
        let password = password.map(str::to_owned);
        let set = SentinelSet { master, replica, sentinel_ports, password, sentinels, _dir: dir };
        // Ready for a failover: every sentinel knows the replica and the two
        // other sentinels (they find each other through the master), and
        // the replica is in sync.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ready = set.replica_in_sync().await;
            for p in &set.sentinel_ports {
                ready &= sentinel_count(&set.at(*p), "SENTINELS").await == Some(2);
                ready &= sentinel_count(&set.at(*p), "REPLICAS").await == Some(1);
            }
            if ready {
                return set;
            }
            assert!(std::time::Instant::now() < deadline, "the sentinels did not find each other in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinel_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        match &self.password {
            None => format!("redis+sentinel://{}/mymaster/0", hosts.join(",")),
            // Open WebUI's form: the password for all, the path /<db>/<master>.
            Some(pw) => format!("redis+sentinel://:{pw}@{}/0/mymaster", hosts.join(",")),
        }
    }

    /// A `redis://` URL for a server of this set on `port`.
    pub fn at(&self, port: u16) -> String {
        match &self.password {
            None => format!("redis://127.0.0.1:{port}"),
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{port}"),
        }
    }

    /// The master's port as the sentinels say.
    pub async fn master_port(&self) -> Option<u16> {
        let client = redis::Client::open(self.at(self.sentinel_ports[0])).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let addr: Vec<String> =
            redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg("mymaster").query_async(&mut c).await.ok()?;
        addr.get(1)?.parse().ok()
    }

    async fn replica_in_sync(&self) -> bool {
        let Ok(client) = redis::Client::open(self.at(self.replica.port)) else { return false };
        let Ok(mut c) = client.get_multiplexed_async_connection().await else { return false };
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut c).await.unwrap_or_default();
        info.contains("master_link_status:up")
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for c in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many SENTINELS or REPLICAS a sentinel knows for `mymaster`.
async fn sentinel_count(url: &str, what: &str) -> Option<usize> {
    let client = redis::Client::open(url).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let v: Vec<redis::Value> = redis::cmd("SENTINEL").arg(what).arg("mymaster").query_async(&mut c).await.ok()?;
    Some(v.len())
}

/// A Redis Cluster on loopback: three masters, each with a replica when
/// asked (`--cluster-node-timeout 2000`: a dead master's replica takes over
/// within a few seconds).
pub struct ClusterSet {
    pub nodes: Vec<RedisServer>,
}

impl ClusterSet {
    pub async fn start(replicas: bool) -> ClusterSet {
        let count = if replicas { 6 } else { 3 };
        let mut nodes = Vec::new();
        for _ in 0..count {
            let mut started = None;
            for _ in 0..5 {
                let mut s = RedisServer {
                    port: free_port(),
                    tls_port: None,
                    aof: false,
                    extra: Vec::new(),
                    child: None,
                    dir: tempfile::tempdir().unwrap(),
                };
                s.extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                    .into_iter()
                    .map(String::from)
                    .chain(["--cluster-port".into(), free_port().to_string()])
                    .chain(["--cluster-config-file".into(), format!("nodes-{}.conf", s.port)])
                    .collect();
                if s.spawn() {
                    started = Some(s);
                    break;
                }
            }
            nodes.push(started.expect("a cluster node started"));
        }
        let mut cli = Command::new("redis-cli");
        cli.arg("--cluster").arg("create");
        for n in &nodes {
            cli.arg(format!("127.0.0.1:{}", n.port));
        }
        cli.args(["--cluster-replicas", if replicas { "1" } else { "0" }, "--cluster-yes"]);
        let out = cli.stdout(Stdio::null()).stderr(Stdio::piped()).output().expect("redis-cli");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stderr));
        let set = ClusterSet { nodes };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for n in &set.nodes {
                ok &= cluster_info(n.port).await.contains("cluster_state:ok");
                let repl = info(n.port, "replication").await;
                ok &= !repl.contains("role:slave") || repl.contains("master_link_status:up");
            }
            if ok {
                return set;
            }
            assert!(std::time::Instant::now() < deadline, "the cluster did not come up in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn url(&self) -> String {
        // Two seeds are enough: the client finds the rest.
        format!("redis+cluster://127.0.0.1:{},127.0.0.1:{}", self.nodes[0].port, self.nodes[1].port)
    }

    /// The node (index) serving `key`'s slot now, and the slot.
    pub async fn owner(&self, key: &str) -> (usize, u16) {
        match self.try_owner(key).await {
            Some(found) => found,
            None => panic!("no master serves {key}"),
        }
    }

    /// [`owner`], or None while no live master claims the slot.
    pub async fn try_owner(&self, key: &str) -> Option<(usize, u16)> {
        let slot: i64 = query(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key]).await;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            let repl = info(n.port, "replication").await;
            if !repl.contains("role:master") {
                continue;
            }
            let myid: String = query(n.port, &["CLUSTER", "MYID"]).await;
            let slots: Vec<redis::Value> = query(n.port, &["CLUSTER", "SLOTS"]).await;
            for range in slots {
                let redis::Value::Array(parts) = range else { continue };
                let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b)), Some(redis::Value::Array(m))) =
                    (parts.first(), parts.get(1), parts.get(2))
                else {
                    continue;
                };
                let id: Option<String> = m.get(2).and_then(|v| redis::from_redis_value_ref(v).ok());
                if (*a..=*b).contains(&slot) && id.as_deref() == Some(myid.as_str()) {
                    return Some((i, slot as u16));
                }
            }
        }
        None
    }

    /// Moves `slot` (with its keys) from node `from` to node `to`, the way
    /// `redis-cli --cluster reshard` does.
    pub async fn migrate(&self, slot: u16, from: usize, to: usize) {
        let (src, dst) = (self.nodes[from].port, self.nodes[to].port);
        let src_id: String = query(src, &["CLUSTER", "MYID"]).await;
        let dst_id: String = query(dst, &["CLUSTER", "MYID"]).await;
        let s = slot.to_string();
        let _: () = query(dst, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id]).await;
        let _: () = query(src, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id]).await;
        loop {
            let keys: Vec<String> = query(src, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]).await;
            if keys.is_empty() {
                break;
            }
            let port = dst.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", port.as_str(), "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: redis::Value = query(src, &args).await;
        }
        for n in &self.nodes {
            if n.child.is_some() {
                let _: redis::Value = query(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]).await;
            }
        }
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }
}

async fn cluster_info(port: u16) -> String {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else { return String::new() };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return String::new() };
    redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await.unwrap_or_default()
}

async fn info(port: u16, section: &str) -> String {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else { return String::new() };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return String::new() };
    redis::cmd("INFO").arg(section).query_async(&mut c).await.unwrap_or_default()
}

async fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await.unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
}
