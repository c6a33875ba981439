//! The handshake's decisions, without I/O: what the first frame must be,
//! who is authenticated, and what WELCOME says. The driver does the waiting
//! (the HELLO deadline, the store lookups, the takeover) around them.

use furrow_proto::{ErrorCode, Hello, Message, MessageType, RawFrame, Welcome};
use tokio::time::Duration;

use super::machine::Fatal;
use crate::config::Config;
pub use crate::devices::auth::Verified;
use crate::store::DeviceAuth;

/// The first frame of a connection as HELLO, or the ERROR it earns with
/// the outcome label for `furrow_handshakes_total`.
pub fn hello(frame: RawFrame) -> Result<Hello, (Fatal, &'static str)> {
    if frame.kind != MessageType::Hello {
        let f = Fatal(
            ErrorCode::ProtocolError,
            "the first message must be HELLO".into(),
        );
        return Err((f, "not_hello"));
    }
    match Message::from_frame(frame) {
        Ok(Message::Hello(h)) => Ok(h),
        Ok(_) => Err((
            Fatal(
                ErrorCode::Internal,
                "HELLO parsed as another message".into(),
            ),
            "internal",
        )),
        Err(e) => Err((Fatal(e.code(), e.to_string()), "bad_hello")),
    }
}

/// What a verified TLS client certificate says about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certificate {
    /// No mutual TLS, or no certificate: the token decides.
    Absent,
    /// The certificate names the device HELLO names.
    Matches,
    /// It names another device, or none.
    Mismatch,
}

/// Whether a device is in, and with which credential. Under mutual TLS
/// the certificate stands for the token (an empty token is accepted; a
/// token given must still be right); a certificate for another device
/// fails like a wrong token.
pub fn authenticated(
    found: Option<&DeviceAuth>,
    token: &[u8],
    cert: Certificate,
    now_ms: u64,
) -> Verified {
    match cert {
        Certificate::Mismatch => Verified::No,
        Certificate::Matches if token.is_empty() => match found {
            Some(d) if !d.revoked => Verified::Current,
            _ => Verified::No,
        },
        _ => crate::devices::auth::verify(found, token, now_ms),
    }
}

/// Extensions this gateway supports (docs/protocol.md, "Capabilities").
pub const SUPPORTED_CAPABILITIES: u32 = furrow_proto::CAP_STATE | furrow_proto::CAP_FIRMWARE;

/// The extensions granted for those asked: the supported ones, FIRMWARE
/// only with STATE (progress travels in the reported state).
pub fn grant(asked: u32) -> u32 {
    let mut c = asked & SUPPORTED_CAPABILITIES;
    if c & furrow_proto::CAP_STATE == 0 {
        c &= !furrow_proto::CAP_FIRMWARE;
    }
    c
}

/// WELCOME for a HELLO that asked for `requested_keepalive_s` and
/// `capabilities` ([`grant`]), announced only to a device that asked (an
/// older device's WELCOME is unchanged); and the silence after which the
/// device is dropped (1.5 x the effective keepalive).
pub fn welcome(
    cfg: &Config,
    requested_keepalive_s: u16,
    capabilities: Option<u32>,
    last_seq: u64,
    now_ms: u64,
) -> (Welcome, Duration) {
    let ka = cfg.keepalive.effective(requested_keepalive_s);
    let welcome = Welcome {
        version: furrow_proto::VERSION,
        keepalive_s: ka,
        max_frame: cfg.limits.max_frame,
        max_inflight: cfg.limits.max_inflight,
        last_seq,
        server_time_ms: now_ms,
        capabilities: capabilities.map(grant),
    };
    (welcome, Duration::from_millis(u64::from(ka) * 1500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_is_granted_only_with_state() {
        use furrow_proto::{CAP_FIRMWARE, CAP_STATE};
        assert_eq!(grant(CAP_STATE | CAP_FIRMWARE), CAP_STATE | CAP_FIRMWARE);
        assert_eq!(grant(CAP_FIRMWARE), 0);
        assert_eq!(grant(u32::MAX), CAP_STATE | CAP_FIRMWARE);
        assert_eq!(grant(0), 0);
    }

    fn device(token: &str, revoked: bool) -> DeviceAuth {
        DeviceAuth {
            key: 1,
            token_hash: crate::devices::auth::hash_token(token.as_bytes()),
            revoked,
            previous: None,
        }
    }

    #[test]
    fn tokens_and_certificates() {
        let d = device("secret", false);
        let r = device("secret", true);
        use Certificate::*;
        let ok = |f: Option<&DeviceAuth>, t: &[u8], c| authenticated(f, t, c, 1).ok();
        assert!(ok(Some(&d), b"secret", Absent));
        assert!(!ok(Some(&d), b"wrong", Absent));
        assert!(!ok(None, b"secret", Absent));
        assert!(!ok(Some(&r), b"secret", Absent));
        assert!(ok(Some(&d), b"", Matches));
        assert!(!ok(Some(&r), b"", Matches));
        assert!(!ok(Some(&d), b"wrong", Matches));
        assert!(!ok(Some(&d), b"secret", Mismatch));
        assert!(!ok(None, b"", Matches));
    }

    #[test]
    fn welcome_clamps_keepalive() {
        let cfg = Config::default();
        let (w, dead) = welcome(&cfg, 0, None, 7, 1);
        assert_eq!(w.keepalive_s, cfg.keepalive.default_s);
        assert_eq!(w.last_seq, 7);
        assert_eq!(dead, Duration::from_millis(u64::from(w.keepalive_s) * 1500));
        let (w, _) = welcome(&cfg, u16::MAX, None, 0, 1);
        assert_eq!(w.keepalive_s, cfg.keepalive.max_s);
    }
}
