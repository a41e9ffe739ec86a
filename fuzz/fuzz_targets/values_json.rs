//! The JSON objects an event carries (old and new column values, metadata), as
//! `convert::json_object` parses them from the wire.
//!
//! Property: an accepted object survives being sent on: serialised as the sender
//! does (`event_to_pb`) and parsed again by the next node, it is the same object.
//! Otherwise nodes relaying an event would end up with different values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tidemark_replicator::convert::json_object;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(values) = json_object("new_values_json", text) else {
        return;
    };
    let sent = Value::Object(values.clone()).to_string();
    let received = json_object("new_values_json", &sent).expect("a serialised object parses");
    assert_eq!(received, values, "values changed on the way through {sent}");
});
