//! Device state documents: the rules both backends share, with no I/O.
//!
//! A device has a *desired* document (set by operators through the API)
//! and a *reported* one (sent by the device in REPORT frames), both JSON
//! objects, each with a version that every change raises and the time each
//! top-level member last changed. The *delta* is what desired holds that
//! reported does not match yet. Changes are JSON merge patches (RFC 7396),
//! as in the API's `PATCH .../state/desired` and the wire's REPORT.
//!
//! The stores keep a [`StateRow`] per device and call the functions here
//! inside their own transactions, so SQLite and PostgreSQL apply exactly
//! the same rules (tests below and `tests/store_conformance.rs`).

use serde_json::{Map, Value};

/// Size and depth limits of one document (`state.max_bytes`,
/// `state.max_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Bytes of a document (and of a patch), as compact JSON.
    pub max_bytes: usize,
    /// Levels of nested objects and arrays (`{}` is 1).
    pub max_depth: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8192,
            max_depth: 8,
        }
    }
}

/// Why a patch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not JSON, or not a JSON object.
    #[error("a state patch must be a JSON object: {0}")]
    NotAnObject(String),
    /// Over the size limit (the patch, or the document it would make).
    #[error("{what} is {bytes} bytes, over state.max_bytes ({max})")]
    TooLarge {
        /// `patch` or `document`.
        what: &'static str,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Nested deeper than the limit.
    #[error("{what} is nested {depth} levels deep, over state.max_depth ({max})")]
    TooDeep {
        /// `patch` or `document`.
        what: &'static str,
        /// Its depth.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// `If-Match` named another version.
    #[error("the desired state is at version {current}, not {expected}")]
    VersionMismatch {
        /// The version the caller expected.
        expected: u64,
        /// The version stored.
        current: u64,
    },
}

impl StateError {
    /// Whether this is a limit (answered STATE_TOO_LARGE on the wire).
    pub fn is_limit(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::TooDeep { .. })
    }
}

/// One side of a device's state, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Side {
    /// The document, compact JSON of an object.
    pub document: String,
    /// Raised by every change; 0 before the first.
    pub version: u64,
    /// Unix ms of the last change of each top-level member, a JSON object.
    pub fields: String,
    /// Unix ms of the last change, 0 if none.
    pub updated_ms: u64,
}

impl Side {
    /// An empty document at version 0.
    pub fn empty() -> Self {
        Self {
            document: "{}".into(),
            version: 0,
            fields: "{}".into(),
            updated_ms: 0,
        }
    }
}

/// A device's state row (both backends store these columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    /// Set by operators.
    pub desired: Side,
    /// The highest desired version the device confirmed (DESIRED_ACK).
    pub desired_acked: u64,
    /// Sent by the device.
    pub reported: Side,
    /// The seq of the last REPORT applied: a report at or below it is a
    /// repeat, never applied twice.
    pub reported_seq: u64,
}

impl Default for StateRow {
    fn default() -> Self {
        Self {
            desired: Side::empty(),
            desired_acked: 0,
            reported: Side::empty(),
            reported_seq: 0,
        }
    }
}

