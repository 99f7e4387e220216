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
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// With an append-only file (`appendfsync always`): a SIGKILL loses nothing.
    pub fn start_aof() -> RedisServer {
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                tls_port: None,
                aof: true,
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
            .arg(self.dir.path());
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
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
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
