//! The real binary: configuration errors, --check-config, and the SIGTERM
//! drain.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::{STEP, Upstream, request, try_request, ws_connect};

const BIN: &str = env!("CARGO_BIN_EXE_wsrelay");

fn run_to_end(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env_clear().stdin(Stdio::null()).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_file_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("listen = \"127.0.0.1:0\"\nmax-mesage-bytes = 10\n", "max-mesage-bytes"),
        ("ping-interval = \"often\"\n", "ping-interval"),
        ("max-connections = 0\n", "max-connections"),
        ("upstream = \"ftp://app\"\n", "upstream"),
        ("[[namespace]]\nprefix = \"user:\"\nsubscribe = \"sometimes\"\n", "namespace[0].subscribe"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run_to_end(&["--config", path.to_str().unwrap(), "--check-config"]);
        assert_eq!(code, 64, "{text}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{text}: error must name {key}: {err}");
        assert!(err.contains(path.to_str().unwrap()), "error names the file: {err}");
    }
}

#[test]
fn bad_flags_exit_64_and_check_config_passes_good_ones() {
    let (code, _, err) = run_to_end(&["--max-message-bytes", "lots"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--max-message-bytes"), "{err}");
    let (code, _, err) = run_to_end(&["--admin-listen", "0.0.0.0:9999", "--check-config"]);
    assert_eq!(code, 64);
    assert!(err.contains("`api-token`"), "{err}");
    let (code, out, err) = run_to_end(&["--check-config", "--listen", "127.0.0.1:0", "--client-queue", "10"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration is valid"));
    let (code, out, _) = run_to_end(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--redis-url") && out.contains("WSRELAY_REDIS_URL"), "{out}");
}

#[test]
fn environment_is_read_and_flags_win() {
    let out = Command::new(BIN)
        .args(["--check-config", "--client-queue", "5"])
        .env_clear()
        .env("WSRELAY_CLIENT_QUEUE", "zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "the flag wins over the bad env value");
    let out =
        Command::new(BIN).args(["--check-config"]).env_clear().env("WSRELAY_CLIENT_QUEUE", "zero").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--client-queue"));
}

/// The binary running with JSON logs; its addresses read from the `listening` line.
struct Running {
    child: Child,
    public: String,
    admin: String,
    /// The start-up line naming the broker.
    broker: String,
    /// Every log line read so far.
    seen: Vec<String>,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Owned from here, so a failed assertion still reaps the child.
    let mut running =
        Running { child, public: String::new(), admin: String::new(), broker: String::new(), seen: vec![], log: rx };
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = running.log.recv_timeout(STEP).expect("the binary logs its start");
        running.seen.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(m) = v["message"].as_str().filter(|m| m.starts_with("using ")) {
            running.broker = m.to_owned();
        }
        if v["message"] == "listening" {
            assert!(!running.broker.is_empty(), "the broker is named at start-up");
            running.public = v["public"].as_str().unwrap().to_owned();
            running.admin = v["admin"].as_str().unwrap().to_owned();
            return running;
        }
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let app = Upstream::start().await;
    let mut bin = spawn(&["--upstream", &app.url(), "--drain-timeout", "5s"]);
    let admin = format!("http://{}", bin.admin);
    assert!(bin.broker.starts_with("using in-memory broker (single instance"), "{}", bin.broker);
    assert_eq!(request(Method::GET, &format!("{admin}/readyz"), None, &[]).await.0, StatusCode::OK);

    let mut client = ws_connect(&format!("ws://{}/ws", bin.public)).await;
    let slow_url = format!("http://{}/slow?ms=1500", bin.public);
    let slow = tokio::spawn(async move { request(Method::GET, &slow_url, None, &[]).await });
    // Let the slow request reach the app before the signal.
    crate::common::eventually(STEP, "slow request at the app", || async { !app.recorded("/slow").is_empty() }).await;

    let pid = bin.child.id().to_string();
    // The shell builtin: /bin/kill (procps) is not on every minimal image.
    assert!(Command::new("sh").args(["-c", &format!("kill -TERM {pid}")]).status().unwrap().success());

    crate::common::eventually(STEP, "readyz 503", || async {
        matches!(
            try_request(Method::GET, &format!("{admin}/readyz"), None, &[]).await,
            Ok((StatusCode::SERVICE_UNAVAILABLE, _, _))
        )
    })
    .await;
    // No new sessions while draining: 503 while the listener is still open
    // (sessions are being closed), connection refused once it is not.
    let url = format!("ws://{}/ws", bin.public);
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("expected 503 or connection refused, got {e}"),
        Ok(_) => panic!("a new session was accepted while draining"),
    }

    let close = client.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Away, "1001 going away");

    let (status, _, body) = tokio::time::timeout(STEP, slow).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request finished");
    assert_eq!(&body[..], b"slow done");

    let started = std::time::Instant::now();
    let code = loop {
        if let Some(status) = bin.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the binary did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0));
    let rest: Vec<String> = bin.log.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("\"draining\"")), "drain is logged: {rest:?}");
}

#[tokio::test]
async fn redis_url_is_logged_without_its_password_and_readyz_broker_is_honest() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://:hunter2@127.0.0.1:{closed}/1");
    let mut bin = spawn(&["--redis-url", &url, "--redis-prefix", "t1:"]);
    assert_eq!(bin.broker, format!("using redis broker at redis://:***@127.0.0.1:{closed}/1 (prefix t1:)"));
    // Nothing listens there: the node serves, but says its broker is down
    // (once it has tried: a 503 before the first attempt would prove nothing).
    let admin = format!("http://{}", bin.admin);
    crate::common::eventually(STEP, "a failed broker connection", || async {
        let (_, _, body) = request(Method::GET, &format!("{admin}/metrics"), None, &[]).await;
        let text = String::from_utf8_lossy(&body).into_owned();
        crate::common::metric_value(&text, "wsrelay_broker_connection_errors_total").is_some_and(|v| v >= 1.0)
    })
    .await;
    assert_eq!(request(Method::GET, &format!("{admin}/healthz"), None, &[]).await.0, StatusCode::OK);
    assert_eq!(request(Method::GET, &format!("{admin}/readyz"), None, &[]).await.0, StatusCode::OK);
    let (status, _, _) = request(Method::GET, &format!("{admin}/readyz?broker"), None, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(300)).await;
    bin.seen.extend(bin.log.try_iter());
    assert!(bin.seen.iter().all(|l| !l.contains("hunter2")), "the password never reaches the log");
}

