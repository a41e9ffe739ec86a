//! `tidemark cert`: a cluster CA and node certificates for mutual TLS between
//! peers. A node certificate's subject common name is the node id (what peers
//! check against the id a node claims), and its subject alternative names are
//! the host names and addresses peers dial.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use ulid::Ulid;

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
}

/// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`.
pub fn make_ca(dir: &Path, days: i64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tidemark cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    std::fs::write(dir.join("ca.pem"), cert.pem())?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    Ok(())
}

/// Checks `name` names files in the certificate directory: letters, digits,
/// `.`, `_`, `-`, up to 64 characters, never the CA's own files.
fn file_name(name: &str) -> anyhow::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) || name.starts_with('.') {
        anyhow::bail!(
            "--name {name:?}: 1 to 64 letters, digits, '.', '_' or '-' (it names the files NAME.pem and NAME.key)"
        );
    }
    if name == "ca" {
        anyhow::bail!("--name ca: that is the cluster CA's own files (ca.pem, ca.key)");
    }
    Ok(())
}

/// The cluster CA of `dir` (`ca.pem`, `ca.key`), to sign with.
fn issuer(dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| {
        format!(
            "reading {} (make it with `tidemark cert ca`)",
            dir.join("ca.pem").display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key"))?)?;
    Ok(Issuer::from_ca_cert_pem(&ca_pem, ca_key)?)
}

/// Writes `<name>.pem` and `<name>.key` into `dir` for a client whose common
/// name is `name`, signed by `dir/ca.pem`. The name must not be a ULID, so a
/// client certificate can never pass for a node.
pub fn make_client(dir: &Path, name: &str, days: i64) -> anyhow::Result<()> {
    file_name(name)?;
    if name.parse::<Ulid>().is_ok() {
        anyhow::bail!(
            "--name {name}: a ULID names a node (tidemark cert node); give a client a name that is not one"
        );
    }
    let issuer = issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    Ok(())
}

/// Writes `<name>.pem` and `<name>.key` into `dir`, signed by `dir/ca.pem`.
pub fn make_node(
    dir: &Path,
    node_id: Ulid,
    name: &str,
    hosts: &[String],
    days: i64,
) -> anyhow::Result<()> {
    file_name(name)?;
    let issuer = issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_id.to_string());
    for host in hosts {
        params
            .subject_alt_names
            .push(match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.as_str().try_into()?),
            });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_stay_in_their_directory_and_off_the_cas_files() {
        let dir = tempfile::tempdir().expect("dir");
        make_ca(dir.path(), 30).expect("ca");
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        for bad in ["ca", "../outside", "a/b", "", ".hidden", "x y"] {
            let err = make_client(dir.path(), bad, 30).expect_err(bad);
            assert!(err.to_string().contains("--name"), "{bad}: {err}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem"),
            ca,
            "the CA is untouched"
        );
        assert!(make_node(dir.path(), Ulid::generate(), "ca", &[], 30).is_err());
        make_client(dir.path(), "billing-app.v2", 30).expect("a good name");
        assert!(
            make_client(dir.path(), &Ulid::generate().to_string(), 30).is_err(),
            "a ULID names a node"
        );
    }
}
