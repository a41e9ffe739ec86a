//! Peer identity under mutual TLS: a node's certificate names its node id as the
//! subject's common name (`tidemark cert node` makes such certificates).

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// PEM material for mutual TLS between peers.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// The cluster CA that signs every node certificate.
    pub ca_pem: String,
    /// This node's certificate (CN = its node id) and key.
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    pub fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// Client settings for connecting to `host` (checked against the server's
    /// certificate names).
    pub fn client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(host)
    }
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