#[test]
fn example_config_is_valid_and_shows_every_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/wsrelay.toml");
    let (code, out, err) = run_to_end(&["--config", path, "--check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration is valid"));
    let text = std::fs::read_to_string(path).unwrap();
    let (_, help, _) = run_to_end(&["--help"]);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty() && !["help", "version", "config", "check-config"].contains(w))
        .collect();
    assert!(flags.len() > 30, "{flags:?}");
    for flag in flags {
        assert!(text.contains(&format!("{flag} =")), "config/wsrelay.toml does not show `{flag}`");
    }
}

#[tokio::test]
async fn readme_documents_every_flag_and_metric() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (_, help, _) = run_to_end(&["--help"]);
    for flag in help.split_whitespace().filter(|w| w.starts_with("--")) {
        let flag = flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        if flag != "--help" && flag != "--version" {
            assert!(readme.contains(&format!("`{flag}`")), "README does not document {flag}");
        }
    }
    let app = Upstream::start().await;
    let relay = crate::common::Relay::start(&app.url(), &[]).await;
    let metrics = relay.metrics().await;
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE wsrelay_")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(readme.contains(&format!("`{name}`")), "README does not document {name}");
    }
}

#[tokio::test]
async fn shutdown_delay_keeps_serving_http_while_refusing_upgrades() {
    let app = Upstream::start().await;
    let relay = crate::common::Relay::start(&app.url(), &["--shutdown-delay", "800ms", "--drain-timeout", "5s"]).await;
    let mut client = ws_connect(&relay.ws_url("/ws")).await;
    let ws_url = relay.ws_url("/ws");
    let http_url = relay.http_url("/still-here");
    let readyz = relay.admin_url("/readyz");
    let stopping = tokio::spawn(relay.stop());
    crate::common::eventually(STEP, "readyz 503", || async {
        matches!(try_request(Method::GET, &readyz, None, &[]).await, Ok((StatusCode::SERVICE_UNAVAILABLE, _, _)))
    })
    .await;
    // Within the delay: plain requests are served, new sessions refused, old ones kept.
    assert_eq!(request(Method::GET, &http_url, None, &[]).await.0, StatusCode::OK);
    let refused = crate::common::ws_connect_with(&ws_url, &[]).await.err();
    assert_eq!(refused, Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(client.request(serde_json::json!({"op":"ping"})).await["ok"], true);
    // Then the session is closed with 1001 and the relay stops.
    let close = client.expect_close(STEP).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Away);
    tokio::time::timeout(STEP, stopping).await.unwrap().unwrap();
}
