//! Security (issue 10): TLS to the service with a CA file and a client certificate, TLS to Kafka
//! through a TLS-terminating proxy in front of Tansu, SASL errors, and secrets kept out of every
//! output.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry::sidecar::Sidecar;
use pki::{Ca, Leaf, write};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(30);

/// What one TLS handshake with the test service ended in: the client certificate presented
/// (DER), `None` without one, or why the handshake failed.
type Handshake = Result<Option<Vec<u8>>, String>;

/// An HTTPS service on 127.0.0.1:0 that echoes the request body, with a server certificate and,
/// when `client_ca` is given, a required client certificate signed by it.
struct TlsService {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    requests: Arc<Mutex<usize>>,
}

struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => {
                    let presented = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec());
                    self.handshakes.lock().unwrap().push(Ok(presented));
                    return (tls, addr);
                }
                Err(e) => self.handshakes.lock().unwrap().push(Err(e.to_string())),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

impl TlsService {
    async fn start(server: &Leaf, client_ca: Option<&Ca>) -> TlsService {
        ferry::sidecar::install_crypto();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(server.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from(der(&ca.pem))).unwrap();
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let handshakes: Arc<Mutex<Vec<Handshake>>> = Arc::default();
        let requests: Arc<Mutex<usize>> = Arc::default();
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshakes: handshakes.clone(),
        };
        let counted = requests.clone();
        let app = axum::Router::new().fallback(move |body: String| {
            let counted = counted.clone();
            async move {
                *counted.lock().unwrap() += 1;
                body
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TlsService {
            addr,
            handshakes,
            requests,
        }
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }
}

/// A one-route config calling `url` with these TLS lines (indented by 8) in `call.http`.
fn https_config(kafka: &Kafka, t: &RouteTopics, url: &str, tls: &str) -> String {
    config_text(kafka, &t.group, &t.source, url, &t.reply, &t.dlq, "")
        .replace("        timeout: 2s\n", &format!("        timeout: 2s\n{tls}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_calls_trust_only_the_given_ca_and_present_the_client_certificate() {
    let kafka = Kafka::start();
    let dir = tempfile::tempdir().unwrap();
    let service_ca = Ca::new("service CA");
    let client_ca = Ca::new("client CA");
    let client = client_ca.client("ferry");
    let service = TlsService::start(&service_ca.server(), Some(&client_ca)).await;
    let url = format!("https://127.0.0.1:{}/h", service.addr.port());
    let ca_file = write(dir.path(), "ca.pem", &service_ca.pem);
    let cert_file = write(dir.path(), "client.pem", &client.cert);
    let key_file = write(dir.path(), "client.key", &client.key);

    // The right CA and a client certificate: the call goes through, the reply is published,
    // and the service saw ferry's certificate.
    let t = kafka.route_topics(1).await;
    let tls = format!(
        "        ca_file: {}\n        cert_file: {}\n        key_file: {}\n",
        ca_file.display(),
        cert_file.display(),
        key_file.display()
    );
    let sidecar = Sidecar::start(parse(&https_config(&kafka, &t, &url, &tls)))
        .await
        .unwrap();
    kafka.send(&t.source, None, Some("k"), "over tls", &[]).await;
    let replies = kafka.read(&t.reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("over tls"));
    assert_eq!(service.handshakes(), vec![Ok(Some(der(&client.cert)))]);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();

    // Without the client certificate the service refuses the handshake: no request reaches it
    // and the record is dead-lettered as a connection failure after its attempts.
    let t = kafka.route_topics(1).await;
    let tls = format!("        ca_file: {}\n", ca_file.display());
    let sidecar = Sidecar::start(parse(&https_config(&kafka, &t, &url, &tls)))
        .await
        .unwrap();
    kafka
        .send(&t.source, None, Some("k"), "no certificate", &[])
        .await;
    let dead = kafka.read(&t.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("connect"), "{dead:?}");
    assert_eq!(dead[0].header("ferry.attempts"), Some("3"), "{dead:?}");
    let refused = service.handshakes().into_iter().skip(1).collect::<Vec<_>>();
    assert!(
        !refused.is_empty()
            && refused
                .iter()
                .all(|h| h.as_ref().is_err_and(|e| e.contains("certificate"))),
        "{refused:?}"
    );
    assert_eq!(
        service.requests(),
        1,
        "only the first sidecar's request got through"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();

    // A CA that did not sign the service's certificate: ferry refuses the service, says why.
    let t = kafka.route_topics(1).await;
    let wrong = write(dir.path(), "wrong-ca.pem", &Ca::new("another CA").pem);
    let tls = format!(
        "        ca_file: {}\n        cert_file: {}\n        key_file: {}\n",
        wrong.display(),
        cert_file.display(),
        key_file.display()
    );
    let sidecar = Sidecar::start(parse(&https_config(&kafka, &t, &url, &tls)))
        .await
        .unwrap();
    kafka.send(&t.source, None, Some("k"), "wrong ca", &[]).await;
    let dead = kafka.read(&t.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("connect"), "{dead:?}");
    let message = dead[0].header("ferry.error.message").unwrap_or_default();
    assert!(
        message.contains("UnknownIssuer") || message.contains("certificate"),
        "names the TLS problem: {message}"
    );
    assert!(kafka.read_all(&t.reply).await.is_empty());
    assert_eq!(service.requests(), 1);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}
