//! TLS for the Consul client: a CA file (or the system roots), an optional client certificate,
//! and a server-name override for Consul servers addressed by IP.

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the Consul client's TLS configuration cannot be built; names the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {} holds no PEM certificate", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("--consul-ca-file {}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("--consul-tls-server-name {name:?}")]
    ServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS verifier")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    #[error("client certificate")]
    ClientCertificate(#[source] rustls::Error),
    #[error("--consul-client-cert and --consul-client-key go together")]
    HalfClientCertificate,
}

#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// PEM CA bundle; the system roots when unset.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and its key, for Consul's `verify_incoming`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Name to verify the server certificate against instead of the URL's host.
    pub server_name: Option<String>,
}

/// The process-wide crypto provider; kube's rustls uses the same one.
pub fn install_crypto_provider() {
    // Err only means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_certs(path: &Path, flag: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        flag,
        path: path.to_path_buf(),
        source,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<_, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Builds the client configuration, naming the file and flag at fault on any error.
pub fn client_config(settings: &TlsSettings) -> Result<ClientConfig, TlsError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            for cert in read_certs(path, "--consul-ca-file")? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                // A broken system certificate must not stop the others from loading.
                let _ = roots.add(cert);
            }
        }
    }
    let roots = Arc::new(roots);
    let builder = match &settings.server_name {
        Some(name) => {
            let name =
                ServerName::try_from(name.clone()).map_err(|source| TlsError::ServerName {
                    name: name.clone(),
                    source,
                })?;
            let inner = WebPkiServerVerifier::builder(roots)
                .build()
                .map_err(TlsError::Verifier)?;
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
        }
        None => ClientConfig::builder().with_root_certificates(roots),
    };
    match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "--consul-client-cert")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
                flag: "--consul-client-key",
                path: key.clone(),
                source,
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::ClientCertificate)
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(TlsError::HalfClientCertificate),
    }
}

/// Full WebPKI verification, against a fixed name instead of the one in the URL.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The prober's TLS client: it checks that a worker answers like a metrics endpoint, not who
/// it is. It sends nothing secret, and Prometheus verifies the certificate with its own
/// `tls_config` when it scrapes, so any certificate is accepted here (signatures are still
/// checked, so the handshake is a real one).
pub fn probe_client_config() -> Arc<ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            install_crypto_provider();
            let provider = rustls::crypto::ring::default_provider();
            let config = ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[derive(Debug)]
struct AnyCertificate(rustls::crypto::CryptoProvider);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let missing = TlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsSettings::default()
        };
        let err = crate::telemetry::Chain(&client_config(&missing).unwrap_err()).to_string();
        assert!(
            err.starts_with("--consul-ca-file /nonexistent/ca.pem: "),
            "the flag, the file, then why: {err}"
        );
        let dir = std::env::temp_dir().join(format!("workersd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_config(&TlsSettings {
            ca_file: Some(empty.clone()),
            ..TlsSettings::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let half = TlsSettings {
            client_cert: Some(empty),
            ..TlsSettings::default()
        };
        assert!(matches!(
            client_config(&half),
            Err(TlsError::HalfClientCertificate)
        ));
        std::fs::remove_dir_all(dir).unwrap();
        assert!(
            client_config(&TlsSettings::default()).is_ok(),
            "system roots"
        );
    }
}
