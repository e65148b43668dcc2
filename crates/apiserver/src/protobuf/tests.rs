//! The decoder against real protobuf bytes, encoded by kube-rs's generated bindings (`k8s-pb`).

use super::*;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;

fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(raw),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut out = MAGIC.to_vec();
    out.extend(unknown.encode_to_vec());
    out
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// What Go's encoder writes for a `kubectl create deployment`: every non-pointer field, empty or not.
fn deployment() -> apps::Deployment {
    let labels: std::collections::BTreeMap<String, String> =
        [("app".to_string(), "web".to_string())].into();
    apps::Deployment {
        metadata: Some(meta::ObjectMeta {
            name: s("web"),
            generate_name: s(""),
            namespace: s(""),
            labels: labels.clone(),
            creation_timestamp: Some(meta::Time { seconds: None, nanos: None }),
            generation: Some(0),
            ..Default::default()
        }),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(0),
            selector: Some(meta::LabelSelector {
                match_labels: labels.clone(),
                ..Default::default()
            }),
            strategy: Some(apps::DeploymentStrategy {
                r#type: s("RollingUpdate"),
                rolling_update: Some(apps::RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString {
                        r#type: Some(0),
                        int_val: Some(0),
                        str_val: s(""),
                    }),
                    max_surge: Some(IntOrString {
                        r#type: Some(1),
                        int_val: Some(0),
                        str_val: s("25%"),
                    }),
                }),
            }),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta {
                    labels,
                    creation_timestamp: Some(meta::Time { seconds: None, nanos: None }),
                    ..Default::default()
                }),
                spec: Some(core::PodSpec {
                    containers: vec![core::Container {
                        name: s("nginx"),
                        image: s("nginx:1.26-alpine"),
                        command: vec!["nginx".into(), "-g".into()],
                        ports: vec![core::ContainerPort {
                            container_port: Some(80),
                            protocol: s("TCP"),
                            host_port: Some(0),
                            ..Default::default()
                        }],
                        resources: Some(core::ResourceRequirements {
                            limits: [("cpu".to_string(), Quantity { string: s("500m") })].into(),
                            ..Default::default()
                        }),
                        readiness_probe: Some(core::Probe {
                            handler: Some(core::ProbeHandler {
                                http_get: Some(core::HttpGetAction {
                                    path: s("/healthz"),
                                    port: Some(IntOrString {
                                        r#type: Some(0),
                                        int_val: Some(8080),
                                        str_val: s(""),
                                    }),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            period_seconds: Some(3),
                            ..Default::default()
                        }),
                        stdin: Some(false),
                        ..Default::default()
                    }],
                    volumes: vec![core::Volume {
                        name: s("conf"),
                        volume_source: Some(core::VolumeSource {
                            config_map: Some(core::ConfigMapVolumeSource {
                                local_object_reference: Some(core::LocalObjectReference {
                                    name: s("web-conf"),
                                }),
                                default_mode: Some(420),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                    }],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: Some(apps::DeploymentStatus::default()),
    }
}

#[test]
fn decodes_a_deployment_as_kubectl_create_sends_it() {
    let body = envelope("apps/v1", "Deployment", deployment().encode_to_vec());
    let v = decode_object(&body, 0).unwrap();
    assert_eq!(
        v,
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{
                            "name": "nginx",
                            "image": "nginx:1.26-alpine",
                            "command": ["nginx", "-g"],
                            "ports": [{"containerPort": 80, "protocol": "TCP"}],
                            "resources": {"limits": {"cpu": "500m"}},
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 3},
                        }],
                        "volumes": [{"name": "conf", "configMap": {"name": "web-conf", "defaultMode": 420}}],
                    },
                },
            },
            "status": {},
        })
    );
    // It is a valid Deployment for the typed layer too.
    let _: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(v).unwrap();
}

#[test]
fn decodes_bytes_maps_acronyms_and_times() {
    let secret = core::Secret {
        metadata: Some(meta::ObjectMeta {
            name: s("token"),
            creation_timestamp: Some(meta::Time { seconds: Some(1_700_000_000), nanos: Some(0) }),
            ..Default::default()
        }),
        data: [("key".to_string(), b"\x00secret".to_vec())].into(),
        r#type: s("Opaque"),
        ..Default::default()
    };
    let v = decode_object(&envelope("v1", "Secret", secret.encode_to_vec()), 0).unwrap();
    assert_eq!(v["data"]["key"], "AHNlY3JldA==");
    assert_eq!(v["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");

    let pod = core::Pod {
        status: Some(core::PodStatus {
            pod_ip: s("10.0.0.7"),
            pod_ips: vec![core::PodIp { ip: s("10.0.0.7") }],
            host_ip: s("192.168.1.1"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let v = decode_object(&envelope("v1", "Pod", pod.encode_to_vec()), 0).unwrap();
    assert_eq!(
        v["status"],
        json!({"podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}], "hostIP": "192.168.1.1"})
    );

    let opts = meta::DeleteOptions {
        propagation_policy: s("Foreground"),
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let v = decode_object(&envelope("meta.k8s.io/v1", "DeleteOptions", opts.encode_to_vec()), 0)
        .unwrap();
    assert_eq!(v["propagationPolicy"], "Foreground");
    assert_eq!(v["gracePeriodSeconds"], 0);
}

#[test]
fn hostile_bytes_are_errors_not_panics() {
    let good = envelope("apps/v1", "Deployment", deployment().encode_to_vec());
    // Every truncation and a flipped byte at every position: an error or a value, never a panic.
    for n in 0..good.len() {
        let _ = decode_object(&good[..n], 0);
        let mut bad = good.clone();
        bad[n] ^= 0xa5;
        let _ = decode_object(&bad, 0);
    }
    assert!(decode_object(b"not protobuf", 0).is_err());
    assert!(decode_object(&envelope("v1", "NoSuchKind", vec![]), 0).is_err());
    // A length prefix far past the end of the buffer.
    assert!(
        decode_object(&envelope("v1", "Pod", vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]), 0).is_err()
    );
    // Nesting beyond the limit is refused, not followed.
    assert!(message("io.k8s.api.core.v1.Pod", &[], MAX_DEPTH + 1).is_err());
}
