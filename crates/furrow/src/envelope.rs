//! JSON views of readings, shared by the HTTP API and the MQTT events:
//! JSON payloads as JSON, anything else as standard base64.

use base64::Engine;
use furrow_proto::ContentType;
use serde_json::Value;

/// The payload as a JSON value.
pub fn payload_value(content_type: u8, payload: &[u8]) -> Value {
    let json = match ContentType::from_u8(content_type) {
        // Validated on the way in; should it not parse (written by
        // something else), it goes out as base64 instead.
        Some(ContentType::Json) => serde_json::from_slice(payload).ok(),
        _ => None,
    };
    json.unwrap_or_else(|| Value::String(base64::engine::general_purpose::STANDARD.encode(payload)))
}

/// The content type's name: json, cbor, text, octets (or its number).
pub fn content_type_name(content_type: u8) -> String {
    ContentType::from_u8(content_type)
        .map_or_else(|| format!("0x{content_type:02x}"), |c| c.name().to_owned())
}
