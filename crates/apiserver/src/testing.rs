//! A real API server on a free loopback port over a fresh store, for other crates' tests:
//! `TestServer::start().await`, then `.client()`, `.kubeconfig_path()`, `.url()`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rkube_store::Store;
use tokio_util::sync::CancellationToken;

use crate::{ApiServer, Config};

pub struct TestServer {
    pub server: ApiServer,
    url: String,
    kubeconfig: PathBuf,
    dir: PathBuf,
    shutdown: CancellationToken,
    store: Arc<dyn Store>,
    /// The temp dir is this server's own (made by `start`), removed when it is dropped.
    owns_dir: bool,
}

impl TestServer {
    /// Starts on an in-memory store in a new temp dir.
    pub async fn start() -> TestServer {
        let store: Arc<dyn Store> = Arc::new(rkube_store::memory::MemoryStore::new());
        let dir = std::env::temp_dir().join(format!("rkube-test-{}", uuid::Uuid::new_v4()));
        let mut server = Self::start_with(store, &dir, 300).await;
        server.owns_dir = true;
        server
    }

    /// Starts on `store` with data (certificates) in `dir`; `toleration` is the default
    /// not-ready/unreachable toleration in seconds.
    pub async fn start_with(store: Arc<dyn Store>, dir: &Path, toleration: i64) -> TestServer {
        std::fs::create_dir_all(dir).expect("temp dir");
        let config = Config {
            secure_port: 0,
            data_dir: dir.to_path_buf(),
            default_toleration_seconds: toleration,
            ..Config::default()
        };
        let server = ApiServer::new(config, store.clone()).await.expect("api server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("https://127.0.0.1:{}", listener.local_addr().expect("addr").port());
        let kubeconfig = server.write_admin_kubeconfig(&url).expect("kubeconfig");
        let shutdown = CancellationToken::new();
        tokio::spawn(server.clone().serve(listener, shutdown.clone()));
        TestServer {
            server,
            url,
            kubeconfig,
            dir: dir.to_path_buf(),
            shutdown,
            store,
            owns_dir: false,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// An admin kube-rs client for this server.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        kube::Client::try_from(cfg).expect("client")
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
