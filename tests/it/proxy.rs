//! Everything that is not a relay upgrade reaches the app, streamed, with
//! proper forwarding headers; the app failing gives 502/504.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{Relay, STEP, Upstream, eventually, request};

#[tokio::test]
async fn get_and_post_reach_the_app_with_forwarding_headers() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;

    let (status, _, body) = request(Method::GET, &relay.http_url("/things?x=1"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/things");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-forwarded-host"], relay.public.to_string());
    assert_eq!(echo["headers"]["host"], relay.public.to_string(), "the original Host is kept");

    // Forwarding headers from a peer that is not a trusted proxy are replaced.
    let forged = [
        ("x-forwarded-for", "10.9.9.9".to_owned()),
        ("x-forwarded-proto", "https".to_owned()),
        ("x-forwarded-host", "evil.example".to_owned()),
        ("forwarded", "for=10.9.9.9;host=evil.example".to_owned()),
    ];
    let (_, _, body) = request(Method::GET, &relay.http_url("/things"), None, &forged).await;
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-forwarded-host"], relay.public.to_string());
    assert!(echo["headers"].get("forwarded").is_none(), "{echo}");

    // From a trusted proxy they are kept, and the peer appended.
    let relay = Relay::start(&app.url(), &["--trusted-proxy", "127.0.0.0/8,::1"]).await;
    let headers = [
        ("x-custom", "kept".to_owned()),
        ("x-forwarded-for", "10.1.2.3".to_owned()),
        ("connection", "x-secret".to_owned()),
        ("x-secret", "hop only".to_owned()),
        ("proxy-authorization", "Basic abc".to_owned()),
        ("te", "trailers".to_owned()),
    ];
    let (status, _, body) =
        request(Method::POST, &relay.http_url("/submit"), Some("hello body".into()), &headers).await;
    assert_eq!(status, StatusCode::OK);
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "hello body");
    assert_eq!(echo["headers"]["x-custom"], "kept");
    assert_eq!(echo["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1", "the peer is appended");
    for hop in ["x-secret", "proxy-authorization", "te"] {
        assert!(echo["headers"].get(hop).is_none(), "{hop} must not reach the app: {echo}");
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let (status, headers, body) = request(Method::GET, &relay.http_url("/hop"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"hop");
    assert_eq!(headers.get("x-kept").unwrap(), "yes");
    assert!(headers.get("x-hop").is_none(), "header named in Connection leaked");
    assert!(headers.get("keep-alive").is_none());
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(relay.http_url("/sse")).body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(STEP, client.request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for n in 0..3 {
        // The app sends event n only now: a buffering proxy would never deliver it.
        app.state.sse_gate.add_permits(1);
        let mut got = Vec::new();
        while !got.ends_with(b"\n\n") {
            let frame = tokio::time::timeout(STEP, body.frame()).await.expect("event in time").unwrap().unwrap();
            got.extend_from_slice(frame.data_ref().unwrap());
        }
        assert_eq!(String::from_utf8(got).unwrap(), format!("data: event {n}\n\n"));
    }
}

/// A POST whose body the test feeds chunk by chunk; returns the feeder and the pending response.
fn streaming_post(
    url: String,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let stream = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<_>>();
    let req = Request::post(url).body(StreamBody::new(stream)).unwrap();
    (tx, tokio::spawn(async move { client.request(req).await }))
}

#[tokio::test]
async fn large_upload_is_streamed_not_buffered() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let (tx, pending) = streaming_post(relay.http_url("/upload"));

    let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
    tx.send(chunk.clone()).await.unwrap();
    // The app sees the first megabyte while the client still holds the rest.
    eventually(STEP, "first chunk at the app", || async {
        app.state.upload_bytes.load(Ordering::SeqCst) >= chunk.len()
    })
    .await;
    for _ in 0..31 {
        tx.send(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let resp = tokio::time::timeout(STEP, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["received"], 32 * 1024 * 1024);
}

#[tokio::test]
async fn app_down_gives_502() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let relay = Relay::start(&format!("http://127.0.0.1:{port}"), &[]).await;
    let (status, _, body) = request(Method::GET, &relay.http_url("/anything"), None, &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("unreachable"));
    assert_eq!(relay.metric("wsrelay_upstream_requests_total{status=\"502\"}").await, 1.0);
}

#[tokio::test]
async fn slow_app_gives_504_after_the_timeout() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--upstream-timeout", "1s"]).await;
    let (status, _, _) = request(Method::GET, &relay.http_url("/slow?ms=8000"), None, &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let (status, _, body) = request(Method::GET, &relay.http_url("/slow?ms=10"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"slow done");
}

#[tokio::test]
async fn websocket_on_another_path_reaches_the_app() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.ws_url("/ws-echo")).await.expect("tunnelled upgrade");
    ws.send(Message::text("hi")).await.unwrap();
    let reply = tokio::time::timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("echo: hi"));
    ws.send(Message::text("again")).await.unwrap();
    let reply = tokio::time::timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("echo: again"));
}

#[tokio::test]
async fn http2_cleartext_downstream_works() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let client = Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let req = Request::post(relay.http_url("/h2")).body(Full::new(Bytes::from_static(b"over h2"))).unwrap();
    let resp = tokio::time::timeout(STEP, client.request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let echo: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["body"], "over h2");
    assert_eq!(echo["headers"]["host"], relay.public.to_string());
}

#[tokio::test]
async fn a_slow_upload_that_keeps_moving_is_not_cut_by_the_upstream_timeout() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &["--upstream-timeout", "1s"]).await;
    let (tx, pending) = streaming_post(relay.http_url("/upload"));
    // Five chunks of 1 KiB, 400 ms apart: two seconds, twice the timeout,
    // at 2.5 KiB/s, above --upstream-min-upload-rate (1 KiB/s).
    for _ in 0..5 {
        tx.send(Bytes::from(vec![b'x'; 1024])).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    drop(tx);
    let resp = tokio::time::timeout(STEP, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["received"], 5120);
}

#[tokio::test]
async fn only_websocket_upgrades_are_tunnelled_and_wsrelay_headers_never_pass() {
    let app = Upstream::start().await;
    let relay = Relay::start(&app.url(), &[]).await;
    let headers = [
        ("connection", "Upgrade, HTTP2-Settings".to_owned()),
        ("upgrade", "h2c".to_owned()),
        ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA".to_owned()),
        ("x-wsrelay-hook", "connect".to_owned()),
        ("x-wsrelay-hook-secret", "forged".to_owned()),
    ];
    let (status, _, body) = request(Method::GET, &relay.http_url("/plain"), None, &headers).await;
    assert_eq!(status, StatusCode::OK, "served as a plain request");
    let echo: Value = serde_json::from_slice(&body).unwrap();
    for h in ["upgrade", "http2-settings", "x-wsrelay-hook", "x-wsrelay-hook-secret"] {
        assert!(echo["headers"].get(h).is_none(), "{h} reached the app: {echo}");
    }
}
