//! The two wire protocols, as far as the benchmark needs them, over one tokio-tungstenite client.
//!
//! - **cozy** (`GET /v1/realtime`): `hello` → `welcome`, `subscribe` → `subscribed`, `publish` with a
//!   `client_msg_id`; messages arrive as `{"type":"message",…,"body":{…}}`. Protocol pings are answered
//!   by tungstenite itself while the connection is being read.
//! - **Socket.IO 4** over engine.io v4, WebSocket transport only (`GET /socket.io/?EIO=4&transport=websocket`):
//!   the server opens with `0{…}`, the client connects the default namespace with `40` and gets
//!   `40{"sid":…}`; the server pings with `2` and the client must answer `3`; events are
//!   `42["message",{…}]`, and the client emits `42["publish",{…}]`.
//!
//! Both systems carry the same body, `{"bench_n":N,"bench_t":MICROS,"text":"…"}`; receivers find the two
//! numbers by scanning the frame text rather than parsing it, so the load generator's cost per message
//! stays small and the same for both.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Cozy,
    SocketIo,
}

impl System {
    pub fn parse(s: &str) -> anyhow::Result<System> {
        match s {
            "cozy" => Ok(System::Cozy),
            "sio" | "socketio" | "socket.io" => Ok(System::SocketIo),
            _ => bail!("unknown system {s:?}: cozy or sio"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            System::Cozy => "cozy",
            System::SocketIo => "socket.io",
        }
    }

    fn path(self) -> &'static str {
        match self {
            System::Cozy => "/v1/realtime",
            System::SocketIo => "/socket.io/?EIO=4&transport=websocket",
        }
    }
}

/// What a received text frame is, for the benchmark.
pub enum Kind<'a> {
    /// A fanned-out message: the publisher's sequence number and send time (µs on the loadgen clock).
    Message { n: u64, t: u64 },
    /// cozy presence diff (joins/leaves), the cost of the contract's presence per room.
    Presence,
    /// cozy `ack` of a publish.
    Ack,
    /// engine.io ping: answer `3`.
    Ping,
    /// cozy `error` frame (kept for the report).
    Error(&'a str),
    Other,
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].trim_start();
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

