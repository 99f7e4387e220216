//! Authorization: connect hook, JWT, namespace policies, subscribe/publish
//! hooks, message and disconnect hooks, origin check, and disconnecting a
//! user on every node. The upstream is a real HTTP server that records what
//! wsrelay sent it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::redis::RedisServer;
use crate::common::upstream::HookReply;
use crate::common::{Relay, STEP, Upstream, eventually, request, ws_connect, ws_connect_with};

const QUIET: Duration = Duration::from_millis(300);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(sub: &str, channels: &[&str], exp: u64) -> Value {
    json!({"sub": sub, "channels": channels, "exp": exp})
}

pub(crate) fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn signed_with_pem(alg: Algorithm, pem_file: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(pem_file)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => unreachable!(),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn config_file(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("wsrelay.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn connect_hook_accepts_with_user_and_channels_and_sees_the_original_request() {
    let app = Upstream::start().await;
    app.set_hook(
        "/auth/connect",
        HookReply::new(200, &json!({"user":"42","channels":["user:42"],"info":{"name":"Ann"}})),
    );
    let relay = Relay::start(&app.url(), &["--connect-hook", "/auth/connect", "--trusted-proxy", "127.0.0.1"]).await;
    let headers = [("cookie", "session=abc123"), ("x-forwarded-for", "203.0.113.9"), ("authorization", "Basic Zm9v")];
    let mut c = ws_connect_with(&relay.ws_url("/ws?room=5"), &headers).await.expect("accepted");
    assert_eq!(c.welcome["user"], "42");
    assert_eq!(c.welcome["channels"], json!(["user:42"]));
    relay.publish(json!({"channel":"user:42","data":{"n":1}})).await;
    assert_eq!(c.recv().await["data"]["n"], 1, "the hook's channels are subscribed server-side");

    let seen = app.recorded("/auth/connect");
    assert_eq!(seen.len(), 1);
    let hook = &seen[0];
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.header("cookie").as_deref(), Some("session=abc123"));
    assert_eq!(hook.header("authorization").as_deref(), Some("Basic Zm9v"));
    assert_eq!(hook.header("x-forwarded-for").as_deref(), Some("203.0.113.9, 127.0.0.1"));
    let body = hook.json();
    assert_eq!(body["path"], "/ws");
    assert_eq!(body["query"], "room=5");
    assert!(body["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    // The connection id the session then has, and its transport.
    assert_eq!(body["connection"], json!(c.connection_id()));
    assert_eq!(body["transport"], "websocket");
    assert_eq!(relay.metric("wsrelay_hook_requests_total{hook=\"connect\",status=\"200\"}").await, 1.0);
}

#[tokio::test]
async fn connect_hook_refusals_and_failures() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--connect-hook", "/auth/connect", "--hook-timeout", "1s"]).await;
    let url = relay.ws_url("/ws");
    for (reply, expected) in [
        (HookReply::new(401, &json!({})), StatusCode::UNAUTHORIZED),
        (HookReply::new(403, &json!({})), StatusCode::FORBIDDEN),
        (HookReply::new(500, &json!({})), StatusCode::SERVICE_UNAVAILABLE),
        (HookReply::new(200, &json!({"user": ["not", "a", "string"]})), StatusCode::SERVICE_UNAVAILABLE),
        (HookReply::new(200, &json!({"user":"1"})).delayed(Duration::from_secs(3)), StatusCode::SERVICE_UNAVAILABLE),
    ] {
        app.set_hook("/auth/connect", reply.clone());
        let got = ws_connect_with(&url, &[]).await.err();
        assert_eq!(got, Some(expected), "{reply:?}");
    }
    assert_eq!(relay.metric("wsrelay_hook_requests_total{hook=\"connect\",status=\"timeout\"}").await, 1.0);
    assert_eq!(relay.metric("wsrelay_connections").await, 0.0);
}

#[tokio::test]
async fn connect_hook_down_fails_closed() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let relay = Relay::start(&format!("http://127.0.0.1:{closed}"), &["--connect-hook", "/auth/connect"]).await;
    assert_eq!(ws_connect_with(&relay.ws_url("/ws"), &[]).await.err(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn jwt_hs256_from_query_or_header() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--jwt-secret", "topsecret"]).await;
    let token = hs256("topsecret", &claims("7", &["user:7"], now() + 600));
    let c = ws_connect(&relay.ws_url(&format!("/ws?token={token}"))).await;
    assert_eq!(c.welcome["user"], "7");
    assert_eq!(c.welcome["channels"], json!(["user:7"]));
    let c = ws_connect_with(&relay.ws_url("/ws"), &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
    assert_eq!(c.welcome["user"], "7");

    let refused = |t: String| {
        let url = relay.ws_url(&format!("/ws?token={t}"));
        async move { ws_connect_with(&url, &[]).await.err() }
    };
    let expired = hs256("topsecret", &claims("7", &[], now() - 3600));
    assert_eq!(refused(expired).await, Some(StatusCode::UNAUTHORIZED), "expired");
    let wrong_key = hs256("other", &claims("7", &[], now() + 600));
    assert_eq!(refused(wrong_key).await, Some(StatusCode::UNAUTHORIZED), "wrong key");
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("7", &[], now() + 600).to_string().as_bytes())
    );
    assert_eq!(refused(none).await, Some(StatusCode::UNAUTHORIZED), "alg none");
    assert_eq!(refused("garbage".into()).await, Some(StatusCode::UNAUTHORIZED));
    // A token is required when only JWT is configured.
    assert_eq!(ws_connect_with(&relay.ws_url("/ws"), &[]).await.err(), Some(StatusCode::UNAUTHORIZED));
}

#[tokio::test]
async fn jwt_rs256_and_es256_with_public_keys_and_no_algorithm_confusion() {
    let app = Upstream::start().await;
    let rsa = Relay::start(&app.url(), &["--jwt-public-key", &fixture("jwt-rsa-public.pem")]).await;
    let token = signed_with_pem(Algorithm::RS256, "jwt-rsa-private.pem", &claims("9", &[], now() + 600));
    assert_eq!(ws_connect(&rsa.ws_url(&format!("/ws?token={token}"))).await.welcome["user"], "9");

    // The classic confusion attack: an HS256 token whose HMAC secret is the RSA public key.
    let public_pem = std::fs::read_to_string(fixture("jwt-rsa-public.pem")).unwrap();
    let forged = hs256(&public_pem, &claims("admin", &[], now() + 600));
    let got = ws_connect_with(&rsa.ws_url(&format!("/ws?token={forged}")), &[]).await.err();
    assert_eq!(got, Some(StatusCode::UNAUTHORIZED));
    let es_token = signed_with_pem(Algorithm::ES256, "jwt-ec-private.pem", &claims("9", &[], now() + 600));
    let got = ws_connect_with(&rsa.ws_url(&format!("/ws?token={es_token}")), &[]).await.err();
    assert_eq!(got, Some(StatusCode::UNAUTHORIZED), "an EC token against an RSA key");

    let ec = Relay::start(&app.url(), &["--jwt-public-key", &fixture("jwt-ec-public.pem")]).await;
    assert_eq!(ws_connect(&ec.ws_url(&format!("/ws?token={es_token}"))).await.welcome["user"], "9");
}

#[tokio::test]
async fn owner_channels_belong_to_their_user() {
    let app = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(&dir, "[[namespace]]\nprefix = \"user:\"\nsubscribe = \"owner\"\n");
    let jwt = Relay::start(&app.url(), &["--config", &cfg, "--jwt-secret", "k"]).await;
    let t42 = hs256("k", &claims("42", &[], now() + 600));
    let mut u42 = ws_connect(&jwt.ws_url(&format!("/ws?token={t42}"))).await;
    u42.subscribe("user:42").await;
    let r = u42.request(json!({"op":"subscribe","channel":"user:43"})).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    // Naming someone else's channel in the URL is refused before the upgrade.
    let got = ws_connect_with(&jwt.ws_url(&format!("/ws?token={t42}&channel=user:43")), &[]).await.err();
    assert_eq!(got, Some(StatusCode::FORBIDDEN));

    let anon = Relay::start(&app.url(), &["--config", &cfg]).await;
    let mut a = ws_connect(&anon.ws_url("/ws")).await;
    let r = a.request(json!({"op":"subscribe","channel":"user:42"})).await;
    assert_eq!(r["error"]["code"], "forbidden", "anonymous may not: {r}");
    a.subscribe("lobby").await;
}

#[tokio::test]
async fn hook_policies_ask_the_app_and_obey_it() {
    let app = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        &dir,
        "[[namespace]]\nprefix = \"private:\"\nsubscribe = \"hook\"\n\n\
         [[namespace]]\nprefix = \"votes:\"\nsubscribe = \"anyone\"\npublish = \"hook\"\n\n\
         [[namespace]]\nprefix = \"chat:\"\npublish = \"authenticated\"\n",
    );
    let relay = Relay::start(
        &app.url(),
        &["--config", &cfg, "--jwt-secret", "k", "--subscribe-hook", "/auth/sub", "--publish-hook", "/auth/pub"],
    )
    .await;
    let t = hs256("k", &claims("5", &[], now() + 600));
    let mut c = ws_connect(&relay.ws_url(&format!("/ws?token={t}"))).await;
    let mut watcher = ws_connect(&relay.ws_url(&format!("/ws?token={t}"))).await;

    app.set_hook("/auth/sub", HookReply::new(200, &json!({})));
    c.subscribe("private:club").await;
    let asked = app.recorded("/auth/sub");
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].json(), json!({"user":"5","connection":c.connection_id(),"channel":"private:club"}));
    app.set_hook("/auth/sub", HookReply::new(403, &json!({})));
    let r = c.request(json!({"op":"subscribe","channel":"private:vault"})).await;
    assert_eq!(r["error"]["code"], "forbidden");

    watcher.subscribe("votes:1").await;
    app.set_hook("/auth/pub", HookReply::new(200, &json!({})));
    let r = c.request(json!({"op":"publish","channel":"votes:1","data":{"n":1}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(watcher.recv().await["data"]["n"], 1);
    assert_eq!(app.recorded("/auth/pub")[0].json()["data"], json!({"n":1}), "the hook sees the data");
    app.set_hook("/auth/pub", HookReply::new(403, &json!({})));
    let r = c.request(json!({"op":"publish","channel":"votes:1","data":{"n":2}})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    app.set_hook("/auth/pub", HookReply::new(503, &json!({})).delayed(Duration::ZERO));
    let r = c.request(json!({"op":"publish","channel":"votes:1","data":{"n":3}})).await;
    assert_eq!(r["error"]["code"], "forbidden", "a failing hook denies");
    watcher.expect_silence(QUIET).await;

    // `authenticated` publish: a user may, and it reaches subscribers.
    watcher.subscribe("chat:room").await;
    let r = c.request(json!({"op":"publish","channel":"chat:room","data":{"n":4}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(watcher.recv().await["data"]["n"], 4);
}

#[tokio::test]
async fn send_goes_to_the_message_hook_and_its_answer_comes_back() {
    let app = Upstream::start().await;
    let relay = Relay::start(
        &app.url(),
        &["--jwt-secret", "k", "--message-hook", "/app/message", "--disconnect-hook", "/app/gone"],
    )
    .await;
    let t = hs256("k", &claims("8", &[], now() + 600));
    let mut c = ws_connect(&relay.ws_url(&format!("/ws?token={t}"))).await;
    let id = c.connection_id();

    app.set_hook("/app/message", HookReply::new(200, &json!({"answer": 42})));
    let r = c.request(json!({"op":"send","data":{"question":"?"}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"], json!({"answer": 42}));
    let seen = app.recorded("/app/message");
    assert_eq!(seen[0].json(), json!({"user":"8","connection":id,"data":{"question":"?"}}));

    app.set_hook("/app/message", HookReply::new(404, &json!({"error":{"message":"no such document"}})));
    let r = c.request(json!({"op":"send","data":{}})).await;
    assert_eq!(r["error"]["code"], "not_found");
    assert_eq!(r["error"]["message"], "no such document");

    c.ws.close(None).await.unwrap();
    eventually(STEP, "disconnect hook told", || async { !app.recorded("/app/gone").is_empty() }).await;
    assert_eq!(app.recorded("/app/gone")[0].json(), json!({"user":"8","connection":id,"reason":"client"}));
}

#[tokio::test]
async fn disconnect_by_user_closes_their_sessions_on_every_node() {
    let redis = RedisServer::start();
    let app = Upstream::start().await;
    let args = ["--redis-url", &redis.url(), "--jwt-secret", "k"];
    let a = Relay::start(&app.url(), &args).await;
    let b = Relay::start(&app.url(), &args).await;
    for n in [&a, &b] {
        eventually(STEP, "broker up", || async { n.readyz_broker().await == StatusCode::OK }).await;
    }
    let t42 = hs256("k", &claims("42", &[], now() + 600));
    let t43 = hs256("k", &claims("43", &[], now() + 600));
    let mut on_a = ws_connect(&a.ws_url(&format!("/ws?token={t42}"))).await;
    let mut on_b = ws_connect(&b.ws_url(&format!("/ws?token={t42}"))).await;
    let mut other = ws_connect(&a.ws_url(&format!("/ws?token={t43}"))).await;

    // A numeric id works too, as it does in the connect hook's answer.
    let (status, body) = a.api("/api/disconnect", json!({"user":42}), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for c in [&mut on_a, &mut on_b] {
        let close = c.expect_close(STEP).await.expect("a close frame");
        assert_eq!(close.code, CloseCode::Policy);
    }
    assert_eq!(other.request(json!({"op":"ping"})).await["ok"], true, "user 43 stays");
}

#[tokio::test]
async fn cross_site_origins_are_refused() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let url = relay.ws_url("/ws");
    let evil = ws_connect_with(&url, &[("origin", "http://evil.example")]).await.err();
    assert_eq!(evil, Some(StatusCode::FORBIDDEN));
    let same = format!("http://{}", relay.public);
    assert!(ws_connect_with(&url, &[("origin", &same)]).await.is_ok(), "same host");
    let other_port = format!("http://127.0.0.1:{}", relay.public.port().wrapping_add(1));
    let refused = ws_connect_with(&url, &[("origin", &other_port)]).await.err();
    assert_eq!(refused, Some(StatusCode::FORBIDDEN), "same host, other port: another origin");
    let https = format!("https://{}", relay.public);
    let refused = ws_connect_with(&url, &[("origin", &https)]).await.err();
    assert_eq!(refused, Some(StatusCode::FORBIDDEN), "same host and port, other scheme: another origin");
    // X-Forwarded-* from a peer that is not a trusted proxy are not believed.
    let proxied = [
        ("origin", "https://app.example.com"),
        ("x-forwarded-host", "app.example.com"),
        ("x-forwarded-proto", "https"),
    ];
    let refused = ws_connect_with(&url, &proxied).await.err();
    assert_eq!(refused, Some(StatusCode::FORBIDDEN), "forwarded headers from an untrusted peer");
    assert!(ws_connect_with(&url, &[]).await.is_ok(), "no Origin: not a browser");
    assert_eq!(relay.metric("wsrelay_connections_total{result=\"forbidden\"}").await, 4.0);

    let behind_proxy = Relay::start(&app.url(), &["--trusted-proxy", "127.0.0.0/8"]).await;
    let url = behind_proxy.ws_url("/ws");
    assert!(ws_connect_with(&url, &proxied).await.is_ok(), "same origin behind a trusted proxy");
    let http_only = [("origin", "https://app.example.com"), ("x-forwarded-host", "app.example.com")];
    let refused = ws_connect_with(&url, &http_only).await.err();
    assert_eq!(refused, Some(StatusCode::FORBIDDEN), "the proxy says http, the page was https");

    let listed = Relay::start(&app.url(), &["--allowed-origin", "https://app.example.com"]).await;
    let url = listed.ws_url("/ws");
    assert!(ws_connect_with(&url, &[("origin", "https://app.example.com")]).await.is_ok());
    assert_eq!(
        ws_connect_with(&url, &[("origin", "https://other.example.com")]).await.err(),
        Some(StatusCode::FORBIDDEN)
    );

    let any = Relay::start(&app.url(), &["--allowed-origin", "*"]).await;
    assert!(ws_connect_with(&any.ws_url("/ws"), &[("origin", "http://evil.example")]).await.is_ok());
}

#[tokio::test]
async fn hook_paths_are_not_reachable_through_the_proxy() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--message-hook", "/app/message"]).await;
    let forged = json!({"user":"admin","connection":"x","data":{}}).to_string();
    let (status, _, _) = request(Method::POST, &relay.http_url("/app/message"), Some(forged), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(app.recorded("/app/message").is_empty(), "a client cannot impersonate wsrelay");
    let (status, _, _) = request(Method::GET, &relay.http_url("/app/other"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn disconnect_notifications_are_bounded_and_drops_counted() {
    let app = Upstream::start().await;
    app.set_hook("/app/gone", HookReply::new(200, &json!({})).delayed(Duration::from_millis(800)));
    let args = ["--disconnect-hook", "/app/gone", "--disconnect-hook-queue", "1", "--hook-concurrency", "1"];
    let relay = Relay::start(&app.url(), &args).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(ws_connect(&relay.ws_url("/ws")).await);
    }
    for mut c in clients {
        c.ws.close(None).await.unwrap();
    }
    let dropped = "wsrelay_hook_notifications_dropped_total{hook=\"disconnect\"}";
    relay.wait_metric(dropped, |v| v >= 1.0).await;
    relay.wait_metric("wsrelay_disconnects_total{reason=\"client\"}", |v| v == 6.0).await;
    // Every disconnect is either told or counted as dropped; with a queue of
    // one and one call at a time, most are dropped rather than piling up.
    eventually(STEP, "every disconnect accounted for", || async {
        app.recorded("/app/gone").len() as f64 + relay.metric(dropped).await == 6.0
    })
    .await;
    assert!(!app.recorded("/app/gone").is_empty());
    assert!(relay.metric(dropped).await >= 3.0);
}

#[tokio::test]
async fn hook_calls_are_marked_and_hook_paths_are_blocked_however_spelled() {
    let app = Upstream::start().await;
    app.set_hook("/internal/ws/connect", HookReply::new(200, &json!({"user":"1"})));
    let args =
        ["--connect-hook", "/internal/ws/connect", "--message-hook", "/internal/ws/message", "--hook-secret", "h00k"];
    let relay = Relay::start(&app.url(), &args).await;
    ws_connect(&relay.ws_url("/ws")).await;
    let call = &app.recorded("/internal/ws/connect")[0];
    assert_eq!(call.header("x-wsrelay-hook").as_deref(), Some("connect"));
    assert_eq!(call.header("x-wsrelay-hook-secret").as_deref(), Some("h00k"));

    for path in [
        "/internal/ws/message",
        "/internal/ws/%6Dessage",
        "/INTERNAL/ws/Message",
        "/internal/ws/message/",
        "//internal/ws/message",
        "/internal/ws/x/../message",
        "/internal/ws/message.json",
        "/internal;x/ws/message",
        "/internal/..;/internal/ws/message",
        "/internal/ws;x/message",
        "/internal/ws/message;jsessionid=1",
    ] {
        let (status, _, _) = request(Method::POST, &relay.http_url(path), Some("{}".into()), &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} must not reach the hook");
    }
    assert_eq!(app.state.recorded.lock().unwrap().iter().filter(|r| r.path.contains("essage")).count(), 0);
    // Headers that make some routers use another path than the request's.
    let headers =
        [("x-original-url", "/internal/ws/message".to_owned()), ("x-rewrite-url", "/internal/ws/message".to_owned())];
    let (status, _, _) = request(Method::POST, &relay.http_url("/harmless"), Some("{}".into()), &headers).await;
    assert_eq!(status, StatusCode::OK);
    let seen = app.recorded("/harmless");
    assert_eq!(seen[0].header("x-original-url"), None, "stripped");
    assert_eq!(seen[0].header("x-rewrite-url"), None, "stripped");
}

#[tokio::test]
async fn the_channel_limit_is_checked_before_any_hook_is_asked() {
    let app = Upstream::start().await;
    app.set_hook("/auth/sub", HookReply::new(200, &json!({})));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(&dir, "[default-namespace]\nsubscribe = \"hook\"\n");
    let relay =
        Relay::start(&app.url(), &["--config", &cfg, "--subscribe-hook", "/auth/sub", "--max-subscriptions", "2"])
            .await;
    let got = ws_connect_with(&relay.ws_url("/ws?channel=a&channel=b&channel=c"), &[]).await.err();
    assert_eq!(got, Some(StatusCode::BAD_REQUEST));
    assert!(app.recorded("/auth/sub").is_empty(), "no hook call for a request over the limit");
    let c = ws_connect(&relay.ws_url("/ws?channel=a&channel=a&channel=b")).await;
    assert_eq!(c.welcome["channels"], json!(["a", "b"]), "duplicates count once");
    assert_eq!(app.recorded("/auth/sub").len(), 2);
}

#[tokio::test]
async fn jwt_audience_issuer_not_before_and_subject() {
    let app = Upstream::start().await;
    let open = Relay::start(&app.url(), &["--jwt-secret", "k"]).await;
    let with_aud = hs256("k", &json!({"sub":"1","exp":now() + 600,"aud":"some-idp-client"}));
    assert_eq!(
        ws_connect(&open.ws_url(&format!("/ws?token={with_aud}"))).await.welcome["user"],
        "1",
        "aud ignored unless configured"
    );
    let refused = |relay: &Relay, token: String| {
        let url = relay.ws_url(&format!("/ws?token={token}"));
        async move { ws_connect_with(&url, &[]).await.err() }
    };
    let later = hs256("k", &json!({"sub":"1","exp":now() + 600,"nbf":now() + 300}));
    assert_eq!(refused(&open, later).await, Some(StatusCode::UNAUTHORIZED), "not valid yet");
    let nobody = hs256("k", &json!({"sub":"","exp":now() + 600}));
    assert_eq!(refused(&open, nobody).await, Some(StatusCode::UNAUTHORIZED), "empty sub");
    let bad_channel = hs256("k", &json!({"sub":"1","exp":now() + 600,"channels":["no spaces allowed"]}));
    assert_eq!(refused(&open, bad_channel).await, Some(StatusCode::UNAUTHORIZED));

    let strict =
        Relay::start(&app.url(), &["--jwt-secret", "k", "--jwt-audience", "wsrelay", "--jwt-issuer", "https://idp"])
            .await;
    let good = hs256("k", &json!({"sub":"2","exp":now() + 600,"aud":"wsrelay","iss":"https://idp"}));
    assert_eq!(ws_connect(&strict.ws_url(&format!("/ws?token={good}"))).await.welcome["user"], "2");
    let other_aud = hs256("k", &json!({"sub":"2","exp":now() + 600,"aud":"another","iss":"https://idp"}));
    assert_eq!(refused(&strict, other_aud).await, Some(StatusCode::UNAUTHORIZED));
    let other_iss = hs256("k", &json!({"sub":"2","exp":now() + 600,"aud":"wsrelay","iss":"https://evil"}));
    assert_eq!(refused(&strict, other_iss).await, Some(StatusCode::UNAUTHORIZED));
}

#[tokio::test]
async fn jwt_user_claim_and_personal_channel_as_open_webui_signs_them() {
    let app = Upstream::start().await;
    // Open WebUI's tokens: {"id": "<uuid>", "exp": …}, no `sub`.
    let args = ["--jwt-secret", "k", "--jwt-user-claim", "id", "--jwt-user-channel", "user:{user}"];
    let relay = Relay::start(&app.url(), &args).await;
    let token = hs256("k", &json!({"id": "5f1c-ab", "exp": now() + 600}));
    let mut c = ws_connect(&relay.ws_url(&format!("/ws?token={token}"))).await;
    assert_eq!(c.welcome["user"], "5f1c-ab");
    assert_eq!(c.welcome["channels"], json!(["user:5f1c-ab"]));
    relay.publish(json!({"channel": "user:5f1c-ab", "data": "hi"})).await;
    assert_eq!(c.recv().await["data"], "hi");
    // A numeric id is a user too; a token without the claim is refused.
    let numeric = hs256("k", &json!({"id": 42, "exp": now() + 600}));
    assert_eq!(ws_connect(&relay.ws_url(&format!("/ws?token={numeric}"))).await.welcome["user"], "42");
    let only_sub = hs256("k", &json!({"sub": "7", "exp": now() + 600}));
    let url = relay.ws_url(&format!("/ws?token={only_sub}"));
    assert_eq!(ws_connect_with(&url, &[]).await.err(), Some(StatusCode::UNAUTHORIZED));
    // The template must name the user and make a channel.
    let bad = wsrelay::config::Config::from_args(["wsrelay", "--jwt-secret", "k", "--jwt-user-channel", "user:"]);
    assert!(bad.unwrap_err().to_string().contains("jwt-user-channel"));
}
