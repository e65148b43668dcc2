//! OCI images and containers for the kubelet's `oci` runtime: `image` pulls, verifies, stores and
//! unpacks images; `runc` turns a pod's container into an OCI bundle and runs it with runc.

pub mod attach;
pub mod cgroup;
pub mod cli;
pub mod image;
pub mod log;
pub mod runc;
