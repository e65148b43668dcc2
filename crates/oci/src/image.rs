//! Image service: references, pulls from OCI/Docker v2 registries, a content-addressed store and layer unpacking.
