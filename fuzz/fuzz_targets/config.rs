//! The daemon's configuration: TOML text through `Config::from_toml`, then
//! `Config::validate`. File paths in the text (admin token, TLS certificates) are
//! cleared before validation so the fuzzer never reads arbitrary files.
//!
//! Properties: nothing panics; every problem names a key; a configuration that
//! validates keeps every peer and table it lists, and its bounds hold.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut config = match Config::from_toml(text) {
        Ok(c) => c,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "parsing failed without saying why");
            for e in &errors.0 {
                assert!(!e.key.is_empty(), "an error without a key: {e}");
            }
            return;
        }
    };
    config.admin.token_file.clear();
    config.tls.ca_file.clear();
    config.tls.cert_file.clear();
    config.tls.key_file.clear();
    match config.validate() {
        Ok(s) => {
            assert_eq!(s.peers.len(), config.peers.len());
            assert_eq!(s.tables.len(), config.tables.len());
            assert_ne!(s.local.node_id.0, 0);
            assert!(s.peers.iter().all(|p| p.node_id != s.local.node_id));
            assert!((1..=86_400_000).contains(&s.max_drift_ms));
            assert!(s.replication.max_batch_bytes < s.replication.max_message_bytes);
            assert!(s.replication.reconnect_initial_ms <= s.replication.reconnect_max_ms);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "validation failed without saying why");
            for e in errors {
                assert!(!e.key.is_empty() && !e.problem.is_empty(), "{e:?}");
            }
        }
    }
});
