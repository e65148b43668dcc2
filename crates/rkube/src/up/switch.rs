//! A per-node "network cable" between an in-process kubelet and the API server: `rkube node crash`
//! pulls it, so the node's heartbeats stop exactly as they would after a power loss.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tower::{Layer, Service};

/// Shared on/off state of one node's link to the API server.
#[derive(Clone, Debug, Default)]
pub struct Cable(Arc<AtomicBool>);

impl Cable {
    pub fn plugged() -> Self {
        Cable(Arc::new(AtomicBool::new(true)))
    }
    pub fn set(&self, plugged: bool) {
        self.0.store(plugged, Ordering::SeqCst);
    }
    pub fn is_plugged(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The error a request gets while the cable is out; kube-rs reports it like a refused connection.
#[derive(Debug, thiserror::Error)]
#[error("node is powered off (rkube node crash): connection to the API server refused")]
pub struct Unplugged;

impl<S> Layer<S> for Cable {
    type Service = Switched<S>;
    fn layer(&self, inner: S) -> Switched<S> {
        Switched { inner, cable: self.clone() }
    }
}

#[derive(Clone)]
pub struct Switched<S> {
    inner: S,
    cable: Cable,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, Req> Service<Req> for Switched<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if !self.cable.is_plugged() {
            return Box::pin(async { Err(Box::new(Unplugged) as BoxError) });
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn an_unplugged_cable_refuses_requests_and_a_plugged_one_passes_them() {
        let cable = Cable::plugged();
        let echo = tower::service_fn(|x: u32| async move { Ok::<_, BoxError>(x + 1) });
        let svc = cable.layer(echo);
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2);
        cable.set(false);
        let err = svc.clone().oneshot(1).await.unwrap_err();
        assert!(err.to_string().contains("powered off"));
        cable.set(true);
        assert_eq!(svc.oneshot(2).await.unwrap(), 3);
    }
}
