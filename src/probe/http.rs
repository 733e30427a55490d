//! The HTTP check of a port: `GET <path>` and the classification of the response head.

use super::PortStatus;
use super::connect::connect;
use crate::model::Scheme;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// Response headers larger than this are not a metrics endpoint we recognise.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Full verification: connect (TLS for https), `GET path`, and require 200 with a Prometheus
/// text or OpenMetrics content type. Only the response head is read.
pub async fn verify(addr: SocketAddr, path: &str, scheme: Scheme, limit: Duration) -> PortStatus {
    match timeout(limit, get_head(addr, path, scheme)).await {
        Ok(status) => status,
        Err(_) => PortStatus::Timeout,
    }
}

async fn get_head(addr: SocketAddr, path: &str, scheme: Scheme) -> PortStatus {
    let stream = match connect(addr).await {
        Ok(stream) => stream,
        Err(_) => return PortStatus::Refused,
    };
    match scheme {
        Scheme::Http => http_get_head(stream, addr, path).await,
        Scheme::Https => {
            let connector = tokio_rustls::TlsConnector::from(crate::tls::probe_client_config());
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            match connector.connect(name, stream).await {
                Ok(tls) => http_get_head(tls, addr, path).await,
                Err(_) => PortStatus::TlsHandshake,
            }
        }
    }
}

async fn http_get_head(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    path: &str,
) -> PortStatus {
    let host = match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: workersd/{}\r\n\
         Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\
         Connection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return PortStatus::Malformed;
    }
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return classify_head(&head),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_RESPONSE_HEAD {
            return classify_head(&head);
        }
    }
}

/// Classifies a response head (status line and headers).
pub fn classify_head(head: &[u8]) -> PortStatus {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return PortStatus::Malformed;
    };
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return PortStatus::Malformed;
    };
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return PortStatus::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return PortStatus::Malformed;
    }
    if code != "200" {
        return PortStatus::HttpStatus;
    }
    let content_type = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_ascii_lowercase())
    });
    let media_type = content_type
        .as_deref()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if media_type == "text/plain" || media_type == "application/openmetrics-text" {
        PortStatus::Live
    } else {
        PortStatus::ContentType
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::connect_only;
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    #[test]
    fn classifies_response_heads() {
        let ok =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\r\n";
        assert_eq!(classify_head(ok), PortStatus::Live);
        let om = b"HTTP/1.0 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0\r\n\r\n# HELP";
        assert_eq!(classify_head(om), PortStatus::Live);
        let html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n";
        assert_eq!(classify_head(html), PortStatus::ContentType);
        let none = b"HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(classify_head(none), PortStatus::ContentType);
        let missing = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\r\n";
        assert_eq!(classify_head(missing), PortStatus::HttpStatus);
        assert_eq!(classify_head(b"SSH-2.0-OpenSSH\r\n"), PortStatus::Malformed);
        assert_eq!(classify_head(b"\xff\xfe\r\n\r\n"), PortStatus::Malformed);
    }

    /// A one-shot-per-connection HTTP server answering with `response`.
    pub(crate) async fn serve(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    pub(crate) const METRICS_OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 6\r\n\r\nup 1\n\n";

    #[tokio::test]
    async fn verifies_real_sockets() {
        let limit = Duration::from_secs(2);
        let metrics = serve(METRICS_OK).await;
        assert_eq!(
            verify(metrics, "/metrics", Scheme::Http, limit).await,
            PortStatus::Live
        );
        let html = serve("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>").await;
        assert_eq!(
            verify(html, "/metrics", Scheme::Http, limit).await,
            PortStatus::ContentType
        );
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        assert_eq!(
            verify(
                silent_addr,
                "/metrics",
                Scheme::Http,
                Duration::from_millis(200)
            )
            .await,
            PortStatus::Timeout
        );
        drop(silent);
        assert_eq!(
            verify(silent_addr, "/metrics", Scheme::Http, limit).await,
            PortStatus::Refused
        );
        assert_eq!(connect_only(metrics, limit).await, PortStatus::Live);
    }

    #[tokio::test]
    async fn verifies_https_workers_with_any_certificate() {
        use tokio_rustls::rustls::ServerConfig;
        use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        crate::tls::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["worker.invalid".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let _ = tls.read(&mut [0u8; 1024]).await;
                    let _ = tls.write_all(METRICS_OK.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        let limit = Duration::from_secs(2);
        assert_eq!(
            verify(addr, "/metrics", Scheme::Https, limit).await,
            PortStatus::Live
        );
        let plain = serve(METRICS_OK).await;
        assert_eq!(
            verify(plain, "/metrics", Scheme::Https, limit).await,
            PortStatus::TlsHandshake
        );
    }
}
