//! The `deploy/` tree as something tests can run.
//!
//! - [`Manifests`]: the Kubernetes YAML of `deploy/kubernetes/`, and [`ContainerSpec`]:
//!   one container's command, args and environment resolved as the kubelet would
//!   (`env` values, `valueFrom.fieldRef` from the downward API, `configMapKeyRef`,
//!   `envFrom.configMapRef`, and `$(VAR)` expansion), so a test starts the real binaries
//!   with exactly what the manifest says. A test changes only what it must (addresses,
//!   paths) through [`ContainerSpec::override_env`], which fails if the manifest does not
//!   set that variable: an override cannot hide a drift.
//! - [`Proc`]: such a container as a process (environment cleared first, like a
//!   container's), killed on drop; [`Proc::term`] sends SIGTERM as the kubelet does.
//! - [`Manifests::set_config`]: a ConfigMap edited as an operator would.
//! - [`GrpcProbe`]: a container's `grpc:` probes, and [`grpc_probe`]: one probe as the
//!   kubelet makes it (`grpc.health.v1.Health/Check` with the probe's service, bounded by
//!   its timeout).
//! - [`deploy_dir`]: where `deploy/` is.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_yaml::Value;
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::tools::bin;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .join("deploy")
}

/// Every object of `deploy/kubernetes/*.yaml` (kustomization.yaml excepted).
pub struct Manifests {
    docs: Vec<Value>,
}

