//! `opsgate inject`: adds the opsgate sidecar to Kubernetes manifests (Deployments,
//! StatefulSets, DaemonSets, `List`s of them), with its ConfigMap, probes and Service
//! port, the way `deploy/kubernetes/` does by hand. Pure YAML in, YAML out: no cluster.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_norway::{Mapping, Value};

/// The sidecar container's name; its presence marks a workload as already injected.
pub const CONTAINER: &str = "opsgate";
const CONFIG_VOLUME: &str = "opsgate-config";
const CONFIG_DIR: &str = "/etc/opsgate";
const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];
/// shutdown_delay (5s) + drain_timeout (30s) + 10s for the app's own shutdown.
const GRACE_SECONDS: u64 = 45;

/// What to inject, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    /// The app container, when the pod has several.
    pub container: Option<String>,
    /// The app's port opsgate fronts; found from the Service, ports or probes when unset.
    pub upstream_port: Option<u16>,
    /// `(name, url, critical)` dependency checks.
    pub checks: Vec<(String, String, bool)>,
    /// Maintenance mode: "writes" or "all".
    pub maintenance: String,
    /// A whole opsgate.toml to ship instead of one made from the flags.
    pub config: Option<String>,
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+), else a regular one.
    pub native_sidecar: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            image: format!("opsgate:{}", env!("CARGO_PKG_VERSION")),
            container: None,
            upstream_port: None,
            checks: Vec::new(),
            maintenance: "writes".into(),
            config: None,
            native_sidecar: true,
        }
    }
}

/// Why an input cannot be injected; `at` names the document (`Deployment/shop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError {
    pub at: String,
    pub message: String,
}

impl std::fmt::Display for InjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.at.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

impl std::error::Error for InjectError {}

fn err(at: &str, message: impl Into<String>) -> InjectError {
    InjectError {
        at: at.to_string(),
        message: message.into(),
    }
}

/// What one injected workload tells the Service pass: which pods, which app port.
struct Fronted {
    namespace: Option<String>,
    labels: Mapping,
    /// The app port, by number and by its container port name (if it had one).
    port: u16,
    port_name: Option<String>,
    sidecar_port_name: String,
}

/// Injects opsgate into every workload of a multi-document YAML text; returns the
/// documents in input order, each workload preceded by its generated ConfigMap.
pub fn inject(text: &str, opts: &Options) -> Result<String, InjectError> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).map_err(|e| err("", format!("invalid YAML: {e}")))?;
        if v.is_null() {
            continue; // an empty document (a stray `---`)
        }
        if !v.is_mapping() {
            return Err(err(
                &format!("document {}", i + 1),
                "not a Kubernetes object (expected a mapping with kind)",
            ));
        }
        docs.push(v);
    }
    if docs.is_empty() {
        return Err(err("", "no Kubernetes objects in the input"));
    }
    let mut fronted = Vec::new();
    let mut out = Vec::new();
    for doc in docs {
        inject_doc(doc, opts, &mut fronted, &mut out)?;
    }
    for doc in &mut out {
        retarget_services(doc, &fronted);
    }
    let mut text = String::new();
    for (i, doc) in out.iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(
            &serde_norway::to_string(doc)
                .map_err(|e| err("", format!("cannot write YAML: {e}")))?,
        );
    }
    Ok(text)
}

