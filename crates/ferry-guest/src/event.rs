//! Events on the serial console: one line each, `FERRY ` followed by a JSON
//! object whose `event` field names the event.
//!
//! ```text
//! FERRY {"event":"ready","uptime_ms":2950}
//! FERRY {"event":"record","seq":41}
//! FERRY {"event":"verify","ok":true,"records":120,...}
//! ```
//!
//! The host reads the console log line by line; kernel messages may share
//! the console, so a reader looks for the prefix anywhere in a line.

use std::io::Write;

use serde_json::{Map, Value};

/// The fixed prefix of every event line.
pub const PREFIX: &str = "FERRY ";

/// One event read back from a console line.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name (`ready`, `record`, `verify`, ...).
    pub name: String,
    /// All fields of the event, `event` included.
    pub fields: Map<String, Value>,
}

impl Event {
    /// A field as an unsigned integer.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.fields.get(key).and_then(Value::as_u64)
    }

    /// A field as a boolean.
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.fields.get(key).and_then(Value::as_bool)
    }

    /// A field as a string.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }
}

/// Formats one event line (without the newline). `fields` must be a JSON
/// object or null.
pub fn format(name: &str, fields: Value) -> String {
    let mut map = Map::new();
    map.insert("event".into(), Value::String(name.into()));
    if let Value::Object(extra) = fields {
        map.extend(extra);
    }
    format!("{PREFIX}{}", Value::Object(map))
}

/// Prints one event line on standard output and flushes it.
pub fn emit(name: &str, fields: Value) {
    let line = format(name, fields);
    let mut out = std::io::stdout().lock();
    // An event that cannot be printed cannot be reported either.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Parses the event in a console line, if it holds one.
pub fn parse(line: &str) -> Option<Event> {
    let start = line.find(PREFIX)? + PREFIX.len();
    let json = line[start..].trim_end();
    let mut de = serde_json::Deserializer::from_str(json).into_iter::<Map<String, Value>>();
    let fields = de.next()?.ok()?;
    let name = fields.get("event")?.as_str()?.to_owned();
    Some(Event { name, fields })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let line = format("record", json!({"seq": 7}));
        assert_eq!(line, r#"FERRY {"event":"record","seq":7}"#);
        let ev = parse(&line).unwrap();
        assert_eq!(ev.name, "record");
        assert_eq!(ev.u64("seq"), Some(7));
    }

    #[test]
    fn finds_events_among_console_noise() {
        assert!(parse("[    1.234] random: crng init done").is_none());
        assert!(parse("FERRY not json").is_none());
        assert!(parse(r#"FERRY {"no_event":1}"#).is_none());
        let ev = parse("\r[ 2.1] xFERRY {\"event\":\"ready\",\"uptime_ms\":5}\r").unwrap();
        assert_eq!(ev.name, "ready");
        assert_eq!(ev.u64("uptime_ms"), Some(5));
    }
}
