//! Test support: a local HTTP server (a fake Stripe for what localstripe cannot simulate, a
//! webhook endpoint), raw HTTP/1.1 calls, and localstripe itself.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request the local server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The form body as pairs.
    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }

    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// What the local server answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A response, sent after `delay`.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    },
    /// The connection is closed without a response.
    HangUp,
}

impl Answer {
    pub fn json(status: u16, body: serde_json::Value) -> Answer {
        Answer::Respond {
            status,
            headers: vec![("content-type", "application/json".to_owned())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub fn raw(status: u16, body: &str) -> Answer {
        Answer::Respond {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    /// The same answer with one more header (nothing for a hang-up).
    pub fn with_header(mut self, name: &'static str, value: &str) -> Answer {
        if let Answer::Respond { headers, .. } = &mut self {
            headers.push((name, value.to_owned()));
        }
        self
    }

    /// The same answer, sent after `wait` (a hang-up stays immediate).
    pub fn after(mut self, wait: Duration) -> Answer {
        if let Answer::Respond { delay, .. } = &mut self {
            *delay = wait;
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[error("hung up")]
struct HungUp;

/// Serves HTTP/1.1 on 127.0.0.1 (a free port) on the current runtime, answering every request
/// with `handler`.
pub async fn serve<F>(handler: F) -> SocketAddr
where
    F: Fn(Received) -> Answer + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("address");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let received = Received {
                            method: parts.method.to_string(),
                            path: parts
                                .uri
                                .path_and_query()
                                .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string),
                            headers: parts.headers,
                            body,
                        };
                        match handler(received) {
                            Answer::Respond {
                                status,
                                headers,
                                body,
                                delay,
                            } => {
                                tokio::time::sleep(delay).await;
                                let mut response = Response::builder().status(status);
                                for (name, value) in headers {
                                    response = response.header(name, value);
                                }
                                Ok::<_, HungUp>(response.body(Full::new(Bytes::from(body))).expect("a response"))
                            }
                            Answer::HangUp => Err(HungUp),
                        }
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP answer, as received.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One plain HTTP/1.1 request over a new connection, the body sent as is.
pub async fn request(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).await.expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Reply { status, headers, body }
}

/// One plain HTTP/1.1 request (for a server's test-only endpoints, and objects the gateway
/// never creates): the status and the body.
pub async fn http(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let reply = request(base, method, path, headers, body.as_bytes()).await;
    (reply.status, reply.body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// A form body.
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.extend_pairs(pairs.iter());
    form.finish()
}

// --- localstripe ----------------------------------------------------------------------------

/// The version of localstripe the tests run against.
pub const LOCALSTRIPE: &str = "localstripe==1.15.10";

/// The secret key the tests use (localstripe accepts any `sk_...`).
pub const SECRET_KEY: &str = "sk_test_token_billing";

static LOCALSTRIPE_URL: OnceLock<String> = OnceLock::new();

/// The base URL of a running localstripe: `LOCALSTRIPE_URL` when set (CI starts one), else one
/// started now for this test binary, from a virtualenv under `target/` made on first use. It
/// stops when the test binary ends.
pub fn localstripe() -> &'static str {
    LOCALSTRIPE_URL.get_or_init(|| match std::env::var("LOCALSTRIPE_URL") {
        Ok(url) if !url.trim().is_empty() => url.trim().trim_end_matches('/').to_owned(),
        _ => start_localstripe(),
    })
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The virtualenv with localstripe, made once: in a directory of its own, then renamed into
/// place, so that test binaries starting together never see half of one.
fn virtualenv() -> PathBuf {
    let venv = target_dir().join("localstripe-venv");
    if venv.join("ready").exists() {
        return venv;
    }
    let building = target_dir().join(format!("localstripe-venv.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(target_dir()).expect("target dir");
    run(Command::new("python3").arg("-m").arg("venv").arg(&building));
    run(Command::new(building.join("bin/python")).args(["-m", "pip", "install", "--quiet", LOCALSTRIPE]));
    std::fs::write(building.join("ready"), LOCALSTRIPE).expect("mark ready");
    if std::fs::rename(&building, &venv).is_err() {
        // Another test binary made it first.
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(
        venv.join("ready").exists(),
        "no localstripe virtualenv at {}",
        venv.display()
    );
    venv
}

fn start_localstripe() -> String {
    let python = virtualenv().join("bin/python");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let log_path = target_dir().join(format!("localstripe-{port}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/localstripe_server.py");
    // Never waited for: the server lives as long as the test binary, and stops when it ends
    // (`--exit-with-parent`).
    #[allow(clippy::zombie_processes)]
    Command::new(python)
        .arg(launcher)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--exit-with-parent"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start localstripe");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "localstripe did not start: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    format!("http://127.0.0.1:{port}")
}

/// A call to localstripe with the test key.
pub async fn stripe(method: &str, path: &str, pairs: &[(&str, &str)]) -> serde_json::Value {
    let auth = format!("Bearer {SECRET_KEY}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if method == "POST" {
        headers.push(("Content-Type", "application/x-www-form-urlencoded"));
    }
    let (status, body) = http(localstripe(), method, path, &headers, &form(pairs)).await;
    assert!(status < 300, "{method} {path}: {status} {body}");
    serde_json::from_str(&body).expect("a JSON answer")
}

/// A card payment method with this number (localstripe's test cards: 4242424242424242
/// succeeds, 4000000000000341 is declined when charged, 4000002500003155 needs
/// authentication).
pub async fn card(number: &str) -> String {
    let card = stripe(
        "POST",
        "/v1/payment_methods",
        &[
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2030"),
            ("card[cvc]", "123"),
        ],
    )
    .await;
    card["id"].as_str().expect("a payment method").to_owned()
}

/// A customer whose default payment method is a card with this number.
pub async fn customer_with_card(number: &str) -> String {
    let pm = card(number).await;
    let customer = stripe(
        "POST",
        "/v1/customers",
        &[
            ("payment_method", &pm),
            ("invoice_settings[default_payment_method]", &pm),
        ],
    )
    .await;
    customer["id"].as_str().expect("a customer").to_owned()
}

/// The PaymentIntents localstripe holds for a charge.
pub async fn payment_intents_for(charge_key: &str) -> Vec<serde_json::Value> {
    let query = format!("metadata['charge_key']:'{charge_key}'");
    let result = stripe(
        "GET",
        &format!(
            "/v1/payment_intents/search?{}",
            form(&[("query", &query), ("limit", "100")])
        ),
        &[],
    )
    .await;
    result["data"].as_array().cloned().unwrap_or_default()
}

/// Forgets the idempotency keys containing `text`, as Stripe does after 24 hours.
pub async fn forget_idempotency_keys(text: &str) {
    let (status, body) = http(
        localstripe(),
        "POST",
        "/_config/idempotency/forget",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &form(&[("contains", text)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Registers a webhook endpoint with localstripe; every endpoint gets every event.
pub async fn register_webhook(id: &str, url: &str, secret: &str) {
    let (status, body) = http(
        localstripe(),
        "POST",
        &format!("/_config/webhooks/{id}"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &form(&[("url", url), ("secret", secret)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A served endpoint that collects what it receives, answering 200.
pub async fn collecting_endpoint() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Received>>>) {
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let addr = serve(move |request| {
        sink.lock().expect("lock").push(request);
        Answer::raw(200, "")
    })
    .await;
    (addr, received)
}

/// Waits (up to 15 s, looking every 100 ms) until `check` finds what it looks for, and returns
/// it; a check that only needs to hold answers `Some(())`.
pub async fn eventually<T, F, Checked>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Checked,
    Checked: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