impl Manifests {
    /// Loads the files listed in `deploy/kubernetes/kustomization.yaml`.
    pub fn load() -> anyhow::Result<Manifests> {
        let dir = deploy_dir().join("kubernetes");
        let k: Value = serde_yaml::from_str(
            &std::fs::read_to_string(dir.join("kustomization.yaml"))
                .context("read kustomization.yaml")?,
        )?;
        let mut docs = Vec::new();
        for f in k["resources"].as_sequence().context("resources")? {
            let f = f.as_str().context("resource name")?;
            let text = std::fs::read_to_string(dir.join(f)).with_context(|| format!("read {f}"))?;
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v = Value::deserialize(d).with_context(|| format!("parse {f}"))?;
                if !v.is_null() {
                    docs.push(v);
                }
            }
        }
        Ok(Manifests { docs })
    }

    /// The object of this kind and name.
    pub fn get(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .with_context(|| format!("no {kind} {name} in deploy/kubernetes"))
    }

    /// Sets `key` of ConfigMap `name` to `value`, as an operator editing
    /// `configmap.yaml` would (e.g. uncommenting a documented setting).
    pub fn set_config(&mut self, name: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let cm = self
            .docs
            .iter_mut()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
            .with_context(|| format!("no ConfigMap {name} in deploy/kubernetes"))?;
        cm["data"]
            .as_mapping_mut()
            .context("ConfigMap data")?
            .insert(Value::from(key), Value::from(value));
        Ok(())
    }

    /// A ConfigMap's data.
    pub fn config_map(&self, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let cm = self.get("ConfigMap", name)?;
        let mut out = BTreeMap::new();
        for (k, v) in cm["data"].as_mapping().context("ConfigMap data")? {
            out.insert(
                k.as_str().context("key")?.to_string(),
                v.as_str()
                    .context("ConfigMap values are strings")?
                    .to_string(),
            );
        }
        Ok(out)
    }

    /// The container `container` of the pod template of `kind`/`name`, resolved with
    /// `downward` (fieldPath → value, e.g. `spec.nodeName` → `node1`).
    pub fn container(
        &self,
        kind: &str,
        name: &str,
        container: &str,
        downward: &[(&str, &str)],
    ) -> anyhow::Result<ContainerSpec> {
        let obj = self.get(kind, name)?;
        let pod = &obj["spec"]["template"]["spec"];
        let c = pod["containers"]
            .as_sequence()
            .context("containers")?
            .iter()
            .find(|c| c["name"] == container)
            .with_context(|| format!("{kind} {name} has no container {container}"))?;
        let strings = |v: &Value| -> anyhow::Result<Vec<String>> {
            match v {
                Value::Null => Ok(Vec::new()),
                Value::Sequence(s) => s
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).context("string"))
                    .collect(),
                _ => bail!("command/args must be lists"),
            }
        };
        let command = strings(&c["command"])?;
        let args = strings(&c["args"])?;
        // Kubernetes: envFrom first, then env (which wins), each `$(VAR)` expanded from
        // the variables defined before it.
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(e, _)| *e != k);
            env.push((k, v));
        };
        if let Some(from) = c["envFrom"].as_sequence() {
            for f in from {
                let cm = f["configMapRef"]["name"]
                    .as_str()
                    .context("envFrom supports configMapRef only")?;
                for (k, v) in self.config_map(cm)? {
                    set(&mut env, k, v);
                }
            }
        }
        for e in c["env"].as_sequence().into_iter().flatten() {
            let k = e["name"].as_str().context("env name")?.to_string();
            let v = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if let Some(p) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                downward
                    .iter()
                    .find(|(f, _)| *f == p)
                    .map(|(_, v)| v.to_string())
                    .with_context(|| format!("env {k}: no downward value for {p}"))?
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_mapping() {
                let cm = r.get("name").and_then(Value::as_str).context("name")?;
                let key = r.get("key").and_then(Value::as_str).context("key")?;
                let optional = r.get("optional").and_then(Value::as_bool) == Some(true);
                match self.config_map(cm)?.remove(key) {
                    Some(v) => v,
                    // The kubelet leaves the variable out.
                    None if optional => continue,
                    None => bail!("env {k}: ConfigMap {cm} has no key {key}"),
                }
            } else {
                bail!("env {k}: unsupported source {e:?}");
            };
            set(&mut env, k, v);
        }
        let mut secret_mounts = Vec::new();
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            let vname = m["name"].as_str().context("volumeMounts name")?;
            let vol = pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == vname)
                .with_context(|| format!("volumeMount {vname}: no such volume"))?;
            if let Some(secret) = vol["secret"]["secretName"].as_str() {
                secret_mounts.push(SecretMount {
                    path: m["mountPath"].as_str().context("mountPath")?.to_string(),
                    secret: secret.to_string(),
                    optional: vol["secret"]["optional"].as_bool() == Some(true),
                });
            }
        }
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let mut grpc_probes = Vec::new();
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let p = &c[kind];
            if p["grpc"].is_null() {
                continue;
            }
            grpc_probes.push(GrpcProbe {
                kind: kind.to_string(),
                port: p["grpc"]["port"]
                    .as_u64()
                    .and_then(|v| u16::try_from(v).ok())
                    .with_context(|| format!("{kind}: grpc.port"))?,
                service: p["grpc"]["service"].as_str().unwrap_or("").to_string(),
                // Kubernetes' default timeoutSeconds.
                timeout: Duration::from_secs(p["timeoutSeconds"].as_u64().unwrap_or(1)),
            });
        }
        Ok(ContainerSpec {
            command,
            args,
            env,
            termination_grace: Duration::from_secs(grace),
            grpc_probes,
            secret_mounts,
        })
    }
}

/// `$(VAR)` expansion as the kubelet does it: defined variables are replaced, `$$` is a
/// literal `$`, anything else is left as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let (Some(t), Some(end)) = (tail.strip_prefix("$("), tail.find(')')) {
            let name = &t[..end - 2];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..=end]),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// One container, resolved: what the kubelet would exec.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// `command` (the image's entrypoint is never relied on: it must be set).
    pub command: Vec<String>,
    /// `args`, not yet `$(VAR)`-expanded (that happens at [`ContainerSpec::spawn`]).
    pub args: Vec<String>,
    /// The environment, in definition order.
    pub env: Vec<(String, String)>,
    /// The pod's `terminationGracePeriodSeconds`.
    pub termination_grace: Duration,
    /// The container's `grpc:` probes (other kinds of probe are not listed).
    pub grpc_probes: Vec<GrpcProbe>,
    /// The Secrets mounted into the container.
    pub secret_mounts: Vec<SecretMount>,
}

/// A Secret volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    /// `mountPath`.
    pub path: String,
    /// `secret.secretName`.
    pub secret: String,
    /// `secret.optional`: the pod starts without the Secret (an empty directory).
    pub optional: bool,
}

