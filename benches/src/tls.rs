//! HTTPS for the load generator: the client configuration its senders and receivers use,
//! the floor's server configuration (fanpipe's own, so that the floor over TLS is the
//! honest best for the same handshake and record layer), and the throwaway CA and
//! `localhost` certificate that `fanpipe-load cert` writes for a benchmark.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be set up.
#[derive(Debug)]
pub enum TlsSetupError {
    /// A file could not be read or written.
    File { path: PathBuf, source: io::Error },
    /// A PEM file or string is malformed.
    Pem { what: String, source: pem::Error },
    /// A PEM file holds no certificate.
    NoCertificate { what: String },
    /// rustls refused a certificate, a key, or the protocol versions.
    Rustls(rustls::Error),
    /// rcgen could not make a key or a certificate.
    Generate(rcgen::Error),
}

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsSetupError::File { path, source } => write!(f, "{}: {source}", path.display()),
            TlsSetupError::Pem { what, source } => write!(f, "{what} is not valid PEM: {source}"),
            TlsSetupError::NoCertificate { what } => {
                write!(f, "no certificate (BEGIN CERTIFICATE) in {what}")
            }
            TlsSetupError::Rustls(e) => write!(f, "TLS configuration refused: {e}"),
            TlsSetupError::Generate(e) => write!(f, "cannot make a certificate: {e}"),
        }
    }
}

impl std::error::Error for TlsSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsSetupError::File { source, .. } => Some(source),
            TlsSetupError::Pem { source, .. } => Some(source),
            TlsSetupError::Rustls(e) => Some(e),
            TlsSetupError::Generate(e) => Some(e),
            TlsSetupError::NoCertificate { .. } => None,
        }
    }
}

/// What a client needs to open a TLS session to one target: the configuration (its
/// trusted CAs) and the name the server's certificate must carry.
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// The client configuration every sender and receiver uses, for fanpipe and for the floor
/// alike, so the two negotiate the same version, cipher suite and record size: aws-lc-rs,
/// rustls's safe default versions (TLS 1.3 preferred, 1.2), ALPN `http/1.1`, trusting
/// exactly `cas`.
pub fn client_config(cas: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(TlsSetupError::Rustls)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificates of a PEM string (`what` names it in errors); at least one.
pub fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsSetupError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// The CAs of a PEM file, for `--cacert`.
pub fn load_cas(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = fs::read(path).map_err(|source| TlsSetupError::File {
        path: path.to_owned(),
        source,
    })?;
    certificates(&pem, &path.display().to_string())
}

/// The floor's server configuration: fanpipe's own (`fanpipe_driver::tls`), built from
/// PEM in memory, so that the floor is the honest best for the same handshake and record
/// layer.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let chain = certificates(cert_pem, "the floor's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsSetupError::Pem {
        what: "the floor's key".into(),
        source,
    })?;
    let config =
        fanpipe_driver::tls::server_config_for(chain, key).map_err(TlsSetupError::Rustls)?;
    Ok(Arc::new(config))
}

/// A throwaway CA and a certificate it signed for `localhost`, `127.0.0.1` and `::1`
/// (ECDSA P-256, rcgen's default), as PEM.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn generate() -> Result<Pki, TlsSetupError> {
        let g = TlsSetupError::Generate;
        let mut ca_params = CertificateParams::new(Vec::new()).map_err(g)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fanpipe-load benchmark CA");
        let ca_key = KeyPair::generate().map_err(g)?;
        let ca = ca_params.self_signed(&ca_key).map_err(g)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let mut params = CertificateParams::new(names).map_err(g)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().map_err(g)?;
        let cert = params.signed_by(&key, &issuer).map_err(g)?;
        Ok(Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir` (made if missing); returns
    /// their paths in that order.
    pub fn write(&self, dir: &Path) -> Result<[PathBuf; 3], TlsSetupError> {
        let file = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsSetupError::File { path, source }
        };
        fs::create_dir_all(dir).map_err(file(dir))?;
        let paths = ["ca.pem", "cert.pem", "key.pem"].map(|name| dir.join(name));
        for (path, pem) in paths
            .iter()
            .zip([&self.ca_pem, &self.cert_pem, &self.key_pem])
        {
            // The key readable by its owner only, as a server expects of a key file.
            let mode = if path.ends_with("key.pem") {
                0o600
            } else {
                0o644
            };
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(pem.as_bytes()))
                .map_err(file(path))?;
        }
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pki_makes_both_configs() {
        let pki = Pki::generate().expect("pki");
        let ca = certificates(pki.ca_pem.as_bytes(), "ca").expect("ca parses");
        client_config(&ca).expect("client config");
        server_config(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).expect("server config");
        assert!(certificates(b"not pem", "junk").is_err());
    }
}
