//! Containers through the OCI runtime CLI (runc): bundle + runtime spec from the pod, create/start/kill/delete.