/// A `grpc:` probe of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcProbe {
    /// `startupProbe`, `readinessProbe` or `livenessProbe`.
    pub kind: String,
    /// `grpc.port` (the container's port; a test maps it to where its process listens).
    pub port: u16,
    /// `grpc.service`; "" when unset (the server's overall health).
    pub service: String,
    /// `timeoutSeconds` (Kubernetes' default: 1 s).
    pub timeout: Duration,
}

/// The probe `probe` against `addr` (host:port), as the kubelet makes it: one
/// `grpc.health.v1.Health/Check` with the probe's service, connection and answer within
/// the probe's timeout. The probe passes only on SERVING; `Err` says why it did not answer.
pub fn grpc_probe(addr: &str, probe: &GrpcProbe) -> Result<ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        let check = async {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("endpoint {addr}: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: probe.service.clone(),
                })
                .await
                .map_err(|s| format!("Check({:?}) on {addr}: {s}", probe.service))?;
            Ok(ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown))
        };
        tokio::time::timeout(probe.timeout, check)
            .await
            .map_err(|_| format!("{addr}: no answer within {:?}", probe.timeout))?
    })
}

impl ContainerSpec {
    /// The value of `key`.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces the value of `key`, which the manifest must set (else an error: the test
    /// would silently change what the manifest means). `$(VAR)` in `value` is expanded.
    pub fn override_env(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let v = expand(value, &self.env);
        let slot = self
            .env
            .iter_mut()
            .find(|(k, _)| k == key)
            .with_context(|| format!("the manifest does not set {key}"))?;
        slot.1 = v;
        Ok(())
    }

    /// Starts the container's command as a process: `command[0]` is one of the
    /// workspace binaries (taken from the build), the environment is cleared and set to
    /// the container's (plus PATH, as an image has, and `extra`). Waits until the first
    /// stdout line starts with `ready_prefix`.
    pub fn spawn(
        &self,
        log: &Path,
        extra: &[(&str, &str)],
        ready_prefix: &str,
    ) -> anyhow::Result<Proc> {
        let program = self
            .command
            .first()
            .context("the manifest sets no command")?;
        let name = Path::new(program)
            .file_name()
            .and_then(|n| n.to_str())
            .context("command")?;
        if !["mdserver", "mdagent", "mdctl"].contains(&name) {
            bail!("command {program} is none of the image's binaries");
        }
        let argv: Vec<String> = self
            .command
            .iter()
            .skip(1)
            .chain(&self.args)
            .map(|a| expand(a, &self.env))
            .collect();
        let logf = std::fs::File::create(log).context("create log")?;
        let mut child = Command::new(bin(name))
            .args(&argv)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let mut p = Proc {
            child: Some(child),
            name: name.to_string(),
            log: log.to_path_buf(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.starts_with(ready_prefix) => Ok(p),
            other => {
                p.kill9();
                bail!(
                    "{name} did not print {ready_prefix:?} (got {other:?}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            }
        }
    }
}

/// A process started from a manifest; killed (-9) on drop.
pub struct Proc {
    child: Option<Child>,
    /// Binary name.
    pub name: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Proc {
    /// SIGTERM, as the kubelet sends, then waits up to `grace`; returns the exit code, or
    /// None if it had to be killed.
    pub fn term(&mut self, grace: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = vec![("POD_IP".to_string(), "10.0.0.7".to_string())];
        assert_eq!(expand("$(POD_IP):7481", &env), "10.0.0.7:7481");
        assert_eq!(expand("$(NOPE):1", &env), "$(NOPE):1");
        assert_eq!(expand("$$(POD_IP)", &env), "$(POD_IP)");
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    fn an_override_needs_a_variable_the_manifest_sets() {
        let mut c = ContainerSpec {
            command: vec!["mdagent".into()],
            args: Vec::new(),
            env: vec![
                ("POD_IP".into(), "10.0.0.7".into()),
                ("MDAGENT_LISTEN".into(), "0.0.0.0:7481".into()),
            ],
            termination_grace: Duration::from_secs(30),
            grpc_probes: Vec::new(),
            secret_mounts: Vec::new(),
        };
        c.override_env("MDAGENT_LISTEN", "$(POD_IP):1").unwrap();
        assert_eq!(c.env("MDAGENT_LISTEN"), Some("10.0.0.7:1"));
        assert!(c.override_env("MDAGENT_NOT_IN_MANIFEST", "x").is_err());
    }
}
