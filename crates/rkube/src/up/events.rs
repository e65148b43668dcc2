//! The reconciliation log `rkube up` streams to the terminal: every Event the cluster records,
//! as one readable line (time, component, object, reason, message), as it happens.

use std::collections::HashSet;
use std::io::Write;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// Formats one Event the way the log shows it; `None` for events without a reason (noise).
pub fn line(event: &Event) -> Option<String> {
    let reason = event.reason.as_deref()?;
    let when = event
        .last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.first_timestamp.as_ref().map(|t| t.0))
        .unwrap_or_else(jiff::Timestamp::now);
    let clock = when.to_zoned(jiff::tz::TimeZone::system()).strftime("%H:%M:%S").to_string();
    let component = event
        .source
        .as_ref()
        .and_then(|s| s.component.clone())
        .or_else(|| event.reporting_component.clone())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "-".into());
    let obj = &event.involved_object;
    let kind = obj.kind.as_deref().unwrap_or("object").to_lowercase();
    let name = match obj.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != "default" => {
            format!("{kind}/{ns}/{}", obj.name.as_deref().unwrap_or(""))
        }
        _ => format!("{kind}/{}", obj.name.as_deref().unwrap_or("")),
    };
    let message = event.message.as_deref().unwrap_or("").trim();
    Some(format!("{clock}  {component:<18} {name:<34} {reason:<22} {message}"))
}

/// Prints events newer than `since` until `shutdown`; an event updated in place (a repeated
/// event whose count grew) is printed again, as `kubectl get events -w` does.
pub async fn stream(client: Client, since: jiff::Timestamp, shutdown: CancellationToken) {
    let api: Api<Event> = Api::all(client);
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut events = rkube_client::watch::events(api, watcher::Config::default()).boxed();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = events.next() => next,
        };
        let Some(next) = next else { return };
        let (watcher::Event::Apply(ev) | watcher::Event::InitApply(ev)) = next else { continue };
        let stamp = ev.last_timestamp.as_ref().map(|t| t.0).or(ev.event_time.as_ref().map(|t| t.0));
        if stamp.is_some_and(|t| t < since) {
            continue;
        }
        let key = (
            ev.metadata.uid.clone().unwrap_or_default(),
            ev.metadata.resource_version.clone().unwrap_or_default(),
        );
        if !seen.insert(key) {
            continue;
        }
        if seen.len() > 50_000 {
            seen.clear();
        }
        if let Some(l) = line(&ev) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EventSource, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn an_event_becomes_one_line_with_component_object_reason_and_message() {
        let ev = Event {
            reason: Some("Scheduled".into()),
            message: Some("Successfully assigned default/web-1 to rkube-worker-1".into()),
            source: Some(EventSource { component: Some("default-scheduler".into()), host: None }),
            involved_object: ObjectReference {
                kind: Some("Pod".into()),
                name: Some("web-1".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            last_timestamp: Some(Time("2026-01-01T00:00:00Z".parse().unwrap())),
            ..Default::default()
        };
        let l = line(&ev).unwrap();
        assert!(l.contains("default-scheduler"), "{l}");
        assert!(l.contains("pod/web-1"), "{l}");
        assert!(l.contains("Scheduled"), "{l}");
        assert!(l.ends_with("Successfully assigned default/web-1 to rkube-worker-1"), "{l}");
    }

    #[test]
    fn an_event_without_a_reason_is_not_logged() {
        assert!(line(&Event::default()).is_none());
    }
}
