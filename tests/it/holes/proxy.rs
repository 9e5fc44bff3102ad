//! A TCP proxy in front of a Redis that a test can turn faulty: answer every command
//! `LOADING` (a restarted server reading its data), hold every reply (a stalled
//! server), or refuse connections (an outage), and drop every connection at once.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Forward,
    /// Every command is answered `-LOADING`, none reaches Redis.
    Loading,
    /// Commands reach Redis, replies are held back.
    Stall,
    /// New connections are closed at once (existing ones: see `drop_all`).
    Down,
}

pub(crate) struct Proxy {
    pub(crate) port: u16,
    mode: watch::Sender<Mode>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_all();
    }
}

impl Proxy {
    pub(crate) async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, rx) = watch::channel(Mode::Forward);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let c = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() == Mode::Down {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let task = tokio::spawn(pump(client, server, rx.clone()));
                c.lock().unwrap().push(task);
            }
        });
        Proxy {
            port,
            mode,
            conns,
            accept,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every connection made so far.
    pub(crate) fn drop_all(&self) {
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Length of the first complete command (a RESP array of bulk strings) in `buf`.
fn frame_len(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], at: usize) -> Option<(i64, usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let n = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    if buf.first() != Some(&b'*') {
        // An inline command: one line.
        return buf.windows(2).position(|w| w == b"\r\n").map(|p| p + 2);
    }
    let (n, mut at) = line(buf, 0)?;
    for _ in 0..n {
        let (len, start) = line(buf, at)?;
        at = start + usize::try_from(len).ok()? + 2;
        if at > buf.len() {
            return None;
        }
    }
    Some(at)
}

async fn pump(client: TcpStream, server: TcpStream, mode: watch::Receiver<Mode>) {
    let (mut client_rd, client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let client_wr = Arc::new(tokio::sync::Mutex::new(client_wr));
    let up = {
        let client_wr = client_wr.clone();
        let mode = mode.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                let n = match client_rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(len) = frame_len(&buf) {
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    if *mode.borrow() == Mode::Loading {
                        let reply = b"-LOADING Redis is loading the dataset in memory\r\n";
                        if client_wr.lock().await.write_all(reply).await.is_err() {
                            return;
                        }
                    } else if server_wr.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        let mut mode = mode;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match server_rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while *mode.borrow() == Mode::Stall {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            if client_wr.lock().await.write_all(&chunk[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