/// Parses and checks a patch against the limits.
pub fn parse_patch(bytes: &[u8], limits: StateLimits) -> Result<Map<String, Value>, StateError> {
    if bytes.len() > limits.max_bytes.saturating_mul(4).max(1024) {
        // Far over (even with whitespace): refuse before parsing.
        return Err(StateError::TooLarge {
            what: "patch",
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| StateError::NotAnObject(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(StateError::NotAnObject(format!("got {}", kind_of(&value))));
    };
    check(&map, "patch", limits)?;
    Ok(map)
}

/// Checks an object's compact size and depth.
fn check(
    map: &Map<String, Value>,
    what: &'static str,
    limits: StateLimits,
) -> Result<(), StateError> {
    let depth = 1 + map.values().map(depth).max().unwrap_or(0);
    if depth > limits.max_depth {
        return Err(StateError::TooDeep {
            what,
            depth,
            max: limits.max_depth,
        });
    }
    let bytes = compact_len(map);
    if bytes > limits.max_bytes {
        return Err(StateError::TooLarge {
            what,
            bytes,
            max: limits.max_bytes,
        });
    }
    Ok(())
}

fn compact_len(map: &Map<String, Value>) -> usize {
    serde_json::to_vec(map).map_or(usize::MAX, |v| v.len())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Levels of nested containers: a scalar is 0, `{}` and `[]` are 1.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// RFC 7396: applies `patch` to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// What `desired` holds that `reported` does not match: members of equal
/// value are left out, objects compared member by member (like AWS IoT's
/// shadow delta). An empty object when they agree.
pub fn delta(desired: &Value, reported: &Value) -> Value {
    let (Value::Object(d), Value::Object(r)) = (desired, reported) else {
        return Value::Object(Map::new());
    };
    let mut out = Map::new();
    for (k, dv) in d {
        match (dv, r.get(k)) {
            (_, Some(rv)) if rv == dv => {}
            (Value::Object(_), Some(rv @ Value::Object(_))) => {
                let sub = delta(dv, rv);
                if sub.as_object().is_some_and(|m| !m.is_empty()) {
                    out.insert(k.clone(), sub);
                }
            }
            _ => {
                out.insert(k.clone(), dv.clone());
            }
        }
    }
    Value::Object(out)
}

fn parse_object(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Applies a checked patch to one side at `at_ms`: merges the document,
/// records the time of each top-level member it touches, raises the
/// version. The resulting document is checked against the limits; on
/// failure the side is unchanged.
pub fn apply(
    side: &mut Side,
    patch: &Map<String, Value>,
    at_ms: u64,
    now_ms: u64,
    limits: StateLimits,
) -> Result<(), StateError> {
    let mut doc = Value::Object(parse_object(&side.document));
    merge_patch(&mut doc, &Value::Object(patch.clone()));
    let Value::Object(doc) = doc else {
        return Err(StateError::NotAnObject(
            "the document is not an object".into(),
        ));
    };
    check(&doc, "document", limits)?;
    let mut fields = parse_object(&side.fields);
    for (k, v) in patch {
        if v.is_null() {
            fields.remove(k);
        } else {
            fields.insert(k.clone(), Value::from(at_ms));
        }
    }
    side.document = Value::Object(doc).to_string();
    side.fields = Value::Object(fields).to_string();
    side.version += 1;
    side.updated_ms = now_ms;
    Ok(())
}

/// An operator's change of the desired document: `If-Match` checked, then
/// applied.
pub fn patch_desired(
    row: &mut StateRow,
    patch: &Map<String, Value>,
    if_match: Option<u64>,
    now_ms: u64,
    limits: StateLimits,
) -> Result<(), StateError> {
    if let Some(expected) = if_match {
        if expected != row.desired.version {
            return Err(StateError::VersionMismatch {
                expected,
                current: row.desired.version,
            });
        }
    }
    apply(&mut row.desired, patch, now_ms, now_ms, limits)
}

/// A device's REPORT, in seq order: a repeat (seq at or below the last
/// applied) changes nothing and is `Ok(false)`; one over a limit is
/// refused but its seq still counts as applied, so that it stays taken.
pub fn apply_report(
    row: &mut StateRow,
    seq: u64,
    patch: &[u8],
    timestamp_ms: u64,
    now_ms: u64,
    limits: StateLimits,
) -> Result<bool, StateError> {
    if seq <= row.reported_seq {
        return Ok(false);
    }
    row.reported_seq = seq;
    let patch = parse_patch(patch, limits)?;
    apply(&mut row.reported, &patch, timestamp_ms, now_ms, limits)?;
    Ok(true)
}

/// A device's state as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct StateView {
    /// The device id.
    pub device_id: String,
    /// Set by operators.
    pub desired: SideView,
    /// The highest desired version the device confirmed.
    pub desired_acked_version: u64,
    /// Sent by the device.
    pub reported: SideView,
    /// What desired holds that reported does not match.
    #[schema(value_type = Object)]
    pub delta: Value,
}

/// One side of [`StateView`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct SideView {
    /// The document.
    #[schema(value_type = Object)]
    pub document: Value,
    /// Its version (0: never set).
    pub version: u64,
    /// Unix ms of the last change of each top-level member.
    #[schema(value_type = Object)]
    pub fields: Value,
    /// Unix ms of the last change (absent: never).
    pub updated_ms: Option<u64>,
}

impl SideView {
    fn of(side: &Side) -> Self {
        Self {
            document: Value::Object(parse_object(&side.document)),
            version: side.version,
            fields: Value::Object(parse_object(&side.fields)),
            updated_ms: (side.updated_ms > 0).then_some(side.updated_ms),
        }
    }
}

impl StateView {
    /// The API's view of a stored row.
    pub fn of(device_id: &str, row: &StateRow) -> Self {
        let desired = SideView::of(&row.desired);
        let reported = SideView::of(&row.reported);
        let delta = delta(&desired.document, &reported.document);
        Self {
            device_id: device_id.to_owned(),
            desired,
            desired_acked_version: row.desired_acked,
            reported,
            delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn merge_patch_follows_rfc_7396_appendix_a() {
        // A selection of RFC 7396's test cases.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }

    #[test]
    fn delta_is_what_reported_does_not_match() {
        let d = json!({"led":"on","cfg":{"rate":5,"mode":"eco"},"fw":"1.2"});
        let r = json!({"led":"on","cfg":{"rate":5,"mode":"max"},"extra":1});
        assert_eq!(delta(&d, &r), json!({"cfg":{"mode":"eco"},"fw":"1.2"}));
        assert_eq!(delta(&d, &d), json!({}));
        assert_eq!(delta(&json!({}), &r), json!({}));
    }

    #[test]
    fn limits_refuse_big_deep_and_non_objects() {
        let l = StateLimits {
            max_bytes: 32,
            max_depth: 3,
        };
        assert!(parse_patch(br#"{"a":1}"#, l).is_ok());
        assert!(matches!(
            parse_patch(br#"[1]"#, l),
            Err(StateError::NotAnObject(_))
        ));
        assert!(matches!(
            parse_patch(b"nope", l),
            Err(StateError::NotAnObject(_))
        ));
        assert!(matches!(
            parse_patch(br#"{"a":{"b":{"c":{}}}}"#, l),
            Err(StateError::TooDeep { depth: 4, .. })
        ));
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(40));
        let e = parse_patch(big.as_bytes(), l).unwrap_err();
        assert!(e.is_limit(), "{e}");
        // The document a patch makes is checked too, and left as it was.
        let mut side = Side::empty();
        apply(&mut side, &obj(json!({"a":"0123456789"})), 1, 1, l).unwrap();
        let before = side.clone();
        let e = apply(&mut side, &obj(json!({"b":"0123456789"})), 2, 2, l).unwrap_err();
        assert!(
            matches!(
                e,
                StateError::TooLarge {
                    what: "document",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(side, before);
    }

    #[test]
    fn versions_fields_and_if_match() {
        let l = StateLimits::default();
        let mut row = StateRow::default();
        patch_desired(
            &mut row,
            &obj(json!({"led":"on","rate":5})),
            Some(0),
            100,
            l,
        )
        .unwrap();
        assert_eq!(row.desired.version, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&row.desired.fields).unwrap(),
            json!({"led":100,"rate":100})
        );
        let e = patch_desired(&mut row, &obj(json!({"led":"off"})), Some(0), 200, l).unwrap_err();
        assert_eq!(
            e,
            StateError::VersionMismatch {
                expected: 0,
                current: 1
            }
        );
        patch_desired(&mut row, &obj(json!({"rate":null})), None, 300, l).unwrap();
        assert_eq!(row.desired.version, 2);
        assert_eq!(row.desired.document, r#"{"led":"on"}"#);
        assert_eq!(
            serde_json::from_str::<Value>(&row.desired.fields).unwrap(),
            json!({"led":100})
        );
    }

    #[test]
    fn reports_apply_once_in_seq_order() {
        let l = StateLimits::default();
        let mut row = StateRow::default();
        assert_eq!(
            apply_report(&mut row, 5, br#"{"a":1}"#, 50, 60, l),
            Ok(true)
        );
        assert_eq!(
            apply_report(&mut row, 7, br#"{"a":2}"#, 70, 80, l),
            Ok(true)
        );
        // A repeat of 5 after 7 changes nothing.
        assert_eq!(
            apply_report(&mut row, 5, br#"{"a":1}"#, 50, 90, l),
            Ok(false)
        );
        assert_eq!(row.reported.document, r#"{"a":2}"#);
        assert_eq!(row.reported.version, 2);
        assert_eq!(row.reported.updated_ms, 80);
        // A refused report still takes its seq.
        assert!(apply_report(&mut row, 8, b"[]", 0, 0, l).is_err());
        assert_eq!(row.reported_seq, 8);
        assert_eq!(row.reported.version, 2);
    }
}
