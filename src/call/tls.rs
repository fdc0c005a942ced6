//! TLS towards the service — HTTP calls, gRPC channels, readiness probes — with rustls and ring.
//!
//! Fed by the `ca_file`, `cert_file` and `key_file` of `call.http`, `call.grpc` and
//! `service.ready`; feeds a rustls configuration to the HTTP calls and the PEM text to reqwest
//! (the HTTP probe) and tonic. ferry trusts only the CA it is given, never the system's store: no
//! public CA can vouch for a service in the same pod. The files are read and checked when the
//! config is loaded, so a wrong one is a config error at its key, not a failure at the first call.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// The files read and checked: PEM text for the library that makes the connection.
pub struct Pem {
    /// The CA certificates, one or more.
    pub ca: Vec<u8>,
    /// The client certificate chain and its private key, when mTLS is configured.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Pem {
    /// The client certificate chain followed by its key, as reqwest's `Identity::from_pem` reads it.
    pub fn identity_bundle(&self) -> Option<Vec<u8>> {
        self.identity.as_ref().map(|(cert, key)| {
            let mut both = cert.clone();
            both.push(b'\n');
            both.extend_from_slice(key);
            both
        })
    }
}

/// Every problem with `files`, each with the key it concerns (`ca_file`, `cert_file`,
/// `key_file`). `https` says whether the URL they are for is an `https://` one.
pub fn check(files: TlsFiles<'_>, https: bool) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if !https {
        for (field, file) in [
            ("ca_file", files.ca),
            ("cert_file", files.cert),
            ("key_file", files.key),
        ] {
            if file.is_some() {
                problems.push((
                    field,
                    "TLS files are for https:// URLs; this one is http://".to_string(),
                ));
            }
        }
        return problems;
    }
    match files.ca {
        None => problems.push((
            "ca_file",
            "an https:// URL needs the CA that signed the service's certificate (the system's trust store is not used)"
                .into(),
        )),
        Some(ca) => {
            if let Err(e) = read_ca(ca) {
                problems.push(("ca_file", e));
            }
        }
    }
    match (files.cert, files.key) {
        (None, None) => {}
        (Some(_), None) => problems.push((
            "key_file",
            "a client certificate needs its private key: give `key_file` too".into(),
        )),
        (None, Some(_)) => problems.push((
            "cert_file",
            "a private key needs its certificate: give `cert_file` too".into(),
        )),
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert).map_err(|e| problems.push(("cert_file", e))).ok();
            let private = read_key(key).map_err(|e| problems.push(("key_file", e))).ok();
            if let (Some(certs), Some(private)) = (certs, private) {
                if let Err(e) = keys_match(certs, &private) {
                    problems.push((
                        "key_file",
                        format!(
                            "`{}` is not the key of the certificate in `{}`: {e}",
                            key.display(),
                            cert.display()
                        ),
                    ));
                }
            }
        }
    }
    problems
}

/// Reads the files (already checked at load) for a connection; `None` without TLS files.
pub fn load(files: TlsFiles<'_>) -> Result<Option<Pem>, String> {
    let Some(ca) = files.ca else {
        return Ok(None);
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let identity = match (files.cert, files.key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(Pem {
        ca: read(ca)?,
        identity,
    }))
}

/// The rustls client configuration of HTTP calls: only the given CA, and the client certificate
/// when mTLS is configured; `None` without TLS files.
pub fn client_config(files: TlsFiles<'_>) -> Result<Option<rustls::ClientConfig>, String> {
    let Some(ca) = files.ca else {
        return Ok(None);
    };
    let roots = read_ca(ca)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match (files.cert, files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| format!("cert_file/key_file: {e}"))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{shown}` is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "`{shown}` holds no certificate (a PEM `BEGIN CERTIFICATE` block)"
        ));
    }
    Ok(certs)
}

fn read_ca(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| {
            format!(
                "`{}` holds a certificate that cannot be a CA: {e}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    // The error says only which PEM section was missing; never the file's contents.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        format!("`{shown}` holds no unencrypted private key (a PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block)")
    })
}

fn keys_match(certs: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'static>) -> Result<(), String> {
    let signing =
        rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| format!("unsupported key: {e}"))?;
    match rustls::sign::CertifiedKey::new(certs, signing).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
