//! Certificates for the TLS tests, made with rcgen as a cluster would have them: a CA, a server
//! certificate for `localhost` and 127.0.0.1, a client certificate whose CN is `alice`, all
//! signed by that CA; and a second CA that signed none of them. Written as PEM files to a
//! directory of their own, which goes with this value.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::TlsFiles;

#[derive(Debug)]
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of the above.
    pub other_ca: PathBuf,
    /// The client certificate, DER: what the server must see.
    pub client_der: Vec<u8>,
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

fn leaf(
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    (params.signed_by(&key, issuer).unwrap(), key)
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-pki-")
            .tempdir()
            .unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let (ca_cert, issuer) = ca("berth test CA");
        let (server, server_key) = leaf(
            &["localhost", "127.0.0.1"],
            "berthd",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client, client_key) = leaf(&[], "alice", ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        let (other_ca, _) = ca("another CA");
        Self {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("alice.pem", client.pem()),
            client_key: write("alice.key", client_key.serialize_pem()),
            other_ca: write("other-ca.pem", other_ca.pem()),
            client_der: client.der().to_vec(),
            _dir: dir,
        }
    }

    /// What alice presents: the CA, her certificate and key.
    pub fn client(&self) -> TlsFiles {
        TlsFiles {
            ca: Some(self.ca.clone()),
            cert: Some(self.client_cert.clone()),
            key: Some(self.client_key.clone()),
        }
    }

    /// A server builder that serves TLS and requires a client certificate signed by the CA.
    pub fn server(&self) -> Server {
        let read = |p: &PathBuf| std::fs::read(p).unwrap();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&self.server_cert),
                read(&self.server_key),
            ))
            .client_ca_root(Certificate::from_pem(read(&self.ca)));
        Server::builder().tls_config(tls).unwrap()
    }
}

/// A listener on a free loopback port, as a stream for `serve_with_incoming`, and its port.
pub async fn listen() -> (TcpListenerStream, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (TcpListenerStream::new(listener), port)
}