fn kind_of(v: &Value) -> &str {
    v.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn name_of(v: &Value) -> &str {
    v.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn inject_doc(
    mut doc: Value,
    opts: &Options,
    fronted: &mut Vec<Fronted>,
    out: &mut Vec<Value>,
) -> Result<(), InjectError> {
    let kind = kind_of(&doc).to_string();
    if kind == "List" || kind.ends_with("List") && doc.get("items").is_some() {
        let items = match doc.get_mut("items") {
            Some(Value::Sequence(items)) => std::mem::take(items),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(err(&kind, "items is not a list")),
        };
        let mut new_items = Vec::new();
        for item in items {
            inject_doc(item, opts, fronted, &mut new_items)?;
        }
        doc["items"] = Value::Sequence(new_items);
        out.push(doc);
        return Ok(());
    }
    let at = format!("{kind}/{}", name_of(&doc));
    match kind.as_str() {
        k if WORKLOADS.contains(&k) => {
            if let Some((configmap, f)) = inject_workload(&mut doc, &at, opts)? {
                out.push(configmap);
                fronted.push(f);
            }
            out.push(doc);
            Ok(())
        }
        "Pod" | "ReplicaSet" | "ReplicationController" | "Job" | "CronJob" => Err(err(
            &at,
            format!(
                "cannot inject into a {kind}: opsgate inject handles Deployments, StatefulSets and DaemonSets (and Lists of them){}",
                if kind == "Job" || kind == "CronJob" {
                    "; a proxy in front of a batch job has nothing to serve"
                } else {
                    "; inject the workload that creates it"
                }
            ),
        )),
        "" => Err(err("", "an object without kind")),
        _ => {
            out.push(doc);
            Ok(())
        }
    }
}

fn map_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Mapping {
    if !v.get(key).is_some_and(Value::is_mapping) {
        v[key] = Value::Mapping(Mapping::new());
    }
    v.get_mut(key)
        .and_then(Value::as_mapping_mut)
        .expect("just made a mapping")
}

fn seq_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    if !v.get(key).is_some_and(Value::is_sequence) {
        v[key] = Value::Sequence(Vec::new());
    }
    v.get_mut(key)
        .and_then(Value::as_sequence_mut)
        .expect("just made a sequence")
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

/// YAML built from a literal: the sidecar's fixed parts read like the manifest they match.
fn yaml(text: &str) -> Value {
    serde_norway::from_str(text).expect("built-in YAML parses")
}

fn container_names(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn inject_workload(
    doc: &mut Value,
    at: &str,
    opts: &Options,
) -> Result<Option<(Value, Fronted)>, InjectError> {
    let name = name_of(doc).to_string();
    if name.is_empty() {
        return Err(err(at, "metadata.name is missing"));
    }
    let namespace = doc
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(pod) = doc
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .and_then(|t| t.get_mut("spec"))
    else {
        return Err(err(at, "spec.template.spec is missing"));
    };
    let names = container_names(pod.get("containers"));
    let init_names = container_names(pod.get("initContainers"));
    if names.iter().chain(&init_names).any(|n| n == CONTAINER) {
        return Ok(None); // already injected: injecting twice changes nothing
    }
    if pod.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(err(
            at,
            "hostNetwork pods share the node's ports and loopback: opsgate's ports would collide across pods; not supported",
        ));
    }
    let app_name = match (&opts.container, names.as_slice()) {
        (Some(c), _) if names.contains(c) => c.clone(),
        (Some(c), _) => {
            return Err(err(
                at,
                format!(
                    "no container named {c:?} (containers: {})",
                    names.join(", ")
                ),
            ));
        }
        (None, [one]) => one.clone(),
        (None, []) => return Err(err(at, "the pod template has no containers")),
        (None, many) => {
            return Err(err(
                at,
                format!(
                    "several containers ({}): name the one opsgate fronts with --container",
                    many.join(", ")
                ),
            ));
        }
    };

    let containers = pod
        .get_mut("containers")
        .and_then(Value::as_sequence_mut)
        .expect("containers listed above");
    let app = containers
        .iter_mut()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(app_name.as_str()))
        .expect("found above");
    let ports: Vec<(Option<String>, u16)> = app
        .get("ports")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let n = p.get("containerPort").and_then(Value::as_u64)?;
            Some((
                p.get("name").and_then(Value::as_str).map(str::to_string),
                u16::try_from(n).ok()?,
            ))
        })
        .collect();
    let resolve = |port: &Value| -> Option<u16> {
        match port {
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(name) => ports
                .iter()
                .find(|(n, _)| n.as_deref() == Some(name.as_str()))
                .map(|(_, p)| *p),
            _ => None,
        }
    };
    // The probe kubelet used to decide the app is ready: readiness, else liveness, else startup.
    let probe = ["readinessProbe", "livenessProbe", "startupProbe"]
        .iter()
        .find_map(|k| app.get(*k).cloned());
    let probe_port = probe.as_ref().and_then(|p| {
        p.get("httpGet")
            .or_else(|| p.get("tcpSocket"))
            .and_then(|h| h.get("port"))
            .and_then(resolve)
    });
    let port = opts
        .upstream_port
        .or(match ports.as_slice() {
            [(_, p)] => Some(*p),
            _ => None,
        })
        .or(probe_port)
        .ok_or_else(|| {
            err(
                at,
                format!(
                    "cannot tell which port of container {app_name:?} serves HTTP (it declares {}): pass --upstream-port",
                    if ports.is_empty() {
                        "no port".to_string()
                    } else {
                        ports
                            .iter()
                            .map(|(_, p)| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            )
        })?;
    let port_name = ports
        .iter()
        .find(|(_, p)| *p == port)
        .and_then(|(n, _)| n.clone());

    let config_text = match &opts.config {
        Some(text) => text.clone(),
        None => generated_config(port, probe.as_ref(), &resolve, opts),
    };
    let checked = crate::config::parse_str(
        &config_text,
        "opsgate.toml",
        &crate::config::Overrides::default(),
        &|_: &str| None,
    )
    .map_err(|e| err(at, format!("the opsgate config is not valid:\n{e}")))?;
    let listen = checked.file.proxy.listen.port();
    if listen == port {
        return Err(err(
            at,
            format!(
                "the app and opsgate would both listen on port {port}: move the app or opsgate's proxy.listen"
            ),
        ));
    }

    // The app: its fronted port and the probes opsgate now answers go; exec probes stay,
    // kubelet runs them in the app's container. It keeps serving while opsgate drains.
    if let Some(list) = app.get_mut("ports").and_then(Value::as_sequence_mut) {
        list.retain(|p| p.get("containerPort").and_then(Value::as_u64) != Some(u64::from(port)));
    }
    if app
        .get("ports")
        .and_then(Value::as_sequence)
        .is_some_and(Vec::is_empty)
    {
        app.as_mapping_mut().expect("container").remove("ports");
    }
    let map = app.as_mapping_mut().expect("container");
    for k in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if map
            .get(k)
            .is_some_and(|p| p.get("exec").is_none() && p.get("grpc").is_none())
        {
            map.remove(k);
        }
    }
    if app
        .get("lifecycle")
        .and_then(|l| l.get("preStop"))
        .is_none()
    {
        map_mut(app, "lifecycle").insert(s("preStop"), yaml("sleep:\n  seconds: 10\n"));
    }
    let app_port_names: Vec<String> = app
        .get("ports")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
        .collect();
    let sidecar_port_name = if app_port_names.iter().any(|n| n == "http") {
        "opsgate-http".to_string()
    } else {
        "http".to_string()
    };

    let configmap_name = format!("{name}-opsgate");
    let sidecar = sidecar(
        opts,
        &configmap_name,
        listen,
        &sidecar_port_name,
        &config_text,
    );
    if opts.native_sidecar {
        seq_mut(pod, "initContainers").push(sidecar);
    } else {
        seq_mut(pod, "containers").push(sidecar);
    }
    let volumes = seq_mut(pod, "volumes");
    if volumes
        .iter()
        .any(|v| v.get("name").and_then(Value::as_str) == Some(CONFIG_VOLUME))
    {
        return Err(err(
            at,
            format!("the pod already has a volume named {CONFIG_VOLUME}"),
        ));
    }
    volumes.push(yaml(&format!(
        "name: {CONFIG_VOLUME}\nconfigMap:\n  name: {configmap_name}\n"
    )));
    let grace = pod
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    pod["terminationGracePeriodSeconds"] = Value::from(grace.max(GRACE_SECONDS));

    let template = doc
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .expect("checked above");
    let labels = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let meta = map_mut(template, "metadata");
    if !meta.get("annotations").is_some_and(Value::is_mapping) {
        meta.insert(s("annotations"), Value::Mapping(Mapping::new()));
    }
    let annotations = meta
        .get_mut("annotations")
        .and_then(Value::as_mapping_mut)
        .expect("made above");
    // An app that exposes its own metrics keeps its scrape settings.
    if !annotations.contains_key("prometheus.io/scrape") {
        annotations.insert(s("prometheus.io/scrape"), s("true"));
        annotations.insert(s("prometheus.io/port"), s(&listen.to_string()));
        annotations.insert(s("prometheus.io/path"), s(&checked.file.metrics.path));
    }

    let mut cm_labels = Mapping::new();
    if let Some(n) = doc
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get("app.kubernetes.io/name"))
    {
        cm_labels.insert(s("app.kubernetes.io/name"), n.clone());
    }
    cm_labels.insert(s("app.kubernetes.io/component"), s("opsgate"));
    let mut cm_meta = Mapping::new();
    cm_meta.insert(s("name"), s(&configmap_name));
    if let Some(ns) = &namespace {
        cm_meta.insert(s("namespace"), s(ns));
    }
    cm_meta.insert(s("labels"), Value::Mapping(cm_labels));
    let mut data = Mapping::new();
    data.insert(s("opsgate.toml"), s(&config_text));
    let mut cm = Mapping::new();
    cm.insert(s("apiVersion"), s("v1"));
    cm.insert(s("kind"), s("ConfigMap"));
    cm.insert(s("metadata"), Value::Mapping(cm_meta));
    cm.insert(s("data"), Value::Mapping(data));

    Ok(Some((
        Value::Mapping(cm),
        Fronted {
            namespace,
            labels,
            port,
            port_name,
            sidecar_port_name,
        },
    )))
}

fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// opsgate.toml from the flags: the app on loopback, its probe as the `app` check, the
/// dependency checks, maintenance through the ConfigMap's flag file.
fn generated_config(
    port: u16,
    probe: Option<&Value>,
    resolve: &dyn Fn(&Value) -> Option<u16>,
    opts: &Options,
) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        r#"# Made by `opsgate inject`; every key: config/opsgate.toml in the opsgate repository.
[proxy]
listen = "0.0.0.0:8080"
# Keep accepting for 5s after SIGTERM while endpoints propagate, then drain.
shutdown_delay = "5s"
drain_timeout = "30s"

[admin]
# Loopback only: reach it with `kubectl port-forward pod/<pod> 9901`.
listen = "127.0.0.1:9901"
token = "${{OPSGATE_ADMIN_TOKEN:-}}"

[upstreams.app]
url = "http://127.0.0.1:{port}"

[[routes]]
name = "default"
prefix = "/"
upstream = "app"

[maintenance]
# Add a key "maintenance" to this ConfigMap to turn maintenance on.
flag_file = "{CONFIG_DIR}/maintenance"
mode = {mode}
bypass_token = "${{OPSGATE_BYPASS_TOKEN:-}}"
"#,
        mode = toml_str(&opts.maintenance),
    );
    // The app's own probe, now run by opsgate: kubelet's defaults where it set none.
    let period = probe
        .and_then(|p| p.get("periodSeconds"))
        .and_then(Value::as_u64)
        .unwrap_or(10);
    let timeout = probe
        .and_then(|p| p.get("timeoutSeconds"))
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let http = probe.and_then(|p| p.get("httpGet"));
    t.push_str("\n[[health.checks]]\nname = \"app\"\n");
    match http {
        Some(h) => {
            let scheme = match h.get("scheme").and_then(Value::as_str) {
                Some(s) if s.eq_ignore_ascii_case("https") => "https",
                _ => "http",
            };
            let p = h.get("port").and_then(resolve).unwrap_or(port);
            let path = h.get("path").and_then(Value::as_str).unwrap_or("/");
            let _ = write!(
                t,
                "type = \"http\"\nurl = {}\nexpect_status = \"200-399\"\n",
                toml_str(&format!("{scheme}://127.0.0.1:{p}{path}"))
            );
        }
        None => {
            let _ = write!(t, "type = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n");
        }
    }
    let _ = writeln!(t, "interval = \"{period}s\"\ntimeout = \"{timeout}s\"");
    for (name, url, critical) in &opts.checks {
        let kind = check_type(url);
        let _ = write!(
            t,
            "\n[[health.checks]]\nname = {}\ntype = \"{kind}\"\n",
            toml_str(name)
        );
        if kind == "tcp" {
            let addr = url.strip_prefix("tcp://").unwrap_or(url);
            let _ = writeln!(t, "address = {}", toml_str(addr));
        } else {
            let _ = writeln!(t, "url = {}", toml_str(url));
        }
        if !critical {
            t.push_str("critical = false\n");
        }
    }
    t
}

