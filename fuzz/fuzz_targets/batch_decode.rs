//! A replication `Batch` as a peer sends it: protobuf decoding, then the checks
//! and conversion of every event to store types (`convert::event_from_pb`).
//!
//! Properties: nothing panics; a decoded batch re-encodes to a message that decodes
//! to the same batch; an accepted event converts back to the wire and is accepted
//! again unchanged; its version vector and JSON forms are computable.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tidemark_replicator::convert::{event_from_pb, event_json, event_to_pb};
use tidemark_replicator::pb;
use tidemark_store::VersionVector;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = pb::Batch::decode(data) else {
        return;
    };
    let again = pb::Batch::decode(batch.encode_to_vec().as_slice()).expect("re-encoded batch decodes");
    assert_eq!(again, batch, "protobuf round trip changed the batch");

    for raw in batch.events {
        let _ = event_json(&raw);
        let Ok(event) = event_from_pb(raw.clone()) else {
            continue;
        };
        let wire = event_to_pb(&event);
        let back = event_from_pb(wire).expect("an accepted event, re-encoded, is accepted again");
        assert_eq!(back, event, "wire round trip changed an accepted event");
        // Every accepted id is canonical: it converts back to the text that was sent
        // (modulo letter case, which Crockford base32 ignores).
        assert_eq!(event.event_id.to_string(), raw.event_id.to_ascii_uppercase());
        assert_eq!(event.node_id.to_string(), raw.node_id.to_ascii_uppercase());
        assert_eq!(event.record_id.to_string(), raw.record_id.to_ascii_uppercase());
        assert_eq!(event.hlc.encode(), raw.hlc);

        let _ = event.to_json();
        let _ = event.resolution();
        if let Ok(vv) = event.vector() {
            assert!(vv.get(event.node_id) >= event.hlc, "the vector covers the event itself");
            let parsed = VersionVector::from_json(&vv.to_json(), "vv").expect("own JSON parses");
            assert_eq!(parsed, vv, "vector JSON round trip");
        }
    }
});
