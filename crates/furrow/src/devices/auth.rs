//! Device tokens: generation, hashing and constant-time verification.
//!
//! Tokens are 32 random bytes from the OS generator (256 bits), shown once
//! as 64 hex characters and stored only as their SHA-256. A fast hash is the
//! right tool for high-entropy secrets: there is nothing to brute-force, so
//! a slow password hash would only slow down every HELLO.
//!
//! [`verify`] takes the same path whether or not the device exists: an
//! unknown device is checked against a fixed dummy hash, so timing does not
//! tell an attacker which ids are registered.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::DeviceAuth;

/// Bytes of randomness in a token.
pub const TOKEN_BYTES: usize = 32;

/// A fresh random token, hex encoded.
pub fn generate_token() -> String {
    let mut raw = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    hex::encode(raw)
}

/// SHA-256 of a token's bytes.
pub fn hash_token(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Which credential opened a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// None did.
    No,
    /// Its current token (or, under mutual TLS, its certificate).
    Current,
    /// The token before its last rotation, in its grace period.
    Previous,
}

impl Verified {
    /// Whether the device is in.
    pub fn ok(self) -> bool {
        self != Self::No
    }
}

/// Which of `device`'s tokens `token` is, at `now_ms`. Unknown and revoked
/// devices and wrong tokens all return [`Verified::No`] after the same
/// work: both comparisons always run, against a dummy hash when there is
/// nothing to compare with.
pub fn verify(device: Option<&DeviceAuth>, token: &[u8], now_ms: u64) -> Verified {
    const DUMMY: [u8; 32] = [0x5a; 32];
    let presented = hash_token(token);
    let (expected, usable) = match device {
        Some(d) => (&d.token_hash, !d.revoked),
        None => (&DUMMY, false),
    };
    let (previous, in_grace) = match device.and_then(|d| d.previous.as_ref()) {
        Some(p) => (&p.hash, now_ms < p.until_ms),
        None => (&DUMMY, false),
    };
    let current: bool = presented.ct_eq(expected).into();
    let old: bool = presented.ct_eq(previous).into();
    // An empty token is only for TLS-identified devices (not yet supported
    // on this listener), so it never authenticates here.
    let usable = usable & !token.is_empty();
    if current & usable {
        Verified::Current
    } else if old & in_grace & usable {
        Verified::Previous
    } else {
        Verified::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(token: &str, revoked: bool) -> DeviceAuth {
        DeviceAuth {
            key: 1,
            token_hash: hash_token(token.as_bytes()),
            revoked,
            previous: None,
        }
    }

    #[test]
    fn tokens_are_random_and_long() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn verify_cases() {
        let t = generate_token();
        let ok = |d: Option<&DeviceAuth>, token: &[u8]| verify(d, token, 1).ok();
        assert!(ok(Some(&dev(&t, false)), t.as_bytes()));
        assert!(!ok(Some(&dev(&t, false)), b"wrong"));
        assert!(!ok(Some(&dev(&t, true)), t.as_bytes()));
        assert!(!ok(None, t.as_bytes()));
        assert!(!ok(Some(&dev("", false)), b""));
    }

    #[test]
    fn the_previous_token_opens_the_device_only_in_its_grace_period() {
        let (old, new) = (generate_token(), generate_token());
        let mut d = dev(&new, false);
        d.previous = Some(crate::store::PreviousToken {
            hash: hash_token(old.as_bytes()),
            until_ms: 1_000,
        });
        assert_eq!(verify(Some(&d), new.as_bytes(), 999), Verified::Current);
        assert_eq!(verify(Some(&d), old.as_bytes(), 999), Verified::Previous);
        assert_eq!(verify(Some(&d), old.as_bytes(), 1_000), Verified::No);
        assert_eq!(verify(Some(&d), new.as_bytes(), 5_000), Verified::Current);
        assert_eq!(verify(Some(&d), b"wrong", 999), Verified::No);
        // Revoked: neither token.
        d.revoked = true;
        assert_eq!(verify(Some(&d), old.as_bytes(), 999), Verified::No);
        assert_eq!(verify(Some(&d), new.as_bytes(), 999), Verified::No);
    }
}
