//! Every frame of the realtime contract (realtime-protocol.md), as Rust types.
//!
//! These types are the source of `docs/realtime-frames.schema.json` (JSON Schema, generated with
//! schemars; a test fails when the file is stale). Client frames are parsed strictly: an unknown `type`
//! is `unknown_type`, anything else malformed (missing field, unknown field, wrong type) is `bad_frame`
//! with the serde message naming the field.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest text frame a client may send (bytes); larger closes the connection with 4008.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// The largest `body` of a published message (bytes of its JSON text).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Close codes of the contract.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const AUTH: u16 = 4001;
    pub const FORBIDDEN: u16 = 4003;
    pub const POLICY: u16 = 4008;
    pub const SLOW_CONSUMER: u16 = 4009;
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Must be the first frame, within 5 s.
    Hello {
        token: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// Join a room; with `since` (the last seq seen) replay what was missed first.
    Subscribe {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Unsubscribe {
        room: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// Persist and broadcast `body` (any JSON value up to 16 KiB). Resending the same
    /// `(user, room, client_msg_id)` returns the original ack and stores nothing.
    Publish {
        room: String,
        client_msg_id: String,
        body: serde_json::Value,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Typing {
        room: String,
        active: bool,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Ping {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

impl ClientFrame {
    pub const TYPES: &'static [&'static str] = &[
        "hello",
        "subscribe",
        "unsubscribe",
        "publish",
        "typing",
        "ping",
    ];

    /// The client's `ref`, echoed by every direct reply.
    pub fn reference(&self) -> Option<&str> {
        match self {
            ClientFrame::Hello { reference, .. }
            | ClientFrame::Subscribe { reference, .. }
            | ClientFrame::Unsubscribe { reference, .. }
            | ClientFrame::Publish { reference, .. }
            | ClientFrame::Typing { reference, .. }
            | ClientFrame::Ping { reference } => reference.as_deref(),
        }
    }

    /// Parses one text frame; the error is ready to send back.
    // The error is the frame that goes back to the client as it is; boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    pub fn parse(text: &str) -> Result<ClientFrame, ServerFrame> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ServerFrame::error(ErrorCode::BadFrame, format!("not JSON: {e}"), None))?;
        let reference = value
            .get("ref")
            .and_then(|r| r.as_str())
            .map(str::to_string);
        let Some(kind) = value
            .get("type")
            .and_then(|t| t.as_str())
            .map(str::to_string)
        else {
            return Err(ServerFrame::error(
                ErrorCode::BadFrame,
                "a frame is a JSON object with a string field `type`",
                reference,
            ));
        };
        if !Self::TYPES.contains(&kind.as_str()) {
            return Err(ServerFrame::error(
                ErrorCode::UnknownType,
                format!(
                    "unknown frame type {kind:?}; expected one of {}",
                    Self::TYPES.join(", ")
                ),
                reference,
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| ServerFrame::error(ErrorCode::BadFrame, format!("{kind}: {e}"), reference))
    }
}

/// One user's presence in a room: how many connections they have in it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct PresenceEntry {
    pub user_id: i64,
    pub connections: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct PresenceLeave {
    pub user_id: i64,
}

/// Error codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    UnknownType,
    Forbidden,
    NotSubscribed,
    TooLarge,
    RateLimited,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        conn_id: String,
        user_id: i64,
        heartbeat_ms: u64,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Subscribed {
        room: String,
        last_seq: u64,
        recovered: bool,
        presence: Vec<PresenceEntry>,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Unsubscribed {
        room: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Ack {
        client_msg_id: String,
        seq: u64,
        /// RFC 3339, UTC, milliseconds.
        ts: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// A published message; `seq` is per room, from 1, without gaps.
    Message {
        room: String,
        seq: u64,
        id: i64,
        user_id: i64,
        client_msg_id: String,
        body: serde_json::Value,
        ts: String,
    },
    /// A reservation changed state (sequenced and recoverable like messages). `reservation` has the
    /// shape of the HTTP API's reservation; `available` is present in `resource:` rooms.
    Reservation {
        room: String,
        seq: u64,
        reservation: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        available: Option<i64>,
    },
    Presence {
        room: String,
        joins: Vec<PresenceEntry>,
        leaves: Vec<PresenceLeave>,
    },
    Typing {
        room: String,
        user_id: i64,
        active: bool,
    },
    Pong {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

impl ServerFrame {
    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            reference,
        }
    }

    /// The JSON text sent on the wire.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("frames serialize")
    }
}

/// A room name, checked against the contract's three kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Room {
    Chat(String),
    Resource(i64),
    User(i64),
}

impl Room {
    pub fn parse(name: &str) -> Option<Room> {
        let (kind, rest) = name.split_once(':')?;
        match kind {
            "chat"
                if !rest.is_empty()
                    && rest.len() <= 128
                    && rest
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) =>
            {
                Some(Room::Chat(rest.to_string()))
            }
            "resource" => rest.parse().ok().filter(|id| *id > 0).map(Room::Resource),
            "user" => rest.parse().ok().filter(|id| *id > 0).map(Room::User),
            _ => None,
        }
    }

    /// May `user` subscribe?
    pub fn may_subscribe(&self, user: i64) -> bool {
        match self {
            Room::Chat(_) | Room::Resource(_) => true,
            Room::User(id) => *id == user,
        }
    }

    /// May a client publish here? (`resource:` and `user:` rooms are the server's.)
    pub fn clients_may_publish(&self) -> bool {
        matches!(self, Room::Chat(_))
    }
}

/// The JSON Schema of both directions, as written to `docs/realtime-frames.schema.json`.
pub fn schema_document() -> String {
    let client = schemars::schema_for!(ClientFrame);
    let server = schemars::schema_for!(ServerFrame);
    let doc = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cozy realtime frames (GET /v1/realtime), generated from src/realtime/frames.rs",
        "description": "Text frames, one JSON object each. `client` lists what a client may send, `server` what the server sends. Regenerate with `COZY_WRITE_SCHEMA=1 cargo test --lib realtime::frames`.",
        "client": client,
        "server": server,
    });
    let mut text = serde_json::to_string_pretty(&doc).expect("schema serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_strictly() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe","room":"chat:a","since":3,"ref":"r1"}"#)
                .unwrap(),
            ClientFrame::Subscribe {
                room: "chat:a".into(),
                since: Some(3),
                reference: Some("r1".into())
            }
        );
        let unknown = ClientFrame::parse(r#"{"type":"dance","ref":"x"}"#).unwrap_err();
        assert!(matches!(
            unknown,
            ServerFrame::Error { code: ErrorCode::UnknownType, ref reference, .. } if reference.as_deref() == Some("x")
        ));
        let extra = ClientFrame::parse(r#"{"type":"ping","color":"red"}"#).unwrap_err();
        assert!(
            matches!(&extra, ServerFrame::Error { code: ErrorCode::BadFrame, message, .. } if message.contains("color")),
            "{extra:?}"
        );
        let missing =
            ClientFrame::parse(r#"{"type":"publish","room":"chat:a","body":1}"#).unwrap_err();
        assert!(
            matches!(&missing, ServerFrame::Error { code: ErrorCode::BadFrame, message, .. } if message.contains("client_msg_id")),
            "{missing:?}"
        );
        assert!(matches!(
            ClientFrame::parse("[1,2]").unwrap_err(),
            ServerFrame::Error {
                code: ErrorCode::BadFrame,
                ..
            }
        ));
        assert!(matches!(
            ClientFrame::parse("{nope").unwrap_err(),
            ServerFrame::Error {
                code: ErrorCode::BadFrame,
                ..
            }
        ));
    }

    #[test]
    fn server_frames_have_the_contract_shape() {
        let ack = ServerFrame::Ack {
            client_msg_id: "c1".into(),
            seq: 4,
            ts: "2026-01-01T00:00:00.000Z".into(),
            reference: None,
        };
        assert_eq!(
            ack.to_text(),
            r#"{"type":"ack","client_msg_id":"c1","seq":4,"ts":"2026-01-01T00:00:00.000Z"}"#
        );
        let pong = ServerFrame::Pong {
            reference: Some("p".into()),
        };
        assert_eq!(pong.to_text(), r#"{"type":"pong","ref":"p"}"#);
        let err = ServerFrame::error(ErrorCode::NotSubscribed, "join first", None);
        assert_eq!(
            err.to_text(),
            r#"{"type":"error","code":"not_subscribed","message":"join first"}"#
        );
    }

    #[test]
    fn rooms_and_their_acl() {
        assert_eq!(Room::parse("chat:lobby"), Some(Room::Chat("lobby".into())));
        assert_eq!(Room::parse("resource:12"), Some(Room::Resource(12)));
        assert_eq!(Room::parse("user:7"), Some(Room::User(7)));
        for bad in [
            "chat:",
            "lobby",
            "resource:x",
            "user:-1",
            "user:0",
            "admin:1",
            "chat:a b",
        ] {
            assert_eq!(Room::parse(bad), None, "{bad}");
        }
        assert!(Room::User(7).may_subscribe(7));
        assert!(!Room::User(7).may_subscribe(8));
        assert!(Room::Resource(1).may_subscribe(8));
        assert!(Room::Chat("a".into()).clients_may_publish());
        assert!(!Room::Resource(1).clients_may_publish());
        assert!(!Room::User(7).clients_may_publish());
    }

    #[test]
    fn the_schema_document_in_docs_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/realtime-frames.schema.json"
        );
        let generated = schema_document();
        if std::env::var("COZY_WRITE_SCHEMA").as_deref() == Ok("1") {
            std::fs::write(path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "docs/realtime-frames.schema.json is stale: run COZY_WRITE_SCHEMA=1 cargo test --lib realtime::frames"
        );
    }
}
