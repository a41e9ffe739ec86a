//! Who may do what on a node: roles by client certificate (mutual TLS) or by
//! the Admin token, checked per gRPC service.
//!
//! * **peer**: a node listed in `[[peers]]`, by the certificate naming its node
//!   id: the Replication service only (checked by the receiver).
//! * **writer**: the Records service (write API). Certificates whose common
//!   name `access.writers` lists.
//! * **operator**: the Admin service. Certificates whose common name
//!   `access.operators` lists, or the Admin token (`admin.token_file`).
//!
//! The node's own certificate (common name = its node id, what `tidemark admin
//! --config node.toml` presents) has every role: whoever holds its key runs the
//! node. Without TLS there are no certificates to check: Records is open and
//! Admin needs the token if one is configured (a warning at start says so).

use std::collections::BTreeSet;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};
use ulid::Ulid;

/// The common names a role is given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names {
    /// `["*"]`: every certificate of the cluster CA.
    All,
    Listed(BTreeSet<String>),
}

impl Names {
    pub fn from_config(list: &[String]) -> Names {
        if list.iter().any(|n| n == "*") {
            Names::All
        } else {
            Names::Listed(list.iter().cloned().collect())
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Names::All => true,
            Names::Listed(names) => names.contains(name),
        }
    }
}

/// A node's access settings (`[access]`, the Admin token, its own id).
#[derive(Clone)]
pub struct Access {
    local: Ulid,
    writers: Names,
    operators: Names,
    token: Option<Arc<Vec<u8>>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("local", &self.local)
            .field("writers", &self.writers)
            .field("operators", &self.operators)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Who called the Admin service, as the audit log records it: the certificate's
/// common name, the bearer token, or no authentication.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// The role a service requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Writer,
    Operator,
}

impl Role {
    fn key(self) -> &'static str {
        match self {
            Role::Writer => "access.writers",
            Role::Operator => "access.operators",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Role::Writer => "write through Records",
            Role::Operator => "call Admin",
        }
    }
}

impl Access {
    pub fn new(local: Ulid, writers: Names, operators: Names, token: Option<&str>) -> Access {
        Access {
            local,
            writers,
            operators,
            token: token.map(|t| Arc::new(t.as_bytes().to_vec())),
        }
    }

    /// The check for one service, as a tonic interceptor.
    pub fn require(&self, role: Role) -> RoleCheck {
        RoleCheck {
            access: self.clone(),
            role,
        }
    }

    fn has(&self, role: Role, common_name: &str) -> bool {
        if common_name == self.local.to_string() {
            return true;
        }
        match role {
            Role::Writer => self.writers.contains(common_name),
            Role::Operator => self.operators.contains(common_name),
        }
    }

    /// Whether `request` may go on, and who its caller is.
    fn check<T>(&self, role: Role, request: &Request<T>) -> Result<Caller, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let certificate = request.peer_certs().and_then(|certs| {
            certs
                .first()
                .and_then(|c| tidemark_replicator::tls::common_name(c))
        });
        if role == Role::Operator
            && let Some(token) = &self.token
        {
            match presented {
                Some(p) if bool::from(p.as_bytes().ct_eq(token.as_slice())) => {
                    return Ok(Caller("bearer-token".into()));
                }
                Some(_) => {
                    tracing::warn!(caller = ?request.remote_addr(), "admin call with a wrong token refused");
                    return Err(Status::unauthenticated("invalid admin token"));
                }
                None => {}
            }
        }
        match certificate {
            Some(cn) if self.has(role, &cn) => Ok(Caller(format!("certificate {cn}"))),
            Some(cn) => Err(Status::permission_denied(format!(
                "certificate {cn} may not {} on node {}: list its common name in {}{}",
                role.what(),
                self.local,
                role.key(),
                if role == Role::Operator && self.token.is_some() {
                    " or present the admin token"
                } else {
                    ""
                }
            ))),
            // No client certificate: a plaintext listener.
            None => match (role, &self.token) {
                (Role::Operator, Some(_)) => Err(Status::unauthenticated(
                    "the admin RPC requires `authorization: Bearer <token>` (tidemark admin --token-file FILE)",
                )),
                _ => Ok(Caller("unauthenticated".into())),
            },
        }
    }
}

/// A tonic interceptor that lets a request through only for callers with a
/// role, tagging it with its [`Caller`].
#[derive(Debug, Clone)]
pub struct RoleCheck {
    access: Access,
    role: Role,
}

impl tonic::service::Interceptor for RoleCheck {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.access.check(self.role, &request)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(token: Option<&str>) -> Access {
        Access::new(
            Ulid::from_parts(1, 1),
            Names::from_config(&["app".into()]),
            Names::from_config(&["ops".into()]),
            token,
        )
    }

    fn request(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        r
    }

    #[test]
    fn roles_by_name_and_the_nodes_own_identity() {
        let a = access(None);
        assert!(a.has(Role::Writer, "app"));
        assert!(!a.has(Role::Operator, "app"));
        assert!(a.has(Role::Operator, "ops"));
        assert!(!a.has(Role::Writer, "ops"));
        let own = Ulid::from_parts(1, 1).to_string();
        assert!(a.has(Role::Writer, &own) && a.has(Role::Operator, &own));
        // A peer's node id has no role here unless listed.
        assert!(!a.has(Role::Writer, &Ulid::from_parts(1, 2).to_string()));
        let all = Access::new(
            Ulid::nil(),
            Names::from_config(&["*".into()]),
            Names::Listed(BTreeSet::new()),
            None,
        );
        assert!(all.has(Role::Writer, "anyone"));
        assert!(!all.has(Role::Operator, "anyone"));
    }

    #[test]
    fn without_certificates_the_token_decides_admin() {
        let token = "0123456789abcdef";
        let a = access(Some(token));
        assert_eq!(
            a.check(Role::Operator, &request(Some(token)))
                .expect("token")
                .0,
            "bearer-token"
        );
        assert_eq!(
            a.check(Role::Operator, &request(Some("wrong-token-xxxxx")))
                .expect_err("wrong")
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.check(Role::Operator, &request(None))
                .expect_err("none")
                .code(),
            tonic::Code::Unauthenticated
        );
        // Records on a plaintext listener is open; Admin too without a token.
        assert!(a.check(Role::Writer, &request(None)).is_ok());
        assert!(access(None).check(Role::Operator, &request(None)).is_ok());
    }
}
