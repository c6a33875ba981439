//! Payload validation by content type.
//!
//! The gateway REJECTs a TELEMETRY whose payload does not match its content
//! type; a device can call [`validate`] before sending to learn the same
//! answer locally. Nothing here allocates.
//!
//! * JSON: exactly one RFC 8259 value. The bytes must be UTF-8 first
//!   (serde_json skips strings without checking their UTF-8 when it only
//!   validates), then `serde_json` parses into `IgnoredAny`, which refuses
//!   NaN, Infinity and trailing bytes. Nesting deeper than serde_json's 128
//!   levels is refused as invalid: a documented limit, not RFC 8259's.
//! * CBOR: exactly one well-formed data item (RFC 8949 §5.3.1 and the
//!   algorithm of its Appendix C), nothing after it. Well-formed, not valid:
//!   as the spec asks, tags and text-string contents are not interpreted.
//!   Nesting deeper than [`MAX_CBOR_DEPTH`] is refused.
//! * Text: valid UTF-8.
//! * Octets: anything.

use crate::codes::{ContentType, ErrorCode};

/// Deepest CBOR nesting accepted (arrays, maps, tags, indefinite strings).
pub const MAX_CBOR_DEPTH: usize = 128;

/// Why a payload is refused; maps to the REJECT code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    /// The content type byte is not one furrow/1 defines.
    #[error("unsupported content type {0}")]
    UnsupportedContentType(u8),
    /// The payload does not match its content type.
    #[error("payload is not valid {0}")]
    InvalidPayload(&'static str),
}

impl ContentError {
    /// The REJECT code for this failure.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedContentType(_) => ErrorCode::UnsupportedContentType,
            Self::InvalidPayload(_) => ErrorCode::InvalidPayload,
        }
    }
}

/// Checks `payload` against the raw content type byte `content_type`.
pub fn validate(content_type: u8, payload: &[u8]) -> Result<ContentType, ContentError> {
    let ct = ContentType::from_u8(content_type)
        .ok_or(ContentError::UnsupportedContentType(content_type))?;
    let ok = match ct {
        ContentType::Octets => true,
        ContentType::Text => std::str::from_utf8(payload).is_ok(),
        ContentType::Json => is_json(payload),
        ContentType::Cbor => is_cbor(payload),
    };
    if ok {
        Ok(ct)
    } else {
        Err(ContentError::InvalidPayload(ct.name()))
    }
}

/// Whether `payload` is exactly one JSON value in UTF-8.
pub fn is_json(payload: &[u8]) -> bool {
    match std::str::from_utf8(payload) {
        Ok(s) => serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok(),
        Err(_) => false,
    }
}

/// Whether `payload` is exactly one well-formed CBOR data item.
pub fn is_cbor(payload: &[u8]) -> bool {
    let mut r = Cbor { buf: payload };
    matches!(r.item(false, 0), Ok(Item::Major(_))) && r.buf.is_empty()
}

/// What one step of the well-formedness walk found.
enum Item {
    /// A complete item of this major type.
    Major(u8),
    /// The "break" stop code (only inside an indefinite-length item).
    Break,
}

struct Malformed;

struct Cbor<'a> {
    buf: &'a [u8],
}

