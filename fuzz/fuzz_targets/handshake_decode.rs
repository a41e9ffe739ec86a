//! The handshake and acknowledgement messages of a replication session, as the
//! other side sends them: `Hello` (and any `SenderMessage`) to the receiver,
//! `Welcome`/`Ack` (any `ReceiverMessage`) to the sender, with the version vectors
//! they carry (`convert::vector_from_pb`) and the schema comparison of a `Hello`.
//!
//! Properties: nothing panics; decoded messages re-encode losslessly; an accepted
//! vector round-trips through the wire form; the schema comparison is symmetric in
//! whether it finds a difference and finds none between a schema and itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tidemark_hlc::Hlc;
use tidemark_replicator::convert::{schema_difference, vector_from_pb, vector_to_pb};
use tidemark_replicator::pb;
use tidemark_store::model::parse_ulid;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(&again, m, "protobuf round trip changed the message");
}

fn check_vector(v: Option<pb::VersionVector>) {
    if let Ok(vv) = vector_from_pb("vector", v) {
        let back = vector_from_pb("vector", Some(vector_to_pb(&vv))).expect("own vector accepted");
        assert_eq!(back, vv, "vector wire round trip");
    }
}

fn check_hello(h: &pb::Hello) {
    if let Ok(id) = parse_ulid("hello.sender_node_id", &h.sender_node_id) {
        assert_eq!(id.to_string(), h.sender_node_id.to_ascii_uppercase());
    }
    let _ = Hlc::decode(h.hlc);
    assert_eq!(schema_difference(&h.tables, &h.tables), None, "a schema differs from itself");
    let (a, b) = h.tables.split_at(h.tables.len() / 2);
    assert_eq!(
        schema_difference(a, b).is_some(),
        schema_difference(b, a).is_some(),
        "schema comparison is not symmetric"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(h) = pb::Hello::decode(body) {
                round_trip(&h);
                check_hello(&h);
            }
        }
        1 => {
            if let Ok(m) = pb::SenderMessage::decode(body) {
                round_trip(&m);
                if let Some(pb::sender_message::Kind::Hello(h)) = &m.kind {
                    check_hello(h);
                }
            }
        }
        2 => {
            if let Ok(m) = pb::ReceiverMessage::decode(body) {
                round_trip(&m);
                match m.kind {
                    Some(pb::receiver_message::Kind::Welcome(w)) => {
                        let _ = Hlc::decode(w.hlc);
                        let _ = parse_ulid("welcome.receiver_node_id", &w.receiver_node_id);
                        check_vector(w.vector);
                    }
                    Some(pb::receiver_message::Kind::Ack(a)) => check_vector(a.vector),
                    None => {}
                }
            }
        }
        _ => {
            if let Ok(v) = pb::VersionVector::decode(body) {
                round_trip(&v);
                check_vector(Some(v));
            }
        }
    }
});
