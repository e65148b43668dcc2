//! Container lifecycle hooks: postStart runs right after a container starts (it is not Running
//! until the hook is done; a failure kills it), preStop right before it is stopped (bounded by the
//! grace period). Exec (inside the container, as exec probes), httpGet and sleep handlers; a
//! failure's message is worded as upstream's kubelet words it.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Pod};

use crate::probes::Target;

/// `name_namespace(uid)`, as the kubelet names a pod in messages.
pub fn pod_label(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.uid.as_deref().unwrap_or("")
    )
}

/// Runs `h` for container `c` of `pod`, giving up after `limit` (the grace period of a preStop);
/// `Err` is the message of the FailedPostStartHook/FailedPreStopHook event.
pub async fn run(
    pod: &Pod,
    c: &Container,
    h: &LifecycleHandler,
    t: &Target,
    limit: Option<Duration>,
) -> Result<(), String> {
    let work = run_unbounded(pod, c, h, t);
    match limit {
        None => work.await,
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} lifecycle hook for Container {:?} in Pod {:?} did not finish within the grace period of {}s",
                kind(h),
                c.name,
                pod_label(pod),
                limit.as_secs()
            )),
        },
    }
}

fn kind(h: &LifecycleHandler) -> &'static str {
    if h.exec.is_some() {
        "Exec"
    } else if h.http_get.is_some() {
        "HTTP"
    } else if h.sleep.is_some() {
        "Sleep"
    } else {
        "Unknown"
    }
}

async fn run_unbounded(
    pod: &Pod,
    c: &Container,
    h: &LifecycleHandler,
    t: &Target,
) -> Result<(), String> {
    if let Some(exec) = &h.exec {
        let cmd = exec.command.clone().unwrap_or_default();
        return match exec_in(&cmd, t).await {
            Ok(_) => Ok(()),
            Err((e, output)) => Err(format!(
                "Exec lifecycle hook ([{}]) for Container {:?} in Pod {:?} failed - error: {e}, message: {output:?}",
                cmd.join(" "),
                c.name,
                pod_label(pod)
            )),
        };
    }
    if let Some(get) = &h.http_get {
        let path = get.path.clone().unwrap_or_default();
        return http_get(c, get, t).await.map_err(|e| {
            format!(
                "HTTP lifecycle hook ({path}) for Container {:?} in Pod {:?} failed - error: {e}",
                c.name,
                pod_label(pod)
            )
        });
    }
    if let Some(sleep) = &h.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
        return Ok(());
    }
    Err(format!("Cannot run handler: invalid handler: {h:?}"))
}

/// Runs `cmd` in the container (through `t.exec_prefix`) or on the host with its environment;
/// `Err` carries the error and the command's output.
async fn exec_in(cmd: &[String], t: &Target) -> Result<String, (String, String)> {
    if cmd.is_empty() {
        return Err(("exec hook without a command".into(), String::new()));
    }
    let argv: Vec<String> = t.exec_prefix.iter().chain(cmd).cloned().collect();
    let mut command = tokio::process::Command::new(&argv[0]);
    command.args(&argv[1..]).stdin(std::process::Stdio::null()).kill_on_drop(true);
    if t.exec_prefix.is_empty() {
        let _ = std::fs::create_dir_all(&t.workdir);
        command
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(t.env.clone())
            .current_dir(&t.workdir);
    }
    let out = command.output().await.map_err(|e| (e.to_string(), String::new()))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        return Ok(output);
    }
    use std::os::unix::process::ExitStatusExt;
    let code = out.status.code().unwrap_or(128 + out.status.signal().unwrap_or(0));
    Err((format!("command '{}' exited with {code}: {output}", cmd.join(" ")), output))
}

/// A GET to the container; only a failed request fails the hook (any status is an answer).
async fn http_get(
    c: &Container,
    get: &k8s_openapi::api::core::v1::HTTPGetAction,
    t: &Target,
) -> Result<(), String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = match &get.port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(s) if s.is_empty() => Some(80),
        IntOrString::String(s) => s.parse().ok().or_else(|| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
    .ok_or_else(|| format!("couldn't find port: {:?} in {}", get.port, c.name))?;
    let host = get.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| t.host.clone());
    let path = get.path.clone().unwrap_or_default();
    let path = if path.starts_with('/') { path } else { format!("/{path}") };
    let url = format!("http://{host}:{port}{path}");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = http::Request::get(&url).header("user-agent", "kube-lifecycle/1.33");
    for h in get.http_headers.iter().flatten() {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req.body(http_body_util::Empty::new()).map_err(|e| e.to_string())?;
    client.request(req).await.map(|_| ()).map_err(|e| format!("Get \"{url}\": {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ExecAction, SleepAction};

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": [{"name": "c"}]}
        }))
        .unwrap()
    }

    fn target() -> Target {
        Target {
            host: "127.0.0.1".into(),
            env: vec![("GREETING".into(), "hi".into())],
            workdir: std::env::temp_dir(),
            exec_prefix: Vec::new(),
        }
    }

    fn exec(cmd: &[&str]) -> LifecycleHandler {
        LifecycleHandler {
            exec: Some(ExecAction { command: Some(cmd.iter().map(|s| s.to_string()).collect()) }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_failing_exec_hook_is_reported_in_upstreams_words() {
        let p = pod();
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let t = target();
        let ok = run(&p, &c, &exec(&["sh", "-c", "test \"$GREETING\" = hi"]), &t, None).await;
        assert_eq!(ok, Ok(()));
        let err = run(&p, &c, &exec(&["sh", "-c", "echo nope; exit 3"]), &target(), None)
            .await
            .unwrap_err();
        assert!(
            err.starts_with(
                "Exec lifecycle hook ([sh -c echo nope; exit 3]) for Container \"c\" in Pod \"p_ns(u1)\" failed - error: command 'sh -c echo nope; exit 3' exited with 3"
            ),
            "{err}"
        );
        assert!(err.ends_with("message: \"nope\\n\""), "{err}");
    }

    #[tokio::test]
    async fn a_hook_is_cut_at_its_limit_and_sleep_sleeps() {
        let p = pod();
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let sleep =
            LifecycleHandler { sleep: Some(SleepAction { seconds: 5 }), ..Default::default() };
        let started = std::time::Instant::now();
        let r = run(&p, &c, &sleep, &target(), Some(Duration::from_millis(300))).await;
        assert!(r.unwrap_err().contains("did not finish within the grace period"));
        assert!(started.elapsed() < Duration::from_secs(2));
        let short =
            LifecycleHandler { sleep: Some(SleepAction { seconds: 1 }), ..Default::default() };
        let started = std::time::Instant::now();
        assert_eq!(run(&p, &c, &short, &target(), None).await, Ok(()));
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn an_http_hook_fails_only_when_nothing_answers() {
        let p = pod();
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        let get = |port: i32| LifecycleHandler {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction {
                path: Some("/stop".into()),
                port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(run(&p, &c, &get(port as i32), &target(), None).await, Ok(()));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        let err = run(&p, &c, &get(dead as i32), &target(), None).await.unwrap_err();
        assert!(err.starts_with("HTTP lifecycle hook (/stop) for Container \"c\" in Pod \"p_ns(u1)\" failed - error: Get \"http://127.0.0.1:"), "{err}");
    }
}
