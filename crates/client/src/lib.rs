//! The small toolkit every rkube component that talks to the API server shares: resource
//! quantities, an event recorder that aggregates repeats, and leader leases.

pub mod events;
pub mod lease;
pub mod quantity;

/// `now` as Kubernetes writes timestamps (RFC 3339, seconds).
pub fn now_time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}

pub fn now_micro() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff::Timestamp::now())
}
