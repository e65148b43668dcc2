//! Cluster DNS (`rkube dns`): `<svc>.<ns>.svc.cluster.local` and pod records from a watch of Services, EndpointSlices and Pods; other names forwarded upstream.