impl Cbor<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8], Malformed> {
        let n = usize::try_from(n).map_err(|_| Malformed)?;
        if n > self.buf.len() {
            return Err(Malformed);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn uint(&mut self, n: u64) -> Result<u64, Malformed> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b)))
    }

    /// RFC 8949 Appendix C `well_formed`.
    fn item(&mut self, breakable: bool, depth: usize) -> Result<Item, Malformed> {
        if depth > MAX_CBOR_DEPTH {
            return Err(Malformed);
        }
        let ib = self.uint(1)? as u8;
        let mt = ib >> 5;
        let ai = ib & 0x1f;
        let val = match ai {
            0..=23 => u64::from(ai),
            24 => self.uint(1)?,
            25 => self.uint(2)?,
            26 => self.uint(4)?,
            27 => self.uint(8)?,
            28..=30 => return Err(Malformed),
            _ => return self.indefinite(mt, breakable, depth),
        };
        match mt {
            2 | 3 => {
                self.take(val)?;
            }
            4 | 5 => {
                let items = if mt == 5 {
                    val.checked_mul(2)
                } else {
                    Some(val)
                };
                let items = items.ok_or(Malformed)?;
                // Every item takes at least one byte: fail fast on huge counts.
                if items > self.buf.len() as u64 {
                    return Err(Malformed);
                }
                for _ in 0..items {
                    self.definite_item(depth + 1)?;
                }
            }
            6 => {
                self.definite_item(depth + 1)?;
            }
            7 if ai == 24 && val < 32 => return Err(Malformed),
            _ => {}
        }
        Ok(Item::Major(mt))
    }

    /// An item where a break code is not allowed.
    fn definite_item(&mut self, depth: usize) -> Result<u8, Malformed> {
        match self.item(false, depth)? {
            Item::Major(mt) => Ok(mt),
            Item::Break => Err(Malformed),
        }
    }

    /// RFC 8949 Appendix C `well_formed_indefinite`.
    fn indefinite(&mut self, mt: u8, breakable: bool, depth: usize) -> Result<Item, Malformed> {
        match mt {
            2 | 3 => loop {
                match self.item(true, depth + 1)? {
                    Item::Break => break,
                    // Chunks must be definite-length strings of the same type;
                    // an indefinite chunk reports major 8 below and fails here.
                    Item::Major(it) if it == mt => {}
                    Item::Major(_) => return Err(Malformed),
                }
            },
            4 => while let Item::Major(_) = self.item(true, depth + 1)? {},
            5 => {
                while let Item::Major(_) = self.item(true, depth + 1)? {
                    self.definite_item(depth + 1)?;
                }
            }
            7 if breakable => return Ok(Item::Break),
            _ => return Err(Malformed),
        }
        // Not a major type: an indefinite item may not be a string chunk.
        Ok(Item::Major(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_cases() {
        for ok in [
            &b"{\"t\":21.5}"[..],
            b"1",
            b"\"s\"",
            b"null",
            b" [1,2] ",
            b"[]",
        ] {
            assert!(is_json(ok), "{:?}", std::str::from_utf8(ok));
        }
        for bad in [
            &b""[..],
            b"NaN",
            b"Infinity",
            b"{}{}",
            b"{",
            b"1 2",
            b"\"\xff\"",
            b"{'a':1}",
        ] {
            assert!(!is_json(bad), "{:?}", bad);
        }
    }

    #[test]
    fn cbor_cases() {
        let ok: &[&[u8]] = &[
            &[0x00],                         // 0
            &[0x18, 0x18],                   // 24
            &[0x83, 0x01, 0x02, 0x03],       // [1,2,3]
            &[0xa1, 0x61, 0x61, 0x01],       // {"a":1}
            &[0x9f, 0x01, 0xff],             // [_ 1]
            &[0x5f, 0x41, 0x00, 0xff],       // (_ h'00')
            &[0xc1, 0x1a, 0, 0, 0, 0],       // tag 1
            &[0xf8, 0x20],                   // simple(32)
            &[0xf9, 0x7e, 0x00],             // NaN half float is well-formed CBOR
            &[0xbf, 0x61, 0x61, 0x01, 0xff], // {_ "a":1}
        ];
        for p in ok {
            assert!(is_cbor(p), "{:02x?}", p);
        }
        let bad: &[&[u8]] = &[
            &[],                                                     // nothing
            &[0x00, 0x00],                                           // two items
            &[0x1c],                                                 // reserved ai
            &[0x83, 0x01],                                           // short array
            &[0xff],                                                 // lone break
            &[0xf8, 0x10],                                           // simple < 32 in two bytes
            &[0x5f, 0x01, 0xff],                                     // int chunk in byte string
            &[0x5f, 0x5f, 0xff, 0xff],                               // nested indefinite chunk
            &[0x5f, 0x61, 0x61, 0xff],                               // text chunk in byte string
            &[0xbf, 0x01, 0xff],                                     // odd map
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // huge count
            &[0x7a, 0xff, 0xff, 0xff, 0xff],                         // huge string
        ];
        for p in bad {
            assert!(!is_cbor(p), "{:02x?}", p);
        }
        let deep = vec![0x81u8; MAX_CBOR_DEPTH + 2];
        assert!(!is_cbor(&deep));
    }

    #[test]
    fn validate_maps_codes() {
        assert_eq!(validate(0, b"\xff"), Ok(ContentType::Octets));
        assert_eq!(validate(3, b"hi"), Ok(ContentType::Text));
        assert_eq!(
            validate(3, b"\xff").unwrap_err().code(),
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            validate(4, b"").unwrap_err().code(),
            ErrorCode::UnsupportedContentType
        );
    }
}