pub fn classify(system: System, text: &str) -> Kind<'_> {
    let message = match system {
        System::Cozy => text.starts_with(r#"{"type":"message""#),
        System::SocketIo => text.starts_with(r#"42["message""#),
    };
    if message {
        return match (number_after(text, r#""bench_n":"#), number_after(text, r#""bench_t":"#)) {
            (Some(n), Some(t)) => Kind::Message { n, t },
            _ => Kind::Other,
        };
    }
    match system {
        System::Cozy if text.starts_with(r#"{"type":"presence""#) => Kind::Presence,
        System::Cozy if text.starts_with(r#"{"type":"ack""#) => Kind::Ack,
        System::Cozy if text.starts_with(r#"{"type":"error""#) => Kind::Error(text),
        System::SocketIo if text == "2" => Kind::Ping,
        _ => Kind::Other,
    }
}

/// The body both systems carry; `text` makes it the size of a short chat line.
pub fn body(n: u64, t_us: u64) -> String {
    format!(
        r#"{{"bench_n":{n},"bench_t":{t_us},"text":"fan-out benchmark message, about the size of a short chat line."}}"#
    )
}

/// The frame a publisher sends for message `n`.
pub fn publish_frame(system: System, room: &str, publisher: usize, n: u64, t_us: u64) -> String {
    match system {
        System::Cozy => format!(
            r#"{{"type":"publish","room":"{room}","client_msg_id":"p{publisher}-{n}","body":{}}}"#,
            body(n, t_us)
        ),
        System::SocketIo => format!(r#"42["publish",{}]"#, body(n, t_us)),
    }
}

/// Opens a TCP connection from `src` and upgrades it to a WebSocket.
pub async fn open(system: System, server: SocketAddr, src: Ipv4Addr) -> anyhow::Result<Ws> {
    let sock = TcpSocket::new_v4()?;
    // Let connect() choose the port against the full 4-tuple: bind(port 0) alone reserves a port
    // for any destination and runs out at ~28 000 per source address, TIME_WAIT included.
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind((src, 0).into())?;
    let tcp = sock.connect(server).await.context("connect")?;
    tcp.set_nodelay(true)?;
    // Small client buffers: 10 000 connections with tungstenite's default 128 KiB read buffer
    // would take 1.3 GB of the load generator's memory.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let url = format!("ws://{server}{}", system.path());
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .context("websocket handshake")?;
    Ok(ws)
}

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    Closed(Option<u16>),
    Error(String),
    Eof,
}

impl End {
    pub fn label(&self) -> String {
        match self {
            End::Closed(Some(code)) => format!("close {code}"),
            End::Closed(None) => "close (no code)".to_string(),
            End::Error(e) => format!("error: {e}"),
            End::Eof => "eof".to_string(),
        }
    }
}

/// Reads the next text frame; a close or error ends the connection.
pub async fn next_text(ws: &mut Ws) -> Result<String, End> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
            Some(Ok(Message::Close(frame))) => {
                return Err(End::Closed(frame.map(|f| u16::from(f.code))));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(End::Error(e.to_string())),
            None => return Err(End::Eof),
        }
    }
}

async fn expect(ws: &mut Ws, what: &str, is: impl Fn(&str) -> bool, counts: &mut Setup) -> anyhow::Result<()> {
    let wait = async {
        loop {
            let text = next_text(ws).await.map_err(|e| anyhow::anyhow!("{} while waiting for {what}", e.label()))?;
            if is(&text) {
                return Ok(());
            }
            if text.starts_with(r#"{"type":"presence""#) {
                counts.presence += 1;
            } else if text.starts_with(r#"{"type":"error""#) {
                bail!("{text} while waiting for {what}");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .with_context(|| format!("no {what} within 120 s"))?
}

/// Frames seen during the handshake that the caller may want to count.
#[derive(Default)]
pub struct Setup {
    pub presence: u64,
}

/// After `open`: authenticate and join the room (cozy; no room when `room` is empty), or connect the
/// namespace (Socket.IO, whose server puts every connection in its room).
pub async fn join(system: System, ws: &mut Ws, token: &str, room: &str) -> anyhow::Result<Setup> {
    let mut setup = Setup::default();
    match system {
        System::Cozy => {
            ws.send(Message::text(format!(r#"{{"type":"hello","token":"{token}"}}"#))).await?;
            expect(ws, "welcome", |t| t.starts_with(r#"{"type":"welcome""#), &mut setup).await?;
            if room.is_empty() {
                return Ok(setup); // authenticated, in no room
            }
            ws.send(Message::text(format!(r#"{{"type":"subscribe","room":"{room}"}}"#))).await?;
            expect(ws, "subscribed", |t| t.starts_with(r#"{"type":"subscribed""#), &mut setup).await?;
        }
        System::SocketIo => {
            expect(ws, "engine.io open", |t| t.starts_with('0'), &mut setup).await?;
            ws.send(Message::text("40")).await?;
            expect(ws, "namespace connect", |t| t.starts_with("40"), &mut setup).await?;
        }
    }
    Ok(setup)
}

/// Answers an engine.io ping.
pub async fn pong(ws: &mut Ws) -> Result<(), End> {
    ws.send(Message::text("3")).await.map_err(|e| End::Error(e.to_string()))
}

/// Source address for connection `i`: 5 000 per address keeps well inside the ephemeral port range.
pub fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i / 5000) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_numbers_in_both_systems_frames() {
        let cozy = format!(
            r#"{{"type":"message","room":"chat:b","seq":3,"id":9,"user_id":1,"client_msg_id":"p0-7","body":{},"ts":"2026-01-01T00:00:00.000Z"}}"#,
            body(7, 123456)
        );
        assert!(matches!(classify(System::Cozy, &cozy), Kind::Message { n: 7, t: 123456 }));
        let sio = format!(r#"42["message",{}]"#, body(8, 99));
        assert!(matches!(classify(System::SocketIo, &sio), Kind::Message { n: 8, t: 99 }));
        assert!(matches!(classify(System::SocketIo, "2"), Kind::Ping));
        assert!(matches!(classify(System::Cozy, r#"{"type":"presence","room":"x"}"#), Kind::Presence));
    }
}
