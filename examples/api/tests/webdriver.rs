//! Just enough WebDriver (W3C, over plain HTTP/1.1 to a local `chromedriver`) for the
//! dashboard test: sessions, navigation, elements, clicks, typing, scripts, screenshots.
//! A handful of JSON calls did not justify a client crate and its HTTP and TLS stacks;
//! the end-to-end test uses the same few lines of HTTP (`send`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` process on a free port, killed on drop.
pub(super) struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Driver {
    /// Starts `chromedriver` and waits until it answers.
    pub(super) async fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; bash .ci/setup installs it)");
        let driver = Driver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = http(port, "GET", "/status", None).await
                && status["ready"] == true
            {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A headless Chromium session with a fresh profile in `profile`.
    pub(super) async fn session(&self, profile: &std::path::Path) -> Session {
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=1400,1100".to_owned(),
            "--autoplay-policy=no-user-gesture-required".to_owned(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let value = http(self.port, "POST", "/session", Some(caps))
            .await
            .expect("a browser session");
        Session {
            port: self.port,
            id: value["sessionId"]
                .as_str()
                .unwrap_or_else(|| panic!("no session: {value}"))
                .to_owned(),
        }
    }
}

/// One browser session.
pub(super) struct Session {
    port: u16,
    id: String,
}

impl Session {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        http(self.port, method, &path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub(super) async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// The element matching `css`, waiting up to 20 s for it to appear.
    pub(super) async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let path = format!("/session/{}/element", self.id);
            let body = json!({ "using": "css selector", "value": css });
            if let Ok(found) = http(self.port, "POST", &path, Some(body)).await
                && let Some(id) = found[ELEMENT].as_str()
            {
                return id.to_owned();
            }
            assert!(Instant::now() < deadline, "no element {css:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }

    pub(super) async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call("POST", &format!("/element/{id}/clear"), Some(json!({})))
            .await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub(super) async fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Runs `script` until it returns something truthy, up to 30 s; returns that.
    pub(super) async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.eval(script).await;
            if !matches!(value, Value::Null | Value::Bool(false)) {
                return value;
            }
            assert!(Instant::now() < deadline, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the window.
    pub(super) async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let png = self.call("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("a PNG")
    }

    pub(super) async fn close(self) {
        let path = format!("/session/{}", self.id);
        let _ = http(self.port, "DELETE", &path, None).await;
    }
}

/// One WebDriver call: its `value`, or the driver's error (or a timeout after 60 s).
async fn http(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    tokio::time::timeout(Duration::from_secs(60), call(port, method, path, body))
        .await
        .map_err(|_| format!("{method} {path}: no answer in 60 s"))?
}

async fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (_, content) = send(port, method, path, &body).await?;
    let reply: Value = serde_json::from_slice(&content).map_err(|e| e.to_string())?;
    let value = reply["value"].clone();
    if value.get("error").is_some() {
        return Err(value.to_string());
    }
    Ok(value)
}

/// One HTTP/1.1 request with a JSON body to a local port: the response's head
/// (lower-cased) and its body, de-chunked.
pub(super) async fn send(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(String, Vec<u8>), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open whatever the request says: read the head,
    // then exactly the body it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the HTTP head".into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut content = raw[split + 4..].to_vec();
    match length {
        Some(length) => {
            while content.len() < length {
                let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed inside the body".into());
                }
                content.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            stream
                .read_to_end(&mut content)
                .await
                .map_err(|e| e.to_string())?;
            if head.contains("transfer-encoding: chunked") {
                content = dechunk(&content)?;
            }
        }
    }
    Ok((head, content))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..line]).trim(), 16)
            .map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(out);
        }
        let start = line + 2;
        out.extend_from_slice(body.get(start..start + size).ok_or("short chunk")?);
        body = body.get(start + size + 2..).ok_or("short chunk")?;
    }
}