/// The check type a dependency URL's scheme implies.
pub fn check_type(url: &str) -> &'static str {
    // `${SQL_URL:-postgres://...}`: the default tells the type.
    let url = match url.strip_prefix("${") {
        Some(rest) => rest.split_once(":-").map_or(rest, |(_, default)| default),
        None => url,
    };
    let scheme = url.split("://").next().unwrap_or("");
    match scheme {
        "postgres" | "postgresql" => "postgres",
        "redis" | "rediss" => "redis",
        "http" | "https" => "http",
        _ => "tcp",
    }
}

/// The `${VAR}`s a config reads, in order: each becomes an env var of the sidecar.
fn config_vars(text: &str) -> Vec<String> {
    let mut vars = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        if !name.is_empty() && !vars.iter().any(|v| v == name) {
            vars.push(name.to_string());
        }
    }
    vars
}

/// The Secret key of a config variable: `OPSGATE_ADMIN_TOKEN` -> `admin-token`, `SQL_URL` -> `sql-url`.
pub fn secret_key(var: &str) -> String {
    var.strip_prefix("OPSGATE_")
        .unwrap_or(var)
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn sidecar(
    opts: &Options,
    configmap: &str,
    listen: u16,
    port_name: &str,
    config_text: &str,
) -> Value {
    let mut c = Mapping::new();
    c.insert(s("name"), s(CONTAINER));
    c.insert(s("image"), s(&opts.image));
    c.insert(s("imagePullPolicy"), s("IfNotPresent"));
    if opts.native_sidecar {
        // Native sidecar: started (and, with the startup probe, serving) before the
        // app, stopped after it.
        c.insert(s("restartPolicy"), s("Always"));
    }
    c.insert(
        s("ports"),
        yaml(&format!(
            "- name: {port_name}\n  containerPort: {listen}\n  protocol: TCP\n"
        )),
    );
    let mut env = vec![yaml("name: OPSGATE_LOG\nvalue: info\n")];
    for var in config_vars(config_text) {
        env.push(yaml(&format!(
            "name: {var}\nvalueFrom:\n  secretKeyRef:\n    name: {configmap}\n    key: {}\n    optional: true\n",
            secret_key(&var)
        )));
    }
    env.push(yaml("name: MAINTENANCE_MODE\nvalue: \"0\"\n"));
    c.insert(s("env"), Value::Sequence(env));
    c.insert(
        s("volumeMounts"),
        yaml(&format!(
            "- name: {CONFIG_VOLUME}\n  mountPath: {CONFIG_DIR}\n  readOnly: true\n"
        )),
    );
    // As a native sidecar the app starts only once this probe passes, so it must not
    // wait for checks of the app itself: /_health/live (serving) is enough there.
    let startup = if opts.native_sidecar {
        format!(
            "httpGet:\n  path: /_health/live\n  port: {port_name}\nperiodSeconds: 1\ntimeoutSeconds: 2\nfailureThreshold: 30\n"
        )
    } else {
        format!(
            "httpGet:\n  path: /_health/startup\n  port: {port_name}\nperiodSeconds: 2\ntimeoutSeconds: 2\nfailureThreshold: 150\n"
        )
    };
    c.insert(s("startupProbe"), yaml(&startup));
    c.insert(
        s("livenessProbe"),
        yaml(&format!(
            "httpGet:\n  path: /_health/live\n  port: {port_name}\nperiodSeconds: 10\ntimeoutSeconds: 2\nfailureThreshold: 3\n"
        )),
    );
    c.insert(
        s("readinessProbe"),
        yaml(&format!(
            "httpGet:\n  path: /_health/ready\n  port: {port_name}\nperiodSeconds: 5\ntimeoutSeconds: 2\nfailureThreshold: 2\nsuccessThreshold: 1\n"
        )),
    );
    c.insert(
        s("resources"),
        yaml("requests:\n  cpu: 50m\n  memory: 32Mi\nlimits:\n  memory: 64Mi\n"),
    );
    c.insert(
        s("securityContext"),
        yaml(
            "allowPrivilegeEscalation: false\nreadOnlyRootFilesystem: true\nrunAsNonRoot: true\ncapabilities:\n  drop: [\"ALL\"]\nseccompProfile:\n  type: RuntimeDefault\n",
        ),
    );
    Value::Mapping(c)
}

/// Points the Services in the input that select an injected workload's pods at
/// opsgate's port instead of the app's.
fn retarget_services(doc: &mut Value, fronted: &[Fronted]) {
    if kind_of(doc).ends_with("List") {
        for item in doc
            .get_mut("items")
            .and_then(Value::as_sequence_mut)
            .into_iter()
            .flatten()
        {
            retarget_services(item, fronted);
        }
        return;
    }
    if kind_of(doc) != "Service" {
        return;
    }
    let namespace = doc
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(selector) = doc
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(Value::as_mapping)
        .cloned()
    else {
        return;
    };
    if selector.is_empty() {
        return;
    }
    for f in fronted {
        if f.namespace != namespace || !selector.iter().all(|(k, v)| f.labels.get(k) == Some(v)) {
            continue;
        }
        for p in doc
            .get_mut("spec")
            .and_then(|s| s.get_mut("ports"))
            .and_then(Value::as_sequence_mut)
            .into_iter()
            .flatten()
        {
            let target = p.get("targetPort").or_else(|| p.get("port")).cloned();
            let hits = match &target {
                Some(Value::Number(n)) => n.as_u64() == Some(u64::from(f.port)),
                Some(Value::String(name)) => f.port_name.as_deref() == Some(name.as_str()),
                _ => false,
            };
            if hits {
                p["targetPort"] = s(&f.sidecar_port_name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
  labels: {app.kubernetes.io/name: shop}
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: shop}
  template:
    metadata:
      labels: {app.kubernetes.io/name: shop}
    spec:
      containers:
        - name: app
          image: example/shop:1
          ports:
            - {name: web, containerPort: 3000}
          readinessProbe:
            httpGet: {path: /healthz, port: web}
            periodSeconds: 5
            timeoutSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: shop
spec:
  selector: {app.kubernetes.io/name: shop}
  ports:
    - {name: http, port: 80, targetPort: web}
"#;

    fn docs(text: &str) -> Vec<Value> {
        serde_norway::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect()
    }

    fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
        docs.iter().find(|d| kind_of(d) == kind).unwrap()
    }

    #[test]
    fn adds_a_native_sidecar_configmap_and_moves_the_service() {
        let out = docs(&inject(APP, &Options::default()).unwrap());
        assert_eq!(
            out.iter().map(kind_of).collect::<Vec<_>>(),
            ["ConfigMap", "Deployment", "Service"]
        );
        let pod = &by_kind(&out, "Deployment")["spec"]["template"]["spec"];
        let side = &pod["initContainers"][0];
        assert_eq!(side["name"], "opsgate");
        assert_eq!(side["restartPolicy"], "Always");
        assert_eq!(side["startupProbe"]["httpGet"]["path"], "/_health/live");
        let app = &pod["containers"][0];
        assert!(app.get("readinessProbe").is_none() && app.get("ports").is_none());
        assert_eq!(pod["terminationGracePeriodSeconds"], 45);
        let svc = by_kind(&out, "Service");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
        let toml = by_kind(&out, "ConfigMap")["data"]["opsgate.toml"]
            .as_str()
            .unwrap();
        assert!(toml.contains("url = \"http://127.0.0.1:3000\""), "{toml}");
        assert!(
            toml.contains("url = \"http://127.0.0.1:3000/healthz\""),
            "{toml}"
        );
        assert!(toml.contains("interval = \"5s\""), "{toml}");
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let opts = Options {
            checks: vec![("db".into(), "postgres://u@db:5432/x".into(), true)],
            ..Options::default()
        };
        let once = inject(APP, &opts).unwrap();
        assert_eq!(inject(&once, &opts).unwrap(), once);
        let opts = Options {
            native_sidecar: false,
            ..opts
        };
        let once = inject(APP, &opts).unwrap();
        assert_eq!(inject(&once, &opts).unwrap(), once);
    }

    #[test]
    fn regular_sidecar_on_request() {
        let opts = Options {
            native_sidecar: false,
            ..Options::default()
        };
        let out = docs(&inject(APP, &opts).unwrap());
        let pod = &by_kind(&out, "Deployment")["spec"]["template"]["spec"];
        assert!(pod.get("initContainers").is_none());
        assert_eq!(pod["containers"][1]["name"], "opsgate");
        assert!(pod["containers"][1].get("restartPolicy").is_none());
        assert_eq!(
            pod["containers"][1]["startupProbe"]["httpGet"]["path"],
            "/_health/startup"
        );
    }

    #[test]
    fn lists_statefulsets_and_daemonsets_are_injected() {
        let text = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: a}
    spec:
      serviceName: a
      selector: {matchLabels: {app: a}}
      template:
        metadata: {labels: {app: a}}
        spec:
          containers: [{name: a, image: a, ports: [{containerPort: 8000}]}]
  - apiVersion: apps/v1
    kind: DaemonSet
    metadata: {name: b}
    spec:
      selector: {matchLabels: {app: b}}
      template:
        metadata: {labels: {app: b}}
        spec:
          containers: [{name: b, image: b, ports: [{containerPort: 9000}]}]
"#;
        let out = docs(&inject(text, &Options::default()).unwrap());
        let items = out[0]["items"].as_sequence().unwrap();
        assert_eq!(
            items.iter().map(kind_of).collect::<Vec<_>>(),
            ["ConfigMap", "StatefulSet", "ConfigMap", "DaemonSet"]
        );
        let toml = items[2]["data"]["opsgate.toml"].as_str().unwrap();
        // No probe: the app check is a TCP connect to its port.
        assert!(toml.contains("address = \"127.0.0.1:9000\""), "{toml}");
    }

    #[test]
    fn clear_errors_for_what_it_cannot_handle() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a}]}\n";
        let e = inject(pod, &Options::default()).unwrap_err();
        assert!(
            e.to_string().starts_with("Pod/p: cannot inject into a Pod"),
            "{e}"
        );

        let two = APP.replace(
            "      containers:\n",
            "      containers:\n        - {name: logger, image: l}\n",
        );
        let e = inject(&two, &Options::default()).unwrap_err();
        assert!(e.message.contains("--container"), "{e}");
        let opts = Options {
            container: Some("app".into()),
            ..Options::default()
        };
        assert!(inject(&two, &opts).is_ok());

        let no_port = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: a}]\n";
        let e = inject(no_port, &Options::default()).unwrap_err();
        assert!(e.message.contains("--upstream-port"), "{e}");

        let e = inject("a: [", &Options::default()).unwrap_err();
        assert!(e.message.starts_with("invalid YAML"), "{e}");

        let opts = Options {
            config: Some("[proxy]\nlisten = \"0.0.0.0:8080\"\nupstream = \"127.0.0.1:1\"\n".into()),
            ..Options::default()
        };
        let e = inject(APP, &opts).unwrap_err();
        assert!(e.message.contains("not valid"), "{e}");
    }

    #[test]
    fn config_variables_come_from_the_optional_secret() {
        assert_eq!(secret_key("OPSGATE_ADMIN_TOKEN"), "admin-token");
        assert_eq!(secret_key("SQL_URL"), "sql-url");
        assert_eq!(
            config_vars("a = \"${A:-x}\"\nb = \"${B_C}\" ${A}"),
            ["A", "B_C"]
        );
        assert_eq!(check_type("rediss://h"), "redis");
        assert_eq!(check_type("db:5432"), "tcp");
        assert_eq!(check_type("${SQL_URL:-postgres://u@db/x}"), "postgres");
    }
}
