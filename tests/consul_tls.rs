//! The Consul sink over HTTPS: a TLS-terminating proxy (rustls, certificates made by rcgen)
//! in front of the Consul double checks CA verification, the server-name override and client
//! certificates end to end.

use consul_double::{Config, ConsulDouble};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use workersd::catalog::desired_catalog;
use workersd::metrics::Metrics;
use workersd::model::Catalog;
use workersd::pipeline::DesiredState;
use workersd::secret::TokenSource;
use workersd::sinks::consul::{ConsulClient, ConsulError, ConsulSettings, ConsulSink};
use workersd::tls::TlsSettings;

struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("workersd-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        Self {
            dir,
            ca_pem,
            ca_params,
            ca_key,
        }
    }

    /// Writes `<name>.pem` and `<name>-key.pem`, signed by the CA.
    fn issue(&self, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A TLS front for `backend`; with `client_ca`, client certificates are required.
async fn tls_proxy(
    pki: &Pki,
    server_sans: &[&str],
    client_ca: bool,
    backend: std::net::SocketAddr,
) -> u16 {
    workersd::tls::install_crypto_provider();
    let (cert, key) = pki.issue("server", server_sans);
    let builder = ServerConfig::builder();
    let builder = if client_ca {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certs(&cert), PrivateKeyDer::from_pem_file(&key).unwrap())
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

fn state() -> DesiredState {
    let target = workersd::model::Target {
        id: workersd::model::TargetId::new("t"),
        service: "clever".into(),
        address: "10.0.0.1".parse().unwrap(),
        ports: workersd::model::PortRange::new(9011, 9012).unwrap(),
        path: "/metrics".into(),
        scheme: workersd::model::Scheme::Http,
        tags: vec![],
        meta: Default::default(),
        revision: 0,
        probe_interval: None,
    };
    let live = [9011, 9012].into_iter().collect();
    let catalog: Catalog = desired_catalog("o", [(&target, &live)]);
    DesiredState {
        catalog,
        complete: true,
    }
}

async fn sync(address: String, tls: TlsSettings) -> Result<usize, ConsulError> {
    let settings = ConsulSettings {
        address,
        token: TokenSource::None,
        datacenter: None,
        node: "workersd-tls".into(),
        node_address: "127.0.0.1".into(),
        node_meta: Default::default(),
        owner: "o".into(),
        resync_interval: Duration::from_secs(60),
        request_timeout: Duration::from_secs(3),
        tls,
    };
    let client = ConsulClient::new(settings).expect("client builds");
    ConsulSink::new(client, Arc::new(Metrics::new()))
        .sync(&state())
        .await
        .map(|o| o.registered)
}

#[tokio::test]
async fn verifies_consul_with_the_ca_file() {
    let double = ConsulDouble::start(Config::default()).await.unwrap();
    let pki = Pki::new("ca");
    let port = tls_proxy(&pki, &["localhost"], false, double.api_addr()).await;
    let ca = TlsSettings {
        ca_file: Some(pki.dir.join("ca.pem")),
        ..TlsSettings::default()
    };
    assert_eq!(
        sync(format!("https://localhost:{port}"), ca.clone())
            .await
            .unwrap(),
        2
    );
    // The system roots do not know our CA.
    let err = sync(format!("https://localhost:{port}"), TlsSettings::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ConsulError::Unreachable(_)), "{err}");
}

#[tokio::test]
async fn server_name_override_verifies_a_consul_addressed_by_ip() {
    let double = ConsulDouble::start(Config::default()).await.unwrap();
    let pki = Pki::new("sni");
    let port = tls_proxy(&pki, &["consul.service.dc1"], false, double.api_addr()).await;
    let ca = TlsSettings {
        ca_file: Some(pki.dir.join("ca.pem")),
        ..TlsSettings::default()
    };
    let address = format!("https://127.0.0.1:{port}");
    assert!(
        sync(address.clone(), ca.clone()).await.is_err(),
        "the IP is not in the certificate"
    );
    let named = TlsSettings {
        server_name: Some("consul.service.dc1".into()),
        ..ca.clone()
    };
    assert_eq!(sync(address.clone(), named).await.unwrap(), 2);
    let wrong = TlsSettings {
        server_name: Some("other.example".into()),
        ..ca
    };
    assert!(
        sync(address, wrong).await.is_err(),
        "the override is verified, not trusted blindly"
    );
}

#[tokio::test]
async fn client_certificate_for_verify_incoming() {
    let double = ConsulDouble::start(Config::default()).await.unwrap();
    let pki = Pki::new("mtls");
    let port = tls_proxy(&pki, &["localhost"], true, double.api_addr()).await;
    let address = format!("https://localhost:{port}");
    let ca = TlsSettings {
        ca_file: Some(pki.dir.join("ca.pem")),
        ..TlsSettings::default()
    };
    assert!(
        sync(address.clone(), ca.clone()).await.is_err(),
        "no client certificate, refused"
    );
    let (cert, key) = pki.issue("client", &["workersd"]);
    let mtls = TlsSettings {
        client_cert: Some(cert),
        client_key: Some(key),
        ..ca
    };
    assert_eq!(sync(address, mtls).await.unwrap(), 2);
}
