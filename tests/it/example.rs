//! The README's example app (examples/app.py, Python standard library only)
//! behind a real wsrelay: every hook it implements does what the README says.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use http::StatusCode;
use serde_json::json;

use crate::common::{Relay, ws_connect_with};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_python_example_app_works_behind_wsrelay() {
    // The admin listener first (bound and kept), so the app knows where to
    // publish; the app binds port 0 itself and says which port it got.
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_port = admin.local_addr().unwrap().port();
    let mut child = Command::new("python3")
        .arg(format!("{ROOT}/examples/app.py"))
        .args(["--port", "0", "--admin", &format!("http://127.0.0.1:{admin_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let _app = App(child);
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let app_port: u16 = line
        .trim()
        .strip_prefix("app listening on 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the app did not say its port: {line:?}"));
    // Keep reading its log so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let upstream = format!("http://127.0.0.1:{app_port}");
    let config = format!("{ROOT}/examples/wsrelay.toml");
    let relay = Relay::start_with_admin(&upstream, &["--config", &config], admin).await;

    // The app's own guard: a hook called without wsrelay's header is refused.
    let direct = format!("{upstream}/internal/ws/connect");
    let (status, _, _) = crate::common::request(http::Method::POST, &direct, Some("{}".into()), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "hooks answer wsrelay only");

    let url = relay.ws_url("/ws");
    assert_eq!(ws_connect_with(&url, &[]).await.err(), Some(StatusCode::UNAUTHORIZED), "no session cookie");
    let mut alice = ws_connect_with(&url, &[("cookie", "session=alice-session")]).await.unwrap();
    assert_eq!(alice.welcome["user"], "alice");
    assert_eq!(alice.welcome["channels"], json!(["user:alice"]));
    let mut bob = ws_connect_with(&url, &[("cookie", "session=bob-session")]).await.unwrap();

    // The app publishes through the sidecar's API.
    let (status, _, _) =
        crate::common::request(http::Method::POST, &format!("{upstream}/notify?user=alice"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(alice.recv().await["data"]["text"], "hello alice");

    // Rooms: the subscribe hook decides.
    alice.subscribe("room:staff").await;
    let r = bob.request(json!({"op":"subscribe","channel":"room:staff"})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    bob.subscribe("room:lobby").await;
    let r = alice.request(json!({"op":"publish","channel":"room:lobby","data":{"text":"hi bob"}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(bob.recv().await["data"]["text"], "hi bob");

    // send → message hook.
    let r = bob.request(json!({"op":"send","data":{"action":"whoami"}})).await;
    assert_eq!(r["result"]["user"], "bob");
    let r = bob.request(json!({"op":"send","data":"not an object"})).await;
    assert_eq!(r["error"]["code"], "bad_request");
    let r = bob.request(json!({"op":"send","data":{"action":"dance"}})).await;
    assert_eq!(r["error"]["code"], "not_found");
    assert_eq!(r["error"]["message"], "unknown action");
}
