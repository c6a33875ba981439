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

/// Whether `token` opens `device`. Unknown and revoked devices and wrong
/// tokens all return false after the same work.
pub fn verify(device: Option<&DeviceAuth>, token: &[u8]) -> bool {
    const DUMMY: [u8; 32] = [0x5a; 32];
    let presented = hash_token(token);
    let (expected, usable) = match device {
        Some(d) => (&d.token_hash, !d.revoked),
        None => (&DUMMY, false),
    };
    let matches: bool = presented.ct_eq(expected).into();
    // An empty token is only for TLS-identified devices (not yet supported
    // on this listener), so it never authenticates here.
    matches & usable & !token.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(token: &str, revoked: bool) -> DeviceAuth {
        DeviceAuth {
            key: 1,
            token_hash: hash_token(token.as_bytes()),
            revoked,
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
        assert!(verify(Some(&dev(&t, false)), t.as_bytes()));
        assert!(!verify(Some(&dev(&t, false)), b"wrong"));
        assert!(!verify(Some(&dev(&t, true)), t.as_bytes()));
        assert!(!verify(None, t.as_bytes()));
        assert!(!verify(Some(&dev("", false)), b""));
    }
}
